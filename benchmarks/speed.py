"""Speed of full vs low-rank VGG-16, CaffeNet and NIN, side by side in one run.

For each family: the forward and the forward+backward time of the full net and of the low-rank
net with the authors' ranks, both built by ``models.get_model`` under the same XLA flags and the
same :mod:`lrjax.formulations` policy, timed one call at a time in turns (median of
``--repeats``). VGG-16 and CaffeNet are also timed as conv stacks alone (classifier 16 wide), and
every decomposed layer alone (forward), full conv vs pair, next to its theoretical speedup.

    python -m benchmarks.speed --preset cpu --json bench_results/speed_cpu.json
    python -m benchmarks.speed --preset gpu --policy portable --json bench_results/speed_gpu.json
"""

from __future__ import annotations

import argparse

from benchmarks import common

PRESETS = {
    # model: batch sizes
    "cpu": {"batches": {"vgg16": (1, 8), "caffenet": (32,), "nin": (128,)}, "dtype": "float32",
            "repeats": 5},
    "gpu": {"batches": {"vgg16": (64,), "caffenet": (256,), "nin": (512,)}, "dtype": "bfloat16",
            "repeats": 20},
    "smoke": {"batches": {"nin": (4,)}, "dtype": "float32", "repeats": 1},
}


def _calls(model, size, batch, dtype, with_backward):
    import jax
    import jax.numpy as jnp

    from lrjax import models

    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), dtype)
    variables = models.init_variables(model, size)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def loss(params, x):
        logits = model.apply({**variables, "params": params}, x, train=False)
        return jnp.mean(jnp.square(logits.astype(jnp.float32)))

    grad = jax.jit(jax.value_and_grad(loss))
    calls = {"forward": lambda: jax.block_until_ready(fwd(variables, x))}
    if with_backward:
        calls["forward_backward"] = lambda: jax.block_until_ready(grad(variables["params"], x))
    return calls


def bench_family(name, batch, dtype, repeats, log, with_backward=True, layers=True):
    import jax.numpy as jnp

    from lrjax import cost_report, costs, models, surgery, timing

    spec = models.model_spec(name)
    size = spec.image_size
    dt = jnp.dtype(dtype)
    report = cost_report.zoo_cost_report(name)
    ranks = {lc.name: lc.rank for lc in report.layers if lc.rank is not None}
    result = {"batch": batch, "image_size": size, "dtype": dtype,
              "theoretical_speedup": report.speedup, "ranks": ranks}
    nets = {"full": models.get_model(name, dtype=dt),
            "lowrank": models.get_model(name, lowrank=True, dtype=dt)}
    if "fc_features" in models.get_model(name).__dataclass_fields__:
        # the conv stack with a negligible classifier isolates the convolutions
        nets["full conv stack"] = models.get_model(name, dtype=dt, fc_features=16)
        nets["lowrank conv stack"] = models.get_model(name, lowrank=True, dtype=dt,
                                                      fc_features=16)
    calls = {}
    for label, model in nets.items():
        for kind, call in _calls(model, size, batch, dt, with_backward).items():
            calls[(label, kind)] = call
    times = common.interleaved_times(calls, repeats)
    result["times_s"] = {f"{label} {kind}": runs for (label, kind), runs in times.items()}
    med = {key: common.median(runs) for key, runs in times.items()}
    result["median_s"] = {f"{label} {kind}": v for (label, kind), v in med.items()}
    speedups = {}
    for base, low in (("full", "lowrank"), ("full conv stack", "lowrank conv stack")):
        for kind in ("forward", "forward_backward"):
            if (base, kind) in med:
                speedups[f"{low} {kind}"] = med[(base, kind)] / med[(low, kind)]
    result["speedups"] = speedups
    for (label, kind), v in med.items():
        log(f"{name} batch {batch}: {label:<20} {kind:<17} {v * 1e3:9.1f} ms")
    for key, v in speedups.items():
        log(f"{name} batch {batch}: {key:<38} {v:5.2f}x (theory {report.speedup:.2f}x)")
    if layers:
        sites = surgery.find_convs(nets["full"], cost_report.images(1, size), train=False)
        shapes = [s.shape for s in sites if s.path in ranks]
        per_layer = timing.layer_times(shapes, ranks, batch=batch, dtype=dt, repeats=repeats)
        rows = []
        for shape in shapes:
            full_s, pair_s = per_layer[shape.name]
            rows.append({"layer": shape.name, "rank": ranks[shape.name], "full_ms": full_s * 1e3,
                         "pair_ms": pair_s * 1e3, "actual_speedup": full_s / pair_s,
                         "theoretical_speedup": costs.layer_speedup(shape, ranks[shape.name])})
            log(f"  {shape.name:<10} rank {ranks[shape.name]:4d}  full {full_s * 1e3:8.1f} ms  "
                f"pair {pair_s * 1e3:8.1f} ms  {full_s / pair_s:5.2f}x  "
                f"(theory {rows[-1]['theoretical_speedup']:.2f}x)")
        result["layers"] = rows
        result["layers_sum_speedup"] = (sum(r["full_ms"] for r in rows)
                                        / sum(r["pair_ms"] for r in rows))
    return result


def main(argv=None):
    common.setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--models", default=None, help="comma-separated subset: vgg16,caffenet,nin")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--policy", default=None, help="lrjax.formulations policy (default auto)")
    parser.add_argument("--no-backward", action="store_true", help="forward passes only")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from lrjax import formulations

    if args.policy:
        formulations.set_policy(args.policy)
    preset = PRESETS[args.preset]
    names = args.models.split(",") if args.models else list(preset["batches"])
    repeats = args.repeats or preset["repeats"]
    results = {"machine": common.machine("torch"), "preset": args.preset, "repeats": repeats,
               "models": {}}
    for name in names:
        if name not in preset["batches"]:
            parser.error(f"model {name!r} has no batch size in preset {args.preset!r}")
        for batch in preset["batches"][name]:
            results["models"][f"{name}@{batch}"] = bench_family(
                name, batch, preset["dtype"], repeats, lambda s: print(s, flush=True),
                with_backward=not args.no_backward, layers=not args.no_layers)
    print(f"\n{'model':<14}{'speedup':<40}{'x':>7}{'theory':>9}")
    for key, r in results["models"].items():
        for label, v in r["speedups"].items():
            print(f"{key:<14}{label:<40}{v:>6.2f}x{r['theoretical_speedup']:>8.2f}x")
    if args.json:
        common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
