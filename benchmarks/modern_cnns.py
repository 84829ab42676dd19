"""Modern CNNs end to end: decomposition time and measured speed with every linear layer in scope.

In one run, on random weights (speed and decomposition time do not depend on the values):

* **decomposition time** of ``decompose_linen`` (first call, compiles included, as a user meets
  it): a Flax-examples-style ResNet-50 at 64x64 with a whole-net ``speedup:2``, data-free and
  calibrated on 8 images, then ``speedup:1.5`` and ``speedup:3`` calibrated afresh and with the
  calibrated result's ``problem=`` (a sweep of rules); VGG-16 at 224 with the authors' conv
  ranks (first and second call in this process, and the first call in three fresh ones), and
  with a whole-net ``speedup:2`` (classifier included) on lrjax's route and with every spectrum
  and its factors in one pass.
* **measured speed**, full vs low-rank, in JAX (``jax.jit``, the recommended XLA flags) and in
  ONNX Runtime (the export of the same modules): ResNet-50 at 224 with a whole-net
  ``speedup:2`` (1x1 convs and the classifier are candidates), with ``speedup:2,multiple=16``
  and ``speedup:2,multiple=64``, with ``speedup:2+measured,multiple=64`` (the budget allocated
  over the layers whose pairs are faster in JAX, timed alone at batch 1 and at batch 8: one
  variant per batch), and with the ``speedup:2`` ranks of one layer kind only (k x k,
  1x1, dense: the time each kind's pairs save against the multiply-adds they save), at batch 1
  and 8; VGG-16 at 224 with the authors' conv ranks, with fc6/fc7 factorized too, and with both
  behind the ``+measured`` gate (JAX, batch 1), at batch 1; the U-Net of
  :mod:`benchmarks.user_models` at 128x128 (four ``nn.ConvTranspose`` upsamplers) with a
  whole-net ``speedup:2``, the same behind the ``+measured`` gate, and its transposed convs
  alone split at half their break-even rank, at batch 1 and 8, plus each upsampler timed alone
  against its pair. Both sides run the same flags and formulations; times are medians of
  steady-state calls taken in turns. ``--models`` picks a subset (``resnet50,vgg16,unet``).

    python -m benchmarks.modern_cnns --json bench_results/modern_cnns.json
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m benchmarks.modern_cnns \
        --json bench_results/modern_cnns_hugetlb.json

The second run backs glibc's large allocations with transparent huge pages: at batch 8 XLA:CPU
otherwise page-faults ~32,000 fresh 4 KiB pages per ResNet-50 call, full and low-rank alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import machine, median, setup, write_json

# fc6/fc7 ranks of the VGG-16 variant with its classifier factorized: 7x and 4x fewer
# multiply-adds in those two layers
VGG_FC_RANKS = {"fc6": 512, "fc7": 512}
MODELS = "resnet50,vgg16,unet"


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speedup2_times(prefix: str, net, size: int, log) -> dict:
    """Seconds of ``decompose_linen(net, ..., rule="speedup:2")`` on a ``size`` x ``size`` input,
    data-free and calibrated on 8 images (first calls); ``{f"{prefix}_...": {...}}``."""
    import jax
    import jax.numpy as jnp

    from lrjax import decompose_linen

    x = jnp.zeros((1, size, size, 3))
    # initialised before the clock starts (dispatch is asynchronous)
    variables = jax.block_until_ready(
        jax.jit(lambda x: net.init(jax.random.key(0), x, train=False))(x))
    calib = jax.block_until_ready(jax.random.normal(jax.random.key(1), (8, size, size, 3)))
    out = {}
    for name, cal in ((f"{prefix}_speedup2_data_free", None),
                      (f"{prefix}_speedup2_calibrated_8", calib)):
        result = {}
        seconds = _time(lambda cal=cal, result=result: result.update(r=decompose_linen(
            net, variables, x, rule="speedup:2", calibration=cal, train=False)))
        out[name] = {"seconds": seconds, "layers_split": len(result["r"].ranks),
                     "speedup": result["r"].report.speedup}
        log(f"{name:<40} {seconds:6.1f} s  ({len(result['r'].ranks)} layers, "
            f"{result['r'].report.speedup:.2f}x)")
    calibrated = result["r"]  # a sweep of rules: calibrated afresh, or its problem reused
    for rule in ("speedup:1.5", "speedup:3"):
        row = {}
        for how, kwargs in (("afresh", {"calibration": calib}),
                            ("reused", {"problem": calibrated.problem})):
            found = {}
            row[f"seconds_{how}"] = _time(lambda kwargs=kwargs, found=found, rule=rule: found.update(
                r=decompose_linen(net, variables, x, rule=rule, train=False, **kwargs)))
            row[f"ranks_{how}"] = found["r"].ranks
        row["same_ranks"] = row.pop("ranks_afresh") == row.pop("ranks_reused")
        out[f"{prefix}_{rule.replace(':', '').replace('.', '_')}_calibrated_8_sweep"] = row
        log(f"{prefix} {rule} calibrated: {row['seconds_afresh']:.1f} s afresh, "
            f"{row['seconds_reused']:.1f} s with the speedup:2 result's problem "
            f"(same ranks: {row['same_ranks']})")
    return out


def decomposition_times(log) -> dict:
    from benchmarks.user_models import resnet50

    out = speedup2_times("resnet50_64", resnet50(num_classes=1000), 64, log)
    times = vgg_decomposition_times()
    fresh = [_fresh_vgg_decomposition()[0] for _ in range(3)]
    out["vgg16_224_authors_ranks"] = {
        "seconds": times[0], "seconds_second_call": times[1],
        "seconds_fresh_process": sorted(fresh)[1], "seconds_fresh_process_runs": fresh}
    log(f"{'vgg16_224_authors_ranks':<40} {times[0]:6.1f} s  (second call {times[1]:.1f} s, "
        f"first call in three fresh processes {' / '.join(f'{t:.2f}' for t in fresh)} s)")
    out.update(vgg_rule_times(log))
    return out


def vgg_rule_times(log) -> dict:
    """Seconds of ``decompose_linen`` on VGG-16 at 224 with a whole-net ``speedup:2`` (its
    classifier included: fc6 is 25088 x 4096), data-free, on the route lrjax takes (the
    spectrum first for matrices of ``problem.SPECTRUM_FIRST`` or more on a side, their factors
    only if split) and with every layer's spectrum and factors in one pass; two calls each, in
    turns, the faster kept."""
    import jax
    import jax.numpy as jnp

    from lrjax import decompose_linen, models, problem

    vgg = models.get_model("vgg16")
    variables = jax.block_until_ready(models.init_variables(vgg, 224, 0))
    routes = {"spectrum_first": problem.SPECTRUM_FIRST, "one_pass": 10**9}
    seconds, result = {route: [] for route in routes}, {}
    for _ in range(2):
        for route, first in routes.items():
            problem.SPECTRUM_FIRST = first
            try:
                seconds[route].append(_time(lambda route=route: result.update({
                    route: decompose_linen(vgg, variables, jnp.zeros((1, 224, 224, 3)),
                                           rule="speedup:2", train=False)})))
            finally:
                problem.SPECTRUM_FIRST = routes["spectrum_first"]
    out = {f"vgg16_224_speedup2_{route}": {"seconds": min(t), "runs": t,
                                           "layers_split": sorted(result[route].ranks)}
           for route, t in seconds.items()}
    for name, row in out.items():
        log(f"{name:<40} {row['seconds']:6.1f} s  (runs {' / '.join(f'{t:.1f}' for t in row['runs'])}"
            f" s; {len(row['layers_split'])} layers split)")
    return out


def _fresh_vgg_decomposition() -> list[float]:
    """:func:`vgg_decomposition_times` in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.modern_cnns", "--vgg-decomposition-only"],
        check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def vgg_decomposition_times() -> list[float]:
    """Seconds of two calls of ``decompose_linen`` on VGG-16 at 224 with the authors' ranks."""
    import jax
    import jax.numpy as jnp

    from lrjax import decompose_linen, models

    vgg = models.get_model("vgg16")
    variables = jax.block_until_ready(models.init_variables(vgg, 224, 0))
    return [_time(lambda: decompose_linen(vgg, variables, jnp.zeros((1, 224, 224, 3)),
                                          rule="vgg16", train=False)) for _ in range(2)]


