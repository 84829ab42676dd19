"""The prepared accelerator run: full vs low-rank VGG-16 and NIN, forward pass and train step,
float32 and bfloat16, under both formulation policies ("auto" resolves to "portable" off CPU,
so the "cpu" policy is what the CPU formulations would do there), side by side in one process.

Sized to fit a few minutes of a lent GPU (batch 64 for VGG-16, 512 for NIN, 10 timed calls):

    python -m benchmarks.gpu_check --json bench_results/gpu.json
"""

from __future__ import annotations

import argparse

from benchmarks import common

BATCHES = {"vgg16": 64, "nin": 512}


def main(argv=None):
    common.setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default="vgg16,nin")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--policies", default="portable,cpu")
    parser.add_argument("--batches", default=None, help="override, e.g. 'nin=4' (smoke tests)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from benchmarks import speed, train_throughput
    from lrjax import formulations, models

    batches = dict(BATCHES)
    if args.batches:
        batches.update({k: int(v) for k, v in (item.split("=") for item in args.batches.split(","))})
    results = {"machine": common.machine(), "repeats": args.repeats, "runs": []}
    for family in args.models.split(","):
        batch, size = batches[family], models.model_spec(family).image_size
        for dtype in args.dtypes.split(","):
            for policy in args.policies.split(","):
                calls = {}
                with formulations.policy(policy):
                    for lowrank in (False, True):
                        label = "lowrank" if lowrank else "full"
                        model = models.get_model(family, lowrank=lowrank, dtype=jnp.dtype(dtype))
                        fwd = speed._calls(model, size, batch, jnp.dtype(dtype), False)["forward"]
                        calls[(label, "forward")] = fwd
                        calls[(label, "train step")] = train_throughput.jax_train_step(
                            lowrank, batch, policy=policy, family=family, dtype=dtype)

                def under_policy(run, policy=policy):
                    def call():
                        with formulations.policy(policy):
                            run()
                    return call

                times = common.interleaved_times(
                    {k: under_policy(v) for k, v in calls.items()}, args.repeats)
                med = {f"{net} {kind}": common.median(t) for (net, kind), t in times.items()}
                row = {"model": family, "batch": batch, "dtype": dtype, "policy": policy,
                       "median_s": med,
                       "speedup_forward": med["full forward"] / med["lowrank forward"],
                       "speedup_train_step": med["full train step"] / med["lowrank train step"]}
                results["runs"].append(row)
                print(f"{family}@{batch} {dtype:<9} {policy:<9} fwd {med['full forward'] * 1e3:8.2f}"
                      f" -> {med['lowrank forward'] * 1e3:8.2f} ms ({row['speedup_forward']:.2f}x)"
                      f"  step {med['full train step'] * 1e3:8.2f} -> "
                      f"{med['lowrank train step'] * 1e3:8.2f} ms "
                      f"({row['speedup_train_step']:.2f}x)  [{jax.default_backend()}]", flush=True)
    if args.json:
        common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
