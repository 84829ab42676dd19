"""Models written by others, as published: found layers, whole-net `speedup:2` data-free and
calibrated (seconds, the report against XLA's own flop count), and the export to ONNX Runtime
and LiteRT.

The models are DarshanDeshpande/jax-models' timm-style ports (VAN, PVTv2, SegFormer, Swin), which
read their stochastic-depth rates with ``.item()`` inside ``__call__`` and so cannot run under
``jax.jit`` as written (lrjax traces them with their constant-only computations evaluated:
:func:`lrjax.linen_trace.constants_evaluated`). They are imported unmodified from a checkout given
by path (this machine has no network: ``git clone https://github.com/DarshanDeshpande/jax-models``
elsewhere), random weights, called as their own tests call them (``model.apply(v, x, True)``).

XLA's counts are of ``jax.jit(...).lower()`` (and ``.compile()``) under
:func:`lrjax.linen_trace.compile_time_constants`, as lrjax traces them: plain ``jax.jit`` fails
on them.

    python -m benchmarks.public_models --jax-models ~/src/jax-models \\
        --json bench_results/public_models.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.common import checkout_args, checkout_run, setup

# name: (registry function, input size, to_onnx keywords)
MODELS = {
    "van_tiny": ("van.van_tiny", 64, {}),
    "pvit_b0": ("pvit.pvit_b0", 64, {}),
    "segformer_b0": ("segformer.segformer_b0", 64, {}),
    "swin_tiny_224": ("swin_transformer.swin_tiny_224", 224, {"fixed_batch": True}),  # int(b / n)
}


def _floats(y) -> list:
    """A model's floating-point outputs (every leaf of a list, a dict, a dataclass pytree)."""
    import jax
    import jax.numpy as jnp

    return [a for a in jax.tree.leaves(y) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)]


def xla_flops(model, variables, args, compiled: bool) -> float:
    """XLA's flop count of ``model.apply(variables, *args)`` (lowered or compiled), traced as lrjax
    traces it: as ``jax.jit`` traces it, or, for a model whose call needs concrete values
    (``.item()`` of a ``jnp.linspace``), with its computations on constants evaluated as it is
    traced (:func:`lrjax.linen_trace.with_constants_evaluated`). Not under
    ``compile_time_constants`` for every model: it would leave out work on constants that the
    model's own ``jax.jit`` runs (a resize's interpolation weights)."""
    import jax

    from lrjax.linen_trace import with_constants_evaluated

    static = tuple(1 + i for i, a in enumerate(args) if not hasattr(a, "shape"))  # the flag

    def count(variables, *args):
        lowered = jax.jit(lambda v, *a: model.apply(v, *a), static_argnums=static).lower(
            variables, *args)
        return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]

    return with_constants_evaluated(count, variables, *args)


def decomposition_row(model, variables, args, calibration, flops, **keywords) -> dict:
    """A model's found layers by kind, its full-rank error and its whole-net `speedup:2`
    data-free and calibrated (seconds, the report against ``flops(module, variables,
    compiled)``'s ratios), called as ``model.apply(variables, *args, **keywords)`` (the error
    over every floating-point output); ``"result"``: the calibrated decomposition."""
    import jax.numpy as jnp

    import lrjax
    from lrjax import decompose, surgery

    listed = surgery.find_convs(model, *args, **keywords)
    found = [s for s in listed if s.candidate]
    if any(s.skip and "folds the wrapper" in s.skip for s in listed):  # (WeightNorm: as folded)
        found = [s for s in lrjax.decompose_linen(model, variables, *args, rule={},
                                                  **keywords).problem.sites if s.candidate]
    top = {s.path: decompose.max_rank(s.shape.kernel_shape, groups=s.shape.groups) for s in found}
    want = _floats(model.apply(variables, *args, **keywords))
    full = lrjax.decompose_linen(model, variables, *args, rule=top, **keywords)
    got = _floats(full.module.apply(full.variables, *args, **keywords))
    row = {"candidates_by_kind": {}, "left_as_is": sorted(full.report.skipped),
           "full_rank_max_error": max(float(jnp.max(jnp.abs(a - b)))
                                      for a, b in zip(got, want, strict=True)),
           "output_scale": max(float(jnp.max(jnp.abs(w))) for w in want)}
    for site in found:
        row["candidates_by_kind"][site.kind] = row["candidates_by_kind"].get(site.kind, 0) + 1
    flops_full = {c: flops(model, variables, c) for c in (False, True)}
    for method, calib in (("data-free", None), ("calibrated", calibration)):
        start = time.perf_counter()
        result = lrjax.decompose_linen(model, variables, *args, rule="speedup:2",
                                       calibration=calib, **keywords)
        seconds = time.perf_counter() - start
        row[method] = {
            "seconds": seconds, "report_speedup": result.report.speedup,
            "xla_lowered_speedup": flops_full[False] / flops(result.module, result.variables,
                                                             False),
            "xla_compiled_speedup": flops_full[True] / flops(result.module, result.variables,
                                                             True),
            "layers_split": len(result.report.ranks), "left_as_is": len(result.report.skipped)}
    row["result"] = result
    return row