def _calls(module, variables, x, tmp, threads):
    import jax
    import numpy as np

    from lrjax import export

    fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
    path = os.path.join(tmp, f"m{len(os.listdir(tmp))}.onnx")
    export.to_onnx(module, variables, x, path, train=False)
    session = export.onnx_session(path, threads)
    xs = np.asarray(x)
    return {"jax": lambda: jax.block_until_ready(fn(variables, x)),
            "onnxruntime": lambda: session.run(None, {"input": xs})}


def speed(name, full, variables, variants, batches, repeats, threads, log) -> dict:
    """Full vs each low-rank variant (``{label: Decomposition}``), in JAX and ONNX Runtime."""
    import jax

    from lrjax import timing

    out = {}
    for batch in batches:
        x = jax.random.normal(jax.random.key(batch), (batch, *full_shape(name)))
        with tempfile.TemporaryDirectory() as tmp:
            contenders = {"full": _calls(full, variables, x, tmp, threads)}
            for label, result in variants.items():
                contenders[label] = _calls(result.module, result.variables, x, tmp, threads)
            for runtime in ("jax", "onnxruntime"):
                calls = {label: c[runtime] for label, c in contenders.items()}
                times = timing.steady_times(calls, repeats, min_time_s=1.0)
                base = median(times["full"])
                row = {"full_ms": 1e3 * base}
                for label in variants:
                    t = median(times[label])
                    row[f"{label}_ms"] = 1e3 * t
                    row[f"{label}_speedup"] = base / t
                    log(f"{name:<9} batch {batch}  {runtime:<12} {label:<22} "
                        f"{1e3 * base:9.1f} -> {1e3 * t:9.1f} ms  {base / t:5.2f}x "
                        f"(theory {variants[label].report.speedup:.2f}x)")
                out[f"batch{batch}_{runtime}"] = row
        del x
    out["theoretical"] = {label: r.report.speedup for label, r in variants.items()}
    out["by_kind"] = {label: {k: list(v) for k, v in r.report.by_kind().items()}
                      for label, r in variants.items()}
    return out


