"""Export a model to the runtimes it is deployed with: ONNX (ONNX Runtime), LiteRT (TFLite) and
serialized StableHLO (``jax.export``). Each export is checked before it is written: the runtime's
output on a random batch must match JAX's within the stated tolerance, else :class:`ExportError`
and no file.

    python -m lrjax.export --model vgg16 --ranks vgg16 --format onnx --output lowrank_vgg16.onnx

Works for zoo models, for what :func:`lrjax.decompose_linen` and :func:`lrjax.decompose_nnx`
return, and for any model whose inference pass takes one NHWC image batch: a linen module with its
variables (``module.apply(variables, x, **apply_kwargs)``, e.g. ``train=False``) or an NNX model
with ``variables=None`` (called as ``model(x, **apply_kwargs)`` on an eval-mode view: batch norm on
its running statistics, dropout off; the model itself is not changed). Exports are traced under
the ``"portable"`` formulation policy (plain XLA ops: convs stay convs, so a pair becomes two
``Conv`` / ``CONV_2D`` nodes), in inference mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import checkpoint, formulations

__all__ = ["to_onnx", "to_tflite", "to_stablehlo", "ExportError", "ExportResult", "FORMATS",
           "onnx_session", "litert_interpreter", "fold_conv_affine", "RTOL", "ATOL"]

FORMATS = ("onnx", "tflite", "stablehlo")
RTOL, ATOL = 1e-4, 1e-5  # |runtime - JAX| <= ATOL + RTOL * max|JAX| (float32)


class ExportError(ValueError):
    """An export that could not be produced or did not reproduce JAX's outputs."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """A written export and how well it matched JAX."""

    path: str
    format: str
    max_abs_error: float  # largest |runtime - JAX| over the checked batches
    scale: float  # max |JAX output|
    checked_batches: tuple[int, ...]
    size_bytes: int


def _fn(module, variables, apply_kwargs):
    """The inference function ``x -> output`` of a linen module and its variables, or of an NNX
    model (``variables=None``) in eval mode."""
    from flax import nnx

    if isinstance(module, nnx.Module):
        if variables is not None:
            raise ExportError(f"{type(module).__name__} is an NNX model, which carries its own "
                              f"state: pass variables=None (got a {type(variables).__name__})")
        model = nnx.view(module, deterministic=True, use_running_average=True,
                         raise_if_not_found=False)
        return lambda x: model(x, **apply_kwargs)
    if variables is None:
        raise ExportError(f"{type(module).__name__} is a linen module: pass its variables "
                          "(variables=None is for NNX models)")

    def forward(x):
        return module.apply(variables, x, **apply_kwargs)

    return forward


def _check_input(example_input):
    shape = tuple(np.shape(example_input))
    if len(shape) != 4:
        raise ExportError(f"example_input must be an NHWC batch (N, H, W, C); got shape {shape}")
    return shape


def _writable(path: str) -> str:
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {path}: directory {parent} is not writable")
    return path


def _write(path: str, data: bytes) -> int:
    checkpoint.atomic_write(path, lambda f: f.write(data), binary=True)
    return len(data)


def _symbolic_batch(shape) -> jax.ShapeDtypeStruct:
    """A float32 input of ``shape`` with a symbolic batch dimension ``b``."""
    dims = ", ".join(map(str, shape[1:]))
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {dims}"), jnp.float32)


def _compare(run, forward, shape, batches, what) -> tuple[float, float]:
    """Run the export and JAX on random batches; raise ExportError past the tolerance."""
    worst, scale = 0.0, 0.0
    for i, b in enumerate(batches):
        x = np.random.default_rng(i).standard_normal((b, *shape[1:])).astype(np.float32)
        want = np.asarray(forward(x), np.float32)
        got = np.asarray(run(x), np.float32)
        if got.shape != want.shape:
            raise ExportError(f"{what} output has shape {got.shape}, JAX's {want.shape}")
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        top = float(np.max(np.abs(want))) if want.size else 0.0
        if not np.isfinite(err) or err > ATOL + RTOL * top:
            raise ExportError(f"{what} does not match JAX on a batch of {b}: max |difference| "
                              f"{err:.3g} > {ATOL:g} + {RTOL:g} * {top:.3g}; nothing written")
        worst, scale = max(worst, err), max(scale, top)
    return worst, scale


