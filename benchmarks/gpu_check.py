"""The prepared accelerator run: full vs low-rank VGG-16 and NIN, forward pass and train step,
float32 and bfloat16, under both formulation policies ("auto" resolves to "portable" off CPU,
so the "cpu" policy is what the CPU formulations would do there), side by side in one process;
and Flax examples' ResNet-50 at 224 (``benchmarks.user_models``) full vs whole-net
``speedup:2`` (1x1 convs and the classifier in scope; ranks as chosen and rounded to 16),
forward pass at several batches, with XLA's own flop ratio of the lowered forward passes.

Sized to fit a few minutes of a lent GPU (batch 64 for VGG-16, 512 for NIN, 10 timed calls;
ResNet-50 at batch 1, 8 and 64):

    python -m benchmarks.gpu_check --json bench_results/gpu.json
"""

from __future__ import annotations

import argparse

from benchmarks import common

BATCHES = {"vgg16": 64, "nin": 512}
RESNET_BATCHES = (1, 8, 64)
RESNET_RULES = {"speedup2": "speedup:2", "speedup2_multiple16": "speedup:2,multiple=16"}


def resnet50_runs(dtypes, batches, repeats, log, size=224) -> list[dict]:
    """Flax examples' ResNet-50 (computing in each of ``dtypes``, float32 parameters) full vs
    each rule of :data:`RESNET_RULES`, forward pass at each batch, steady-state medians of
    calls taking turns; one row per (dtype, batch) with XLA's flop ratio of the lowered
    forward passes (batch 1) beside the report's."""
    import jax
    import jax.numpy as jnp

    from benchmarks.user_models import resnet50
    from lrjax import decompose_linen, timing

    rows = []
    for dtype in dtypes:
        net = resnet50(num_classes=1000, dtype=jnp.dtype(dtype))
        x1 = jnp.zeros((1, size, size, 3))
        variables = jax.jit(lambda x, net=net: net.init(jax.random.key(0), x, train=False))(x1)
        contenders, theory = {"full": (net, variables)}, {}
        for label, rule in RESNET_RULES.items():
            low = decompose_linen(net, variables, x1, rule=rule, train=False)
            contenders[label], theory[label] = (low.module, low.variables), low.report.speedup
        forwards = {label: jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))
                    for label, (m, _) in contenders.items()}
        # XLA's flop count of the lowered forward passes: a compiled GPU executable's count
        # leaves out the convolutions XLA hands to cuDNN (its ratio reads 1.00x on an H200);
        # the batch-1 executables run the batch-1 calls (one compile)
        lowered = {label: forwards[label].lower(v, x1) for label, (_, v) in contenders.items()}
        flops = {label: low.cost_analysis()["flops"] for label, low in lowered.items()}
        batch1 = {label: low.compile() for label, low in lowered.items()}
        for batch in batches:
            x = jax.random.normal(jax.random.key(batch), (batch, size, size, 3))
            run = batch1 if batch == 1 else forwards
            calls = {label: (lambda f=run[label], v=v, x=x: jax.block_until_ready(f(v, x)))
                     for label, (_, v) in contenders.items()}
            med = {label: common.median(t) for label, t in
                   timing.steady_times(calls, repeats, min_time_s=0.5).items()}
            row = {"model": "resnet50", "size": size, "batch": batch, "dtype": dtype,
                   "median_s": med, "theoretical_speedup": theory,
                   "xla_flops_speedup": {k: flops["full"] / flops[k] for k in theory},
                   "speedup_forward": {k: med["full"] / med[k] for k in theory}}
            rows.append(row)
            log(f"resnet50@{batch} {dtype:<9} fwd {med['full'] * 1e3:8.2f} -> " + ", ".join(
                f"{k} {med[k] * 1e3:.2f} ms ({row['speedup_forward'][k]:.2f}x; theory "
                f"{theory[k]:.2f}x, XLA flops {row['xla_flops_speedup'][k]:.2f}x)"
                for k in theory) + f"  [{jax.default_backend()}]")
        del contenders, forwards, lowered, batch1, variables
    return rows


def main(argv=None):
    common.setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default="vgg16,nin,resnet50")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--policies", default="portable,cpu")
    parser.add_argument("--batches", default=None, help="override, e.g. 'nin=4' (smoke tests)")
    parser.add_argument("--resnet-batches", default=",".join(map(str, RESNET_BATCHES)))
    parser.add_argument("--resnet-size", type=int, default=224, help="smaller for smoke tests")
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
    families = common.chosen_models(parser, args.models, (*models.MODELS, "resnet50"))
    if "resnet50" in families:
        results["runs"] += resnet50_runs(
            args.dtypes.split(","), [int(b) for b in args.resnet_batches.split(",")],
            args.repeats, lambda line: print(line, flush=True), size=args.resnet_size)
        if args.json:  # what is measured so far survives a later failure or time limit
            common.write_json(args.json, results)
    for family in (f for f in families if f != "resnet50"):
        batch, size = batches.get(family, 64), models.model_spec(family).image_size
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
                if args.json:
                    common.write_json(args.json, results)
                print(f"{family}@{batch} {dtype:<9} {policy:<9} fwd {med['full forward'] * 1e3:8.2f}"
                      f" -> {med['lowrank forward'] * 1e3:8.2f} ms ({row['speedup_forward']:.2f}x)"
                      f"  step {med['full train step'] * 1e3:8.2f} -> "
                      f"{med['lowrank train step'] * 1e3:8.2f} ms "
                      f"({row['speedup_train_step']:.2f}x)  [{jax.default_backend()}]", flush=True)
    return results


if __name__ == "__main__":
    main()
