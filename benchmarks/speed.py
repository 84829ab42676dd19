"""Speed of full vs low-rank VGG-16, CaffeNet and NIN, side by side in one run.

For each family: forward and forward+backward time of the full net and of the low-rank net with
the authors' ranks (jit, warm-up, median of ``--repeats`` runs), then the steps that close the gap
to the theoretical speedup, each timed on the whole net:

  1. plain pairs (two ``lax`` convolutions per layer);
  2. + measured gating: a layer stays full rank where its pair is slower (timed alone);
  3. + per-layer formulation: each pair uses the faster of ``lax`` convs and the matmul
     formulation (``LowRankConv(implementation="matmul")``), chosen by measurement.

A per-layer table gives full vs pair time and actual vs theoretical speedup, and for VGG-16 and
CaffeNet the conv stack is also timed alone (classifier shrunk to 16 features).

    python -m benchmarks.speed --preset cpu --json bench_results/speed_cpu.json
    python -m benchmarks.speed --preset gpu --json bench_results/speed_gpu.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import machine, write_json
from lrjax import cost_report, models, surgery
from lrjax.layers import low_rank
from lrjax.timing import median_time

PRESETS = {
    # model: batch size
    "cpu": {"batches": {"vgg16": 8, "caffenet": 32, "nin": 128}, "dtype": "float32",
            "repeats": 3},
    "gpu": {"batches": {"vgg16": 64, "caffenet": 256, "nin": 512}, "dtype": "bfloat16",
            "repeats": 20},
    "smoke": {"batches": {"nin": 8}, "dtype": "float32", "repeats": 1},
}


def _fns(model, variables):
    def loss(params, x):
        logits = model.apply({**variables, "params": params}, x, train=False)
        return jnp.mean(jnp.square(logits))

    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    return fwd, fwd_bwd


def time_model(model, size, batch, repeats, with_backward=True):
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    variables = models.init_variables(model, size)
    fwd, fwd_bwd = _fns(model, variables)
    out = {"forward_s": median_time(fwd, variables, x, repeats=repeats)}
    if with_backward:
        out["forward_backward_s"] = median_time(fwd_bwd, variables["params"], x, repeats=repeats)
    return out


def bench_family(name, batch, dtype, repeats, log):
    spec = models.model_spec(name)
    size = spec.image_size
    ranks = models.get_model("lowrank_" + name).conv.rank_map
    report = cost_report.zoo_cost_report("lowrank_" + name)
    layers = [layer.shape for layer in cost_report.conv_layers(models.get_model(name),
                                                               (1, size, size, 3))]
    result = {"batch": batch, "image_size": size, "dtype": dtype,
              "theoretical_speedup": report.speedup, "variants": {}}
    dt = jnp.dtype(dtype)

    full = time_model(models.get_model(name, dtype=dt), size, batch, repeats)
    result["variants"]["full"] = full
    log(f"{name}: full      fwd {full['forward_s'] * 1e3:9.1f} ms   "
        f"fwd+bwd {full['forward_backward_s'] * 1e3:9.1f} ms")

    gated, chosen, times = surgery.measured_gate(
        [layer for layer in layers if layer.name in ranks], ranks, batch=batch, dtype=dt,
        repeats=repeats, implementations=("conv", "matmul"))
    plans = {
        "lowrank (plain pairs)": low_rank(ranks),
        "+ measured gating": low_rank({n: (r if times[n][1] < times[n][0] else None)
                                       for n, r in ranks.items()}),
        "+ per-layer formulation": low_rank(gated, implementations=chosen),
    }
    for label, factory in plans.items():
        model = models.get_model(name, dtype=dt).clone(conv=factory)
        r = time_model(model, size, batch, repeats)
        r["speedup_forward"] = full["forward_s"] / r["forward_s"]
        r["speedup_forward_backward"] = full["forward_backward_s"] / r["forward_backward_s"]
        r["ranks"] = factory.rank_map
        r["implementations"] = dict(factory.implementations)
        result["variants"][label] = r
        log(f"{name}: {label:<26} fwd {r['forward_s'] * 1e3:9.1f} ms ({r['speedup_forward']:.2f}x)"
            f"   fwd+bwd {r['forward_backward_s'] * 1e3:9.1f} ms "
            f"({r['speedup_forward_backward']:.2f}x)")

    if "fc_features" in models.get_model(name).__dataclass_fields__:
        # the conv stack with a negligible classifier: isolates the convolutions from the
        # fully connected layers (on XLA CPU the full VGG-16's classifier costs far more inside
        # the whole graph than alone)
        small = {"dtype": dt, "fc_features": 16}
        stack_full = time_model(models.get_model(name, **small), size, batch, repeats)
        stack_low = time_model(models.get_model(name, **small).clone(conv=low_rank(ranks)),
                               size, batch, repeats)
        result["conv_stack"] = {
            "full": stack_full, "lowrank": stack_low,
            "speedup_forward": stack_full["forward_s"] / stack_low["forward_s"],
            "speedup_forward_backward": (stack_full["forward_backward_s"]
                                         / stack_low["forward_backward_s"])}
        log(f"{name}: conv stack (fc 16) fwd {stack_full['forward_s'] * 1e3:.1f} -> "
            f"{stack_low['forward_s'] * 1e3:.1f} ms "
            f"({result['conv_stack']['speedup_forward']:.2f}x), fwd+bwd "
            f"{result['conv_stack']['speedup_forward_backward']:.2f}x")

    by_name = {lc.name: lc for lc in report.layers}
    rows = []
    for layer_name, (t_full, t_conv, t_mm) in times.items():
        rows.append({"layer": layer_name, "rank": ranks[layer_name],
                     "full_ms": t_full * 1e3, "pair_conv_ms": t_conv * 1e3,
                     "pair_matmul_ms": None if t_mm == float("inf") else t_mm * 1e3,
                     "actual_speedup_conv": t_full / t_conv,
                     "actual_speedup_best": t_full / min(t_conv, t_mm),
                     "theoretical_speedup": by_name[layer_name].speedup,
                     "chosen": chosen.get(layer_name, "full")})
    result["layers"] = rows
    log(f"\n{'layer':<10}{'rank':>6}{'full ms':>10}{'pair ms':>10}{'matmul ms':>11}"
        f"{'actual':>8}{'best':>8}{'theory':>8}  chosen")
    for r in rows:
        mm = "-" if r["pair_matmul_ms"] is None else f"{r['pair_matmul_ms']:.1f}"
        log(f"{r['layer']:<10}{r['rank']:>6}{r['full_ms']:>10.1f}{r['pair_conv_ms']:>10.1f}"
            f"{mm:>11}{r['actual_speedup_conv']:>7.2f}x{r['actual_speedup_best']:>7.2f}x"
            f"{r['theoretical_speedup']:>7.2f}x  {r['chosen']}")
    log("")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--models", default=None, help="comma-separated subset: vgg16,caffenet,nin")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    names = args.models.split(",") if args.models else list(preset["batches"])
    repeats = args.repeats or preset["repeats"]
    results = {"machine": machine(),
               "preset": args.preset, "models": {}}
    for name in names:
        if name not in preset["batches"]:
            parser.error(f"model {name!r} has no batch size in preset {args.preset!r}")
        results["models"][name] = bench_family(name, preset["batches"][name], preset["dtype"],
                                               repeats, lambda s: print(s, flush=True))
    print(f"{'model':<10}{'variant':<28}{'fwd x':>8}{'fwd+bwd x':>11}{'theory x':>10}")
    for name, r in results["models"].items():
        for label, v in r["variants"].items():
            if label == "full":
                continue
            print(f"{name:<10}{label:<28}{v['speedup_forward']:>7.2f}x"
                  f"{v['speedup_forward_backward']:>10.2f}x{r['theoretical_speedup']:>9.2f}x")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