# ---------------------------------------------------------------------------------------------
# StableHLO


def to_stablehlo(module, variables, example_input, path: str, *, platforms=("cpu",),
                 check: bool = True, **apply_kwargs) -> ExportResult:
    """Serialize the inference function with ``jax.export``, batch dimension symbolic.

    The artifact holds StableHLO for ``platforms``; ``jax.export.deserialize(data).call(x)``
    runs it (any batch size). Checked by deserializing it and running batches of the example's
    size and one more.
    """
    shape = _check_input(example_input)
    path = _writable(path)
    forward = _fn(module, variables, apply_kwargs)
    spec = _symbolic_batch(shape)
    with formulations.policy("portable"):
        exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(spec)
    data = bytes(exported.serialize())
    batches = (shape[0], shape[0] + 1)
    err, scale = 0.0, 0.0
    if check and "cpu" in platforms:
        restored = jax.export.deserialize(bytearray(data))
        err, scale = _compare(restored.call, forward, shape, batches, "the StableHLO artifact")
    size = _write(path, data)
    return ExportResult(path, "stablehlo", err, scale, batches if check else (), size)


# ---------------------------------------------------------------------------------------------
# ONNX


def _per_channel(value: np.ndarray, n: int):
    """A constant as ``(n,)`` per-output-channel values of an NCHW tensor, or None."""
    if value.size == 1:
        return np.full((n,), value.reshape(()))
    if value.shape in ((1, n, 1, 1), (n, 1, 1)):
        return value.reshape(n)
    return None


def fold_conv_affine(model) -> int:
    """Fold per-channel ``Mul``/``Add``/``Sub`` by constants that directly follow a ``Conv`` (batch
    norm in inference, biases) into the conv's weight and bias, in place; returns how many were
    folded. A conv whose output has any other use is left alone."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded = 0
    while True:
        consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        match = None
        for node in graph.node:
            users = consumers.get(node.output[0], [])
            if node.op_type != "Conv" or node.output[0] in outputs or len(users) != 1:
                continue
            user = users[0]
            if user.op_type not in ("Mul", "Add", "Sub") or len(user.input) != 2:
                continue
            const = user.input[1] if user.input[0] == node.output[0] else user.input[0]
            if const not in inits or (user.op_type == "Sub" and user.input[1] != const):
                continue
            weight = numpy_helper.to_array(inits[node.input[1]])
            values = _per_channel(numpy_helper.to_array(inits[const]), weight.shape[0])
            if values is not None:
                match = (node, user, weight, values.astype(weight.dtype))
                break
        if match is None:
            break
        node, user, weight, values = match
        bias = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2
                else np.zeros((weight.shape[0],), weight.dtype))
        if user.op_type == "Mul":
            weight, bias = weight * values.reshape(-1, 1, 1, 1), bias * values
        else:
            bias = bias + (values if user.op_type == "Add" else -values)
        names = []
        for kind, array in (("w", weight), ("b", bias)):
            name = f"{user.output[0]}_{kind}"
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
            graph.initializer.append(tensor)
            inits[name] = tensor
            names.append(name)
        conv = helper.make_node("Conv", [node.input[0], *names], [user.output[0]],
                                **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        index = list(graph.node).index(node)
        graph.node.remove(user)
        graph.node.remove(node)
        graph.node.insert(index, conv)
        folded += 1
    used = {name for n in graph.node for name in n.input}
    for tensor in list(graph.initializer):
        if tensor.name not in used:
            graph.initializer.remove(tensor)
    return folded


def onnx_session(model_or_path, threads: int | None = None):
    """An ONNX Runtime CPU session (all graph optimisations), ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    data = model_or_path if isinstance(model_or_path, (str, bytes)) \
        else model_or_path.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def to_onnx(module, variables, example_input, path: str, *, fold: bool = True,
            check: bool = True, **apply_kwargs) -> ExportResult:
    """Export to ONNX (opset 17) with a symbolic ``batch`` input dimension.

    ``module, variables``: a linen module and its variables, or an NNX model and ``None`` (run
    in eval mode; the same for every exporter here). ``example_input``: an NHWC float32 batch
    ``(N, H, W, C)``; ``**apply_kwargs`` go to the call (e.g. ``train=False``).

    The inference jaxpr is translated by :mod:`lrjax.onnx_convert` (convs as ONNX ``Conv`` in
    NCHW, groups and dilation mapped). With ``fold``, per-channel affine ops right after a conv
    (batch norm in inference) are folded into it. Checked with ONNX Runtime on batches of the
    example's size and one more.
    """
    from lrjax import onnx_convert

    shape = _check_input(example_input)
    path = _writable(path)
    forward = _fn(module, variables, apply_kwargs)
    spec = _symbolic_batch(shape)
    with formulations.policy("portable"):
        closed = jax.make_jaxpr(forward)(spec)
    try:
        model = onnx_convert.jaxpr_to_onnx(closed, graph_name=type(module).__name__)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if fold:
        fold_conv_affine(model)
    data = model.SerializeToString()
    batches = (shape[0], shape[0] + 1)
    err, scale = 0.0, 0.0
    if check:
        session = onnx_session(data)
        err, scale = _compare(lambda x: session.run(None, {"input": x})[0], forward, shape,
                              batches, "ONNX Runtime")
    size = _write(path, data)
    return ExportResult(path, "onnx", err, scale, batches if check else (), size)


