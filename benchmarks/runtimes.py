"""Full vs low-rank nets in the runtimes they deploy to: JAX (XLA:CPU), ONNX Runtime (CPU EP),
LiteRT (XNNPACK), with PyTorch eager on the same architecture as a reference point.

Every net is timed full and low-rank side by side in each runtime (contenders in turns, in
steady state, median of at least ``--repeats`` calls; see ``MIN_TIME_S``), from the same weights:
the JAX models are exported with ``lrjax.export`` (each export checked against JAX before it is
timed). Nets: VGG-16 (the authors' ranks; batch 1 and 8), its conv stack alone
(``vgg16-convs``: the same net with a 16-wide classifier, so that the 0.5 GB of memory-bound
fully connected weights, read once per call by full and low-rank nets alike, are out of the
ratio), CaffeNet (the authors' ranks), NIN (the authors' ranks) and a ResNet-18 in the Flax
examples' style compressed by ``decompose_linen`` (``speedup:2``). Also: each VGG-16 layer
alone, full conv vs pair, per runtime (theoretical vs actual speedup; ``--layers-only``), and
the low-rank VGG-16 with ranks rounded to multiples of 8 and 16 (the runtimes' channel blocks).

    python -m benchmarks.runtimes --json bench_results/runtimes.json
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from benchmarks import common
from lrjax import cost_report, timing

NETS = {  # name: (family or "resnet18", input size, batches, model keyword arguments)
    "vgg16": ("vgg16", 224, (1, 8), {}),
    "vgg16-convs": ("vgg16", 224, (1, 8), {"fc_features": 16}),
    "caffenet": ("caffenet", 227, (1,), {}),
    "nin": ("nin", 32, (16,), {}),
    "resnet18": ("resnet18", 112, (1,), {}),
}
RUNTIMES = ("jax", "onnxruntime", "litert", "pytorch")
# Nets and layers are timed in steady state (``lrjax.timing.steady_times``: each turn a pause, one
# untimed call, then a burst of timed calls back to back), with at least MIN_TIME_S seconds of
# timed calls per contender (at most 100 turns), so that the few-millisecond nets and the single
# layers get a median over enough calls.
MIN_TIME_S = 0.5


def _steady_times(calls, repeats):
    """Steady-state times of the calls (about ``repeats`` per contender, or more)."""
    return timing.steady_times(calls, repeats, min_time_s=MIN_TIME_S)


def _net(name, seed=0):
    """(full module, its random variables, the rank rule of its low-rank twin, example input)."""
    import jax
    import jax.numpy as jnp

    from lrjax import models

    family, size, _, kwargs = NETS[name]
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    if family == "resnet18":
        from benchmarks.user_models import resnet18

        full = resnet18(num_classes=100)
        variables = full.init(jax.random.key(seed), x, train=False)
        rule = "speedup:2"
    else:
        full = models.get_model(family, **kwargs)
        variables = models.init_variables(full, size, seed)
        rule = models.model_spec(family).ranks
    return full, variables, rule, x


def _lowrank(full, variables, rule, x, multiple=None):
    from lrjax.surgery import decompose_linen, find_convs

    result = decompose_linen(full, variables, x, rule=rule, multiple=multiple, train=False)
    order = [dict(result.module.ranks).get(s.path) for s in find_convs(full, x, train=False)]
    return result, order


def _jax_call(module, variables, x):
    import jax

    fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
    return lambda: jax.block_until_ready(fn(variables, x))


def _onnx_call(module, variables, x, threads, tmp):
    from lrjax import export

    path = os.path.join(tmp, f"m{len(os.listdir(tmp))}.onnx")
    export.to_onnx(module, variables, x, path, train=False)
    session = export.onnx_session(path, threads)
    xs = np.asarray(x)
    call = lambda: session.run(None, {"input": xs})  # noqa: E731
    call.onnx_path = path
    return call


def onnx_breakdown(path: str, x, threads: int, runs: int = 5) -> dict:
    """Where an ONNX model's time goes in ONNX Runtime, in context (its profiler).

    Returns ``{"conv_ms", "dense_ms", "other_ms", "total_ms", "conv_nodes_ms"}``: medians over
    ``runs`` calls of the summed kernel times of the Conv nodes (after ONNX Runtime's fusions:
    bias, ReLU), of the Gemm/MatMul nodes and of everything else (pools, layout reorders,
    reshapes); and each Conv node's median time, in execution order (a pair is two nodes).
    """
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.splitext(path)[0] + "_profile"
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    xs = np.asarray(x)
    session.run(None, {"input": xs})  # warm-up (weight packing); its events are dropped below
    for _ in range(runs):
        session.run(None, {"input": xs})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    calls = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    per_call = {k: [0.0] * len(calls) for k in ("conv_ms", "dense_ms", "other_ms")}
    conv_nodes: dict[str, list] = {}  # node name -> its time in each timed call
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = sum(c["ts"] <= e["ts"] for c in calls) - 1
        if i < 1:  # the warm-up call
            continue
        op = e["args"].get("op_name", "")
        key = "conv_ms" if op in ("Conv", "FusedConv") else \
            "dense_ms" if op in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul") else "other_ms"
        per_call[key][i] += e["dur"] / 1e3
        if key == "conv_ms":
            conv_nodes.setdefault(e["name"], []).append(e["dur"] / 1e3)
    out = {k: float(np.median(v[1:])) for k, v in per_call.items()}
    out["total_ms"] = sum(out.values())
    out["conv_nodes_ms"] = [float(np.median(v)) for v in conv_nodes.values()]
    return out


def _litert_call(module, variables, x, threads, tmp):
    from lrjax import export

    path = os.path.join(tmp, f"m{len(os.listdir(tmp))}.tflite")
    export.to_tflite(module, variables, x, path, train=False)
    run = export.litert_runner(export.litert_interpreter(open(path, "rb").read(), threads))
    xs = np.asarray(x)
    return lambda: run(xs)


def _torch_call(builder, ranks, x, threads, channels_last):
    import torch

    torch.set_num_threads(threads)
    model = builder(ranks).eval()
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            model(xt)

    return run


def bench_net(name, batch, runtimes, repeats, threads, tmp, log, rounding=False):
    from benchmarks import torch_models

    full, variables, rule, x1 = _net(name)
    x = np.random.default_rng(0).standard_normal((batch, *x1.shape[1:])).astype(np.float32)
    variants = {"full": (full, variables, None)}
    low, order = _lowrank(full, variables, rule, x1)
    variants["lowrank"] = (low.module, low.variables, order)
    result = {"batch": batch, "input": list(x.shape[1:]), "rule": rule,
              "theoretical_speedup": low.report.net.speedup, "ranks": low.ranks}
    if rounding:
        for m in (8, 16):
            r, o = _lowrank(full, variables, rule, x1, multiple=m)
            variants[f"lowrank, ranks x{m}"] = (r.module, r.variables, o)
            result[f"theoretical_speedup_x{m}"] = r.report.net.speedup
            result[f"mean_relative_error_x{m}"] = float(np.mean(list(r.report.errors.values())))
        result["mean_relative_error"] = float(np.mean(list(low.report.errors.values())))
    calls = {}
    for label, (module, v, order) in variants.items():
        if "jax" in runtimes:
            calls[("jax", label)] = _jax_call(module, v, x)
        if "onnxruntime" in runtimes:
            calls[("onnxruntime", label)] = _onnx_call(module, v, x, threads, tmp)
        if "litert" in runtimes:
            calls[("litert", label)] = _litert_call(module, v, x, threads, tmp)
        if "pytorch" in runtimes and name in torch_models.BUILDERS:
            for cl in (False, True):
                fmt = "channels_last" if cl else "NCHW"
                calls[(f"pytorch {fmt}", label)] = _torch_call(
                    torch_models.BUILDERS[name],
                    None if order is None else order, x, threads, cl)
    times = _steady_times(calls, repeats)
    med = {f"{rt} | {label}": common.median(t) for (rt, label), t in times.items()}
    result["median_s"] = med
    result["runs_s"] = {f"{rt} | {label}": t for (rt, label), t in times.items()}
    speedups = {}
    for rt in sorted({rt for rt, _ in times}):
        for label in variants:
            if label != "full" and (rt, label) in times:
                speedups[f"{rt} | {label}"] = med[f"{rt} | full"] / med[f"{rt} | {label}"]
    result["speedups"] = speedups
    result["onnxruntime_breakdown"] = {
        label: onnx_breakdown(calls[("onnxruntime", label)].onnx_path, x, threads)
        for label in variants if ("onnxruntime", label) in calls}
    for label, b in result["onnxruntime_breakdown"].items():
        log(f"{name}@{batch} onnxruntime profile | {label:<20} conv {b['conv_ms']:8.2f} ms, "
            f"dense {b['dense_ms']:7.2f} ms, other {b['other_ms']:7.2f} ms")
    for key, v in med.items():
        log(f"{name}@{batch} {key:<42} {v * 1e3:9.2f} ms")
    for key, v in speedups.items():
        log(f"{name}@{batch} speedup {key:<34} {v:5.2f}x (theory "
            f"{result['theoretical_speedup']:.2f}x)")
    return result


def bench_gated(name, batch, runtimes, repeats, threads, tmp, log):
    """Full vs the authors' low-rank net vs the same with ``+measured:<runtime>`` (each pair kept
    only where it is faster than its conv in that runtime, timed alone at this batch), per
    runtime."""
    from lrjax.surgery import decompose_linen

    full, variables, rule, x1 = _net(name)
    x = np.random.default_rng(0).standard_normal((batch, *x1.shape[1:])).astype(np.float32)
    low, _ = _lowrank(full, variables, rule, x1)
    makers = {"onnxruntime": _onnx_call, "litert": _litert_call}
    out = {}
    for rt in runtimes:
        if rt not in makers:
            continue
        gated = decompose_linen(full, variables, x1, rule=f"{rule}+measured:{rt}",
                                measure_batch=batch, train=False)
        kept_full = sorted(set(low.ranks) - set(gated.ranks))
        calls = {label: makers[rt](m, v, x, threads, tmp) for label, (m, v) in {
            "full": (full, variables), "lowrank": (low.module, low.variables),
            "lowrank gated": (gated.module, gated.variables)}.items()}
        times = _steady_times(calls, repeats)
        med = {k: common.median(v) for k, v in times.items()}
        out[rt] = {"kept_full": kept_full, "median_s": med,
                   "theoretical_speedup_gated": gated.report.net.speedup,
                   "speedup": med["full"] / med["lowrank"],
                   "speedup_gated": med["full"] / med["lowrank gated"]}
        log(f"{name}@{batch} {rt}: kept full {kept_full}; full {med['full'] * 1e3:.1f} ms, "
            f"low-rank {med['lowrank'] * 1e3:.1f} ms ({out[rt]['speedup']:.2f}x), gated "
            f"{med['lowrank gated'] * 1e3:.1f} ms ({out[rt]['speedup_gated']:.2f}x, theory "
            f"{gated.report.net.speedup:.2f}x)")
    return out


def bench_layers(runtimes, repeats, threads, tmp, log, batch=1):
    """Each VGG-16 layer alone, full conv vs pair, in each runtime."""
    import flax.linen as nn
    import jax

    from lrjax import costs, ranks
    from lrjax.layers import LowRankConv

    rank_map = ranks.load_ranks("vgg16")
    rows = []
    for layer in cost_report.zoo_conv_shapes("vgg16", 224):
        r = rank_map[layer.name]
        x = np.random.default_rng(0).standard_normal(
            (batch, *layer.input_hw, layer.in_channels)).astype(np.float32)
        mods = {"full": nn.Conv(layer.out_channels, (3, 3), padding=1),
                "pair": LowRankConv(layer.out_channels, (3, 3), rank=r, padding=1)}
        calls = {}
        for label, m in mods.items():
            v = m.init(jax.random.key(0), x[:1])
            if "jax" in runtimes:
                f = jax.jit(m.apply)
                calls[("jax", label)] = (lambda f=f, v=v, x=x: jax.block_until_ready(f(v, x)))
            wrapped = _Plain(m)
            if "onnxruntime" in runtimes:
                calls[("onnxruntime", label)] = _onnx_call(wrapped, v, x, threads, tmp)
            if "litert" in runtimes:
                calls[("litert", label)] = _litert_call(wrapped, v, x, threads, tmp)
            if "pytorch" in runtimes:
                import torch

                from benchmarks.torch_models import _conv

                conv = _conv(layer.in_channels, layer.out_channels, 3,
                             None if label == "full" else r, padding=1).eval()
                xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(
                    memory_format=torch.channels_last)
                conv = conv.to(memory_format=torch.channels_last)

                def run(conv=conv, xt=xt):
                    with torch.inference_mode():
                        conv(xt)

                calls[("pytorch channels_last", label)] = run
        times = _steady_times(calls, repeats)
        row = {"layer": layer.name, "rank": r,
               "theoretical_speedup": costs.layer_speedup(layer, r)}
        for rt in sorted({rt for rt, _ in times}):
            full_s, pair_s = (common.median(times[(rt, k)]) for k in ("full", "pair"))
            row[rt] = {"full_ms": full_s * 1e3, "pair_ms": pair_s * 1e3,
                       "speedup": full_s / pair_s}
        rows.append(row)
        log(f"{layer.name:<8} rank {r:4d} theory {row['theoretical_speedup']:.2f}x  " + "  ".join(
            f"{rt} {row[rt]['full_ms']:.1f}->{row[rt]['pair_ms']:.1f} ms "
            f"({row[rt]['speedup']:.2f}x)" for rt in sorted({rt for rt, _ in times})))
    return rows


def headline(net: dict) -> dict:
    """The low-rank net in its fastest runtime vs the full net in PyTorch's fastest format."""
    med = net["median_s"]
    lowrank = {k: v for k, v in med.items() if k.endswith("| lowrank")}
    fastest = min(lowrank, key=lowrank.get)
    torch_full = [v for k, v in med.items() if k.startswith("pytorch") and k.endswith("| full")]
    best_torch = min(torch_full) if torch_full else None
    return {"fastest_lowrank_runtime": fastest.split(" | ")[0],
            "fastest_lowrank_ms": lowrank[fastest] * 1e3,
            "pytorch_full_ms": None if best_torch is None else best_torch * 1e3,
            "over_pytorch_full": None if best_torch is None else best_torch / lowrank[fastest]}