def time_by_kind(rows: dict, log) -> dict:
    """Per runtime and batch: for each ``*_only`` variant (one layer kind split), the time its
    pairs save and the multiply-adds they save, as fractions of the full net's."""
    out = {}
    by_kind = rows["by_kind"]
    full_macs = sum(before for before, _ in by_kind["speedup2"].values())
    for key, row in rows.items():
        if not key.startswith("batch"):
            continue
        for label in by_kind:
            if not label.endswith("_only"):
                continue
            kind = label[len("speedup2_"):-len("_only")]
            before, after = by_kind[label][kind]
            saved_ms = row["full_ms"] - row[f"{label}_ms"]
            out.setdefault(key, {})[kind] = {
                "macs_saved_fraction": (before - after) / full_macs,
                "time_saved_fraction": saved_ms / row["full_ms"], "time_saved_ms": saved_ms}
            log(f"resnet50 {key:<20} {kind:<6} multiply-adds saved "
                f"{(before - after) / full_macs:6.1%}  time saved {saved_ms / row['full_ms']:6.1%}"
                f" ({saved_ms:.1f} ms)")
    return out


def full_shape(name):
    return (128, 128, 3) if name == "unet" else (224, 224, 3)


def unet_speed(repeats, threads, log) -> dict:
    """The U-Net full vs low-rank (whole net, gated, transposed convs only), and each transposed
    conv alone against its pair, in JAX and ONNX Runtime."""
    import jax
    import jax.numpy as jnp

    from benchmarks.user_models import UNet
    from lrjax import costs, decompose_linen, runtimes, timing

    net, x = UNet(), jnp.zeros((1, *full_shape("unet")))
    variables = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False))(x)
    low = decompose_linen(net, variables, x, rule="speedup:2", train=False)
    transposed = [s for s in low.problem.sites if s.kind == "transposed"]
    half = {s.path: max(16, costs.breakeven_rank(s.shape) // 32 * 16) for s in transposed}
    variants = {"speedup2": low,
                "speedup2_measured_b1": decompose_linen(net, variables, x, train=False,
                                                        rule="speedup:2+measured"),
                "transposed_half_breakeven": decompose_linen(net, variables, x, rule=half,
                                                             train=False)}
    out = speed("unet", net, variables, variants, (1, 8), repeats, threads, log)
    out["transposed_ranks"] = half
    layers = {}
    for batch in (1, 8):
        for runtime, call in (("jax", None), ("onnxruntime", runtimes.layer_call("onnxruntime"))):
            times = timing.layer_times([s.shape for s in transposed], half, batch=batch,
                                       call=call)
            for s in transposed:
                full_s, pair_s = times[s.path]
                theory = costs.layer_speedup(s.shape, half[s.path])
                layers.setdefault(s.path, {"kernel": list(s.shape.kernel_shape),
                                           "input_hw": list(s.shape.input_hw),
                                           "rank": half[s.path], "theory": theory})[
                    f"batch{batch}_{runtime}"] = {"full_ms": 1e3 * full_s,
                                                  "pair_ms": 1e3 * pair_s,
                                                  "speedup": full_s / pair_s}
                log(f"unet layer {s.path:<16} batch {batch} {runtime:<12} rank {half[s.path]:>4}"
                    f" {1e3 * full_s:7.2f} -> {1e3 * pair_s:7.2f} ms  {full_s / pair_s:5.2f}x "
                    f"(theory {theory:.2f}x)")
    out["transposed_layers"] = layers
    return out


def main(argv=None) -> dict:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="bench_results/modern_cnns.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--models", default=MODELS,
                        help="comma-separated subset of resnet50,vgg16,unet")
    parser.add_argument("--vgg-decomposition-only", action="store_true",
                        help="print VGG-16's two decomposition times as JSON (what the run "
                        "measures in a fresh process)")
    args = parser.parse_args(argv)
    if args.vgg_decomposition_only:
        times = vgg_decomposition_times()
        print(json.dumps(times))
        return {"vgg16_224_authors_ranks": times}

    import jax
    import jax.numpy as jnp

    from benchmarks.user_models import resnet50
    from lrjax import decompose_linen, models
    from lrjax.ranks import load_ranks
    from lrjax.rules import RankRule

    models_run = set(args.models.split(","))
    unknown = models_run - {"resnet50", "vgg16", "unet"}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from resnet50, vgg16, unet")
    result = {"machine": machine("onnxruntime", "onnx"), "command": "python -m "
              "benchmarks.modern_cnns" + (f" --models {args.models}" if args.models != MODELS
                                          else ""), "vgg_fc_ranks": VGG_FC_RANKS}
    result["decomposition_time"] = {}
    if models_run & {"resnet50", "vgg16"}:
        result["decomposition_time"] = decomposition_times(print)
    if "unet" in models_run:
        from benchmarks.user_models import UNet

        result["decomposition_time"].update(speedup2_times("unet_128", UNet(), 128, print))
    if "unet" in models_run and not args.skip_speed:
        result["unet"] = unet_speed(args.repeats, args.threads, print)
    if "resnet50" in models_run and not args.skip_speed:
        x = jnp.zeros((1, 224, 224, 3))
        net = resnet50(num_classes=1000)
        variables = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False))(x)
        low = decompose_linen(net, variables, x, rule="speedup:2", train=False)
        variants = {"speedup2": low}
        for multiple in (16, 64):  # ranks rounded for the CPU's vector and GEMM block sizes
            variants[f"speedup2_multiple{multiple}"] = decompose_linen(
                net, variables, x, rule=f"speedup:2,multiple={multiple}", train=False)
        gate = {}
        for batch in (1, 8):  # whole-net 2x over the layers whose pairs are faster at a batch
            label = f"speedup2_measured_b{batch}_multiple64"
            t0 = time.perf_counter()
            try:
                variants[label] = decompose_linen(net, variables, x, measure_batch=batch,
                                                  rule="speedup:2+measured,multiple=64",
                                                  train=False)
            except ValueError as e:  # out of reach once the gate has kept layers full
                gate[label] = {"error": str(e)}
                print(f"{label}: {e}")
                continue
            gate[label] = {"seconds": time.perf_counter() - t0, "kept_full": sorted(
                p for p, why in variants[label].report.kept_full.items() if "timed in" in why)}
            print(f"{label}: {len(gate[label]['kept_full'])} layers kept full by the gate "
                  f"({gate[label]['seconds']:.0f} s)")
        for kind in ("kxk", "1x1", "dense"):  # the same ranks, one kind of layer at a time
            ranks = {p: r for p, r in low.ranks.items() if low.report.kinds[p] == kind}
            if ranks:
                variants[f"speedup2_{kind}_only"] = decompose_linen(net, variables, x,
                                                                    rule=ranks, train=False)
        result["resnet50"] = speed("resnet50", net, variables, variants, (1, 8),
                                   args.repeats, args.threads, print)
        result["resnet50"]["time_by_kind"] = time_by_kind(result["resnet50"], print)
        result["resnet50"]["measured_gate"] = gate
        del low, variants, variables
    if "vgg16" in models_run and not args.skip_speed:
        x = jnp.zeros((1, 224, 224, 3))
        vgg = models.get_model("vgg16")
        variables = models.init_variables(vgg, 224, 0)
        ranks = load_ranks("vgg16")
        convs = decompose_linen(vgg, variables, x, rule=ranks, train=False)
        with_fc = decompose_linen(vgg, variables, x, rule={**ranks, **VGG_FC_RANKS},
                                  train=False)
        # the same ranks behind the '+measured' gate: a layer whose pair is not faster in JAX
        # at batch 1 (timed alone) stays full
        gated = decompose_linen(vgg, variables, x, rule=RankRule(
            kind="map", ranks={**ranks, **VGG_FC_RANKS}, measured="jax",
            source="vgg16 + fc6/fc7 +measured:jax"), train=False, measure_batch=1)
        result["vgg16"] = speed("vgg16", vgg, variables,
                                {"authors_convs": convs, "authors_convs_fc6_fc7": with_fc,
                                 "authors_convs_fc6_fc7_measured": gated},
                                (1,), args.repeats, args.threads, print)
        result["vgg16"]["measured_kept_full"] = sorted(set(with_fc.ranks) - set(gated.ranks))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