# ---------------------------------------------------------------------------------------------
# LiteRT


def litert_interpreter(model_content: bytes, threads: int | None = None):
    """A LiteRT interpreter (``ai_edge_litert``; XNNPACK delegate by default), tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_content, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def litert_runner(interpreter):
    """``x -> output`` through a LiteRT interpreter with one input and one output."""
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]

    def run(x):
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)

    return run


def to_tflite(module, variables, example_input, path: str, *, check: bool = True,
              **apply_kwargs) -> ExportResult:
    """Export to a LiteRT (TFLite) flatbuffer of builtin ops, at the example's batch size.

    Route: ``jax2tf.convert`` -> ``tf.function`` -> ``TFLiteConverter`` (builtin ops only, so a
    pair becomes two ``CONV_2D``); float32. Checked with ``ai_edge_litert``'s interpreter on a
    batch of the example's size. The batch is fixed on purpose: the same VGG-16 converted with a
    dynamic batch (``polymorphic_shapes``, input signature ``[-1, 224, 224, 3]``) ran 2.4x
    (full) and 4.7x (low-rank) slower in LiteRT at batch 8 (514 -> 1245 ms, 202 -> 960 ms).
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    shape = _check_input(example_input)
    path = _writable(path)
    forward = _fn(module, variables, apply_kwargs)
    with formulations.policy("portable"):
        converted = jax2tf.convert(forward, with_gradient=False)
        fn = tf.function(converted, autograph=False,
                         input_signature=[tf.TensorSpec(shape, tf.float32)])
        concrete = fn.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        data = converter.convert()
    except Exception as e:  # the converter raises several types for unsupported graphs
        raise ExportError(f"the TFLite converter failed: {str(e).splitlines()[0]}") from None
    batches = (shape[0],)
    err, scale = 0.0, 0.0
    if check:
        run = litert_runner(litert_interpreter(data))
        err, scale = _compare(run, forward, shape, batches, "LiteRT")
    size = _write(path, data)
    return ExportResult(path, "tflite", err, scale, batches if check else (), size)