class _Plain:
    """A single conv module with the ``train=`` keyword the exporters pass."""

    def __init__(self, module):
        self.module = module

    def apply(self, variables, x, train=False):
        del train
        return self.module.apply(variables, x)


def main(argv=None):
    common.setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-layers", action="store_true")
    parser.add_argument("--layers-only", action="store_true",
                        help="only each VGG-16 layer alone, full conv vs pair")
    parser.add_argument("--gated-only", action="store_true",
                        help="only the '+measured:<runtime>' comparison (VGG-16, batch 1 and 8)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    runtimes = args.runtimes.split(",")
    log = lambda s: print(s, flush=True)  # noqa: E731
    import importlib.metadata

    versions = {}
    for pkg in ("onnxruntime", "onnx", "ai-edge-litert", "tensorflow-cpu", "tensorflow", "torch"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    result = {"machine": common.machine(), "runtime_versions": versions,
              "threads": args.threads, "repeats": args.repeats, "settle_s": timing.SETTLE_S,
              "min_time_s": MIN_TIME_S, "burst": timing.STEADY_BURST,
              "burst_warmup": timing.STEADY_WARMUP,
              "nets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.gated_only:
            result["gated"] = {f"vgg16@{b}": bench_gated("vgg16", b, runtimes, args.repeats,
                                                         args.threads, tmp, log)
                               for b in NETS["vgg16"][2]}
            if args.json:
                common.write_json(args.json, result)
            return result
        for name in [] if args.layers_only else args.nets.split(","):
            for batch in NETS[name][2]:
                result["nets"][f"{name}@{batch}"] = bench_net(
                    name, batch, runtimes, args.repeats, args.threads, tmp, log,
                    rounding=(name == "vgg16" and batch == 1))
        if not args.no_layers:
            result["vgg16_layers"] = bench_layers(runtimes, args.repeats, args.threads, tmp, log)
    result["headline"] = {key: headline(result["nets"][key]) for key in ("vgg16@1", "vgg16@8")
                          if key in result["nets"]}
    log(f"headline: {result['headline']}")
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