def exported(result, example, *, tmp_dir: str, exporters=("onnx", "tflite"), onnx_kwargs=None,
             **apply_kwargs) -> dict:
    """``{format: {max_abs_error, scale, batches} or {error}}`` of a decomposition's module
    exported to each runtime of ``exporters`` (``lrjax.export.EXPORTERS``) on ``example``."""
    from lrjax import export

    rows = {}
    for fmt in exporters:
        extra = dict(onnx_kwargs or {}) if fmt == "onnx" else {}
        try:
            done = export.EXPORTERS[fmt](result.module, result.variables, example,
                                         os.path.join(tmp_dir, f"model.{fmt}"), **apply_kwargs,
                                         **extra)
            rows[fmt] = {"max_abs_error": done.max_abs_error, "scale": done.scale,
                         "batches": list(done.checked_batches), **extra}
        except export.ExportError as e:
            rows[fmt] = {"error": str(e)}
    return rows


def measure(model, variables, args, calibration, *, tmp_dir: str, exporters=("onnx", "tflite"),
            onnx_kwargs=None) -> dict:
    """One model's row: ``args`` its example call's positional arguments (the batch first)."""
    row = decomposition_row(model, variables, args, calibration,
                            lambda m, v, c: xla_flops(m, v, args, c))
    result = row.pop("result")
    kwargs = {"deterministic": True} if args[1:] == (True,) else {}
    row.update(exported(result, args[0], tmp_dir=tmp_dir, exporters=exporters,
                        onnx_kwargs=onnx_kwargs, **kwargs))
    return row


def _table(rows: dict) -> str:
    lines = [f"{'model':<15}{'k×k/1×1/dense':>15}{'full rank':>11}{'data-free':>26}"
             f"{'calibrated':>26}{'ONNX':>10}{'LiteRT':>10}"]
    for name, r in rows.items():
        kinds = r["candidates_by_kind"]
        cells = [f"{kinds.get('kxk', 0)}/{kinds.get('1x1', 0)}/{kinds.get('dense', 0)}",
                 f"{r['full_rank_max_error']:.1e}"]
        for method in ("data-free", "calibrated"):
            m = r[method]
            cells.append(f"{m['seconds']:.1f} s {m['report_speedup']:.3f} vs "
                         f"{m['xla_compiled_speedup']:.3f}")
        for fmt in ("onnx", "tflite"):
            e = r.get(fmt, {})
            cells.append(f"{e['max_abs_error']:.1e}" if "max_abs_error" in e else
                         ("error" if e else "-"))
        lines.append(f"{name:<15}{cells[0]:>15}{cells[1]:>11}{cells[2]:>26}{cells[3]:>26}"
                     f"{cells[4]:>10}{cells[5]:>10}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, names = checkout_args(
        parser, argv, flag="--jax-models", found=os.path.join("jax_models", "models"),
        help="a checkout of github.com/DarshanDeshpande/jax-models", models=MODELS,
        json="bench_results/public_models.json")

    import importlib

    import jax

    from lrjax.linen_trace import compile_time_constants

    sys.path.insert(0, os.path.abspath(args.jax_models))

    def row_of(name, tmp):
        factory, size, onnx_kwargs = MODELS[name]
        module, function = factory.split(".")
        model = getattr(importlib.import_module(f"jax_models.models.{module}"), function)(
            num_classes=10)
        x = jax.random.normal(jax.random.key(0), (args.batch, size, size, 3))
        calibration = jax.random.normal(jax.random.key(1),
                                        (args.calibration_images, size, size, 3))
        with compile_time_constants():  # compiled: eagerly, every initializer op by op
            variables = jax.jit(lambda rngs, x, m=model: m.init(rngs, x, True))(
                {"params": jax.random.key(0), "dropout": jax.random.key(1),
                 "drop_path": jax.random.key(2)}, x)
        return measure(model, variables, (x, True), calibration, tmp_dir=tmp,
                       onnx_kwargs=onnx_kwargs)

    return checkout_run("public_models", argv, ("jax_models", args.jax_models), names, row_of,
                        _table, args.json)


if __name__ == "__main__":
    main()