EXPORTERS = {"onnx": to_onnx, "tflite": to_tflite, "stablehlo": to_stablehlo}


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from lrjax import models, surgery

    p = argparse.ArgumentParser(prog="python -m lrjax.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=f"zoo family: {', '.join(models.MODELS)}")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True)
    p.add_argument("--checkpoint", default=None,
                   help="full-rank variables (.npz / Orbax); default: random weights")
    p.add_argument("--ranks", default=None,
                   help="decompose on the way with this rank rule: " + surgery.RULE_HELP)
    p.add_argument("--multiple", type=int, default=DEFAULT_MULTIPLE,
                   help="round ranks to multiples of this, for the runtimes' blocked conv "
                        f"kernels (default {DEFAULT_MULTIPLE}; 1: no rounding)")
    p.add_argument("--bn", action="store_true", help="the checkpoint is of the BN variant")
    p.add_argument("--fold-bn", default=None, help="fold batch norms first: 'conv1:bn1,...'")
    p.add_argument("--batch", type=int, default=1, help="batch of the check (and of a TFLite "
                                                       "model; ONNX/StableHLO batches are free)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    return p


# ONNX Runtime's NCHWc conv kernels pad channels to blocks of 8 (AVX2) or 16 (AVX-512); ranks
# rounded to 8 measured as fast as the unrounded ones in every runtime, at a lower error and
# without extra MACs on AVX2 (BENCHMARKS.md, "ranks that suit the runtime").
DEFAULT_MULTIPLE = 8
# where a '+measured' rank rule times the layers, per export format
MEASURED_RUNTIME = {"onnx": "onnxruntime", "tflite": "litert", "stablehlo": "jax"}


def export_zoo(args) -> tuple[ExportResult, str]:
    """Run the export described by parsed command-line ``args``; returns the result and a report
    of what was decomposed (empty without ``--ranks``)."""
    from lrjax import convert, models, surgery

    spec = models.model_spec(args.model)
    size = args.image_size or spec.image_size
    if args.batch < 1:
        raise ExportError(f"--batch must be positive; got {args.batch}")
    path = _writable(args.output)
    if os.path.exists(path) and not args.overwrite:
        raise ExportError(f"{path} exists; pass --overwrite to replace it")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    full = models.get_model(args.model, bn=args.bn, **kwargs)
    variables = (checkpoint.load_variables(args.checkpoint) if args.checkpoint
                 else models.init_variables(full, size))
    fold = convert.parse_fold_bn(args.fold_bn)
    module, report = full, ""
    if args.ranks:
        multiple = None if args.multiple in (None, 1) else args.multiple
        common = dict(bn=args.bn, image_size=size, fold_bn=fold, **kwargs)
        rule = args.ranks
        if rule.endswith("+measured"):  # time the layers where the export will run
            rule += ":" + MEASURED_RUNTIME[args.format]
        _, result = convert.decompose_checkpoint(args.model, variables, rule,
                                                 multiple=multiple, measure_batch=args.batch,
                                                 **common)
        report = result.report.table()
        split = {p for p, r in result.ranks.items() if r is not None}
        if multiple and split:  # what the rounding costs, over the layers split (a gate keeps some)
            base = rule.partition("+measured")[0]
            _, plain = convert.decompose_checkpoint(args.model, variables, base, **common)
            unrounded_error = np.mean([e for p, e in plain.report.errors.items() if p in split])
            layers = plain.report.net.layers
            unrounded_speedup = plain.report.net.full_macs / sum(
                (lc.lowrank if lc.name in split else lc.full).macs for lc in layers)
            report += (f"\nranks rounded to multiples of {multiple}: mean relative kernel error "
                       f"{np.mean(list(result.report.errors.values())):.4f} (unrounded "
                       f"{unrounded_error:.4f}); theoretical speedup "
                       f"{result.report.net.speedup:.2f}x (unrounded {unrounded_speedup:.2f}x)")
        module, variables = result.module, result.variables
    else:
        surgery.check_variables(full, variables, np.zeros((1, size, size, 3), np.float32),
                                train=False)
        if fold:
            variables = surgery.fold_batch_norms(variables, fold)
            module = models.get_model(args.model, bn=False, **kwargs)
    x = np.zeros((args.batch, size, size, 3), np.float32)
    return EXPORTERS[args.format](module, variables, x, path, train=False), report


def main(argv=None) -> int:
    from lrjax import xla_flags

    xla_flags.use_recommended_flags()
    args = build_parser().parse_args(argv)
    try:
        result, report = export_zoo(args)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report:
        print(report)
    print(f"wrote {result.path} ({result.format}, {result.size_bytes:,} bytes); checked on "
          f"batches {list(result.checked_batches)}: max |difference| {result.max_abs_error:.2e} "
          f"(outputs up to {result.scale:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
