"""Export a model to the runtimes it is deployed with: ONNX (ONNX Runtime), LiteRT (TFLite) and
serialized StableHLO (``jax.export``). Each export is checked before it is written: the runtime's
output on a random batch must match JAX's within the stated tolerance, else :class:`ExportError`
and no file. The conversions themselves are :mod:`lrjax.runtimes`'; the command line
(``python -m lrjax.export``) is :mod:`lrjax.cli.export`.

Works for zoo models, for what :func:`lrjax.decompose_linen` and :func:`lrjax.decompose_nnx`
return, and for any model whose inference pass takes one NHWC image batch: a linen module with its
variables (``module.apply(variables, x, **apply_kwargs)``, e.g. ``train=False``) or an NNX model
with ``variables=None`` (called as ``model(x, **apply_kwargs)`` on an eval-mode view: batch norm on
its running statistics, dropout off; the model itself is not changed). Exports are traced under
the ``"portable"`` formulation policy (plain XLA ops: convs stay convs, so a pair becomes two
``Conv`` / ``CONV_2D`` nodes), in inference mode.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import checkpoint, formulations, linen_trace, moments, replay, runtimes, surgery
from lrjax.export.failures import (
    CONDITIONED,
    converter_failure,
    mismatch_cause,
    rounding_jitter,
    user_layer,
)
from lrjax.linen_trace import check_model_kind, constants_evaluated
from lrjax.nnx_surgery import eval_view, graph_keywords
from lrjax.nnx_views import drawn_streams
from lrjax.runtimes import litert_interpreter, litert_runner, onnx_session

__all__ = ["to_onnx", "to_tflite", "to_stablehlo", "ExportError", "ExportResult", "FORMATS",
           "EXPORTERS", "onnx_session", "litert_interpreter", "litert_runner", "writable_path",
           "converter_failure", "user_layer", "RTOL", "ATOL"]

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
    conditioning: float = 0.0  # JAX's own output move under one rounding of its inputs and
    # values, where the check took it as the tolerance (ill-conditioned: up to CONDITIONED x it)


def _dense_as_conv(next_fun, args, kwargs, context):
    """Method interceptor: a linen dense layer contracting the last axis of an NHWC-shaped
    (rank-4) input is computed as the 1x1 conv it is (same numbers). The TFLite converter turns
    a dense layer on ``(1, 1, 1, C)`` (squeeze-excite at batch 1) into a rank-4
    ``batch_matmul`` it then rejects; a 1x1 ``CONV_2D`` converts."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)) \
            or getattr(module, "axis", -1) not in (-1, (-1,)) \
            or getattr(module, "batch_dims", ()) or module.is_initializing():
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    params = module.variables.get("params", {})
    if x.ndim != 4 or "kernel" not in params:  # no kernel: a layer a LowRankModel splits
        return next_fun(*args, **kwargs)
    kernel = jnp.reshape(params["kernel"], (x.shape[-1], -1))
    y = jax.lax.conv_general_dilated(
        x, kernel[None, None].astype(x.dtype), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=module.precision)
    if "bias" in params:
        y = y + jnp.reshape(params["bias"], (-1,)).astype(y.dtype)
    return jnp.reshape(y, (*x.shape[:-1], *np.shape(params["kernel"])[1:]))


def _fn(module, variables, apply_kwargs, shape, for_litert: bool = False, inputs=None,
        tree=None, compute_dtype=None):
    """The inference function ``x -> output`` of a linen module and its variables, or of an NNX
    model (``variables=None``) in eval mode; ``for_litert``: in the forms the TFLite converter
    takes (linen dense layers on rank-4 inputs as 1x1 convs, :func:`_dense_as_conv`; the rest is
    rewritten primitive by primitive, :func:`lrjax.runtimes.litert_primitives`);
    ``compute_dtype``: :func:`_in_compute_dtype`."""
    return _keys_as_data(_in_compute_dtype(_inference_fn(
        module, variables, apply_kwargs, shape, for_litert, inputs, tree), compute_dtype, shape,
        inputs))


def _keys_as_data(forward):
    """``forward`` returning each PRNG key of its output as ``jax.random.key_data`` (uint32): a
    runtime's outputs are arrays of numbers (bonsai's LLaDA returns the key it split)."""
    def call(*xs):
        return jax.tree.map(lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(
            getattr(a, "dtype", None), jax.dtypes.prng_key) else a, forward(*xs))

    return call


def _in_compute_dtype(forward, compute_dtype, shape, inputs):
    """``forward`` as is (``compute_dtype=None``: as the model computes), or computing in float32
    where it computes in bfloat16 or float16 (``compute_dtype=jnp.float32``:
    :func:`lrjax.replay.in_float32`), checked by tracing it once on the example's shapes."""
    if compute_dtype is None:
        return forward
    try:
        float32 = np.dtype(compute_dtype) == np.float32
    except TypeError:
        float32 = False
    if not float32:
        raise ExportError(f"compute_dtype must be None (as the model computes) or float32; got "
                          f"{compute_dtype!r}")
    forward = replay.in_float32(forward)
    try:
        jax.eval_shape(forward, *(inputs or [jax.ShapeDtypeStruct(shape, np.float32)]))
    except replay.ReplayError as e:
        raise ExportError(str(e)) from None
    return forward


def _inference_fn(module, variables, apply_kwargs, shape, for_litert, inputs, tree):
    try:
        check_model_kind(module, "flax")
    except TypeError as e:
        raise ExportError(str(e)) from None
    if isinstance(module, nnx.Module):
        if variables is not None:
            raise ExportError(f"{type(module).__name__} is an NNX model, which carries its own "
                              f"state: pass variables=None (got a {type(variables).__name__})")
        # merged (as fresh variables) inside each trace: NNX's lifted transforms (nnx.scan
        # over nnx.vmap-made blocks) refuse variables made outside the trace that runs them
        apply_kwargs, nodes = graph_keywords(apply_kwargs)  # a KV cache the call updates
        graphdef, state = nnx.split((eval_view(module), nodes))
        drawn = drawn_streams(graphdef, state, inputs or [jax.ShapeDtypeStruct(shape, np.float32)],
                              apply_kwargs, lambda m, xs, kw: _call(m, tree, xs, kw))
        if drawn:
            raise ExportError(f"{type(module).__name__}'s eval view draws random numbers (from "
                              f"{', '.join(drawn)}): a module of its own keeps a training mode "
                              "lrjax does not know, and its draws would be fixed in the graph: "
                              "put that module in inference mode (or, for draws meant at "
                              "inference, give the call its stream: rngs=nnx.Rngs(...))")

        def call(*xs):
            model, copies = nnx.merge(graphdef, state, copy=True)
            return _call(model, tree, xs, {**apply_kwargs, **copies})

        return call
    if variables is None:
        raise ExportError(f"{type(module).__name__} is a linen module: pass its variables "
                          "(variables=None is for NNX models)")
    try:
        _call(functools.partial(surgery.check_inference_call, module, variables), tree,
              inputs or [jax.ShapeDtypeStruct(shape, np.float32)], apply_kwargs)
    except ValueError as e:
        raise ExportError(str(e)) from None

    apply = _linen_apply(module, apply_kwargs, for_litert)
    if linen_trace.evaluating_constants():  # the weights traced (a jit's arguments): concrete,
        apply = jax.jit(apply)  # ops on them would run eagerly, at no symbolic batch size
    return lambda *xs: _call(functools.partial(apply, variables), tree, xs, {})


def _linen_apply(module, apply_kwargs, for_litert: bool = False):
    """``(variables, *xs, **keyword_inputs) -> output`` of a linen module's inference call."""
    def apply(variables, *xs, **keyword_inputs):
        if for_litert:
            with nn.intercept_methods(_dense_as_conv):
                return module.apply(variables, *xs, **keyword_inputs, **apply_kwargs)
        return module.apply(variables, *xs, **keyword_inputs, **apply_kwargs)

    return apply


def _flat_outputs(fn):
    """``fn`` returning its output's arrays (``jax.tree.leaves``): one array as itself, several
    as a tuple. TensorFlow cannot rebuild a frozen dataclass around converted outputs (Hugging
    Face's ``ModelOutput``, a ``flax.struct`` dataclass with ``None`` fields)."""
    def flat(*args):
        leaves = jax.tree.leaves(fn(*args))
        return leaves[0] if len(leaves) == 1 else tuple(leaves)

    return flat


def _example_inputs(example_input, apply_kwargs, fixed_batch: bool = False):
    """``(shape, examples, inputs, tree, kwargs)`` of an exporter's ``example_input`` and the
    call's keyword arguments: one NHWC batch (its shape; ``None``, ``None``, ``None``), or a
    tuple of the model's positional inputs, each an array or a pytree of arrays (NaFlex's
    ``(patches, types, rows, columns)``): the first array's shape, the arrays in
    ``jax.tree.leaves`` order (:func:`_check_inputs`: one graph input each), their
    ``jax.ShapeDtypeStruct``\\s, and the call's tree (:func:`_call`). Positional arguments that
    are not arrays (a flag, ``None``, the ``nnx.Rngs`` an NNX model's ``__call__(x, rngs)``
    takes for its dropout, off in eval mode) and typed PRNG keys are passed to every call as
    given, not graph inputs. Keyword arguments holding arrays with a leading (batch) axis, the
    inputs of a call such as Flax's nlp_seq example's ``__call__(*, inputs, train)``, are graph
    inputs after the positional ones (in the keywords' sorted order); ``kwargs``: the others,
    passed as given. At a ``fixed_batch`` the inputs' leading dimensions may differ (a graph
    net's nodes, edges and graphs: jraph's ``GraphsTuple``)."""
    candidates = moments.keyword_inputs(apply_kwargs)  # arrays with a leading axis
    sizes = [np.shape(a)[0] for a in jax.tree.leaves(example_input, is_leaf=_bound)
             if not _bound(a) and np.ndim(a)] or [
        np.shape(a)[0] for a in jax.tree.leaves(candidates)]
    batch = max(sizes, key=sizes.count) if sizes else None  # (a uint32 key's 2 is no batch)
    keyword = {k: v for k, v in candidates.items()
               if all(np.shape(a)[0] == batch for a in jax.tree.leaves(v))}
    kwargs = {k: v for k, v in apply_kwargs.items() if k not in keyword}
    if isinstance(example_input, (tuple, list)) or keyword:
        positional = tuple(example_input) if isinstance(example_input, (tuple, list)) else (
            example_input,)
        leaves, treedef = jax.tree.flatten((positional, dict(sorted(keyword.items()))),
                                           is_leaf=_bound)
        bound = {i: a for i, a in enumerate(leaves) if _bound(a)}
        examples = _check_inputs([a for i, a in enumerate(leaves) if i not in bound],
                                 fixed_batch)
        return examples[0].shape, examples, [jax.ShapeDtypeStruct(a.shape, a.dtype)
                                             for a in examples], (treedef, bound), kwargs
    shape = tuple(np.shape(example_input))
    if len(shape) != 4:
        raise ExportError(f"example_input must be an NHWC batch (N, H, W, C) (inputs of other "
                          f"ranks, e.g. a 1-D conv net's (N, W, C): a tuple); got shape {shape}")
    return shape, None, None, None, kwargs


def _bound(arg) -> bool:
    """A positional argument passed as it is, not a graph input: neither an array nor a
    container (``False``, ``None``, an ``nnx.Rngs``), or a typed PRNG key (``jax.random.key``:
    a VAE's ``__call__(x, z_rng)``; its draws are constants of the graph)."""
    if isinstance(arg, jax.Array):
        return jax.dtypes.issubdtype(arg.dtype, jax.dtypes.prng_key)
    return not isinstance(arg, (np.ndarray, jax.ShapeDtypeStruct, tuple, list, dict))


def _call(fn, tree, arrays, kwargs):
    """``fn`` called with the model's arguments rebuilt from the graph's input ``arrays`` (a
    ``tree`` of :func:`_example_inputs`; ``None``: the arrays themselves, positionally) and
    ``kwargs``."""
    if tree is None:
        return fn(*arrays, **kwargs)
    treedef, bound = tree
    given = iter(arrays)
    args, keyword = jax.tree.unflatten(treedef, [bound[i] if i in bound else next(given)
                                                 for i in range(treedef.num_leaves)])
    return fn(*args, **keyword, **kwargs)


def _check_inputs(example_inputs, fixed_batch: bool = False) -> list[np.ndarray]:
    """Several example inputs (a model called as ``model(x0, x1, ...)``): arrays sharing their
    leading (batch) dimension, unless the export is at a ``fixed_batch``; none a raw PRNG key
    (``jax.random.PRNGKey``'s ``uint32`` data: no graph draws from it)."""
    arrays = [np.asarray(a) for a in example_inputs]
    batches = {a.shape[0] if a.ndim else None for a in arrays}
    raw_key = jax.random.key_data(jax.random.key(0)).shape
    keys = [i for i, a in enumerate(arrays) if a.dtype == np.uint32 and a.shape == raw_key]
    if keys:
        raise ExportError(f"example input {keys[0]} (uint32, shape {raw_key}) is a raw PRNG key "
                          "(jax.random.PRNGKey), which no exported graph draws from: give it to "
                          "the exporter as a keyword of the call, name=value, or as a typed key, "
                          "jax.random.key (passed to the call as given: its draws are constants "
                          "of the graph)")
    if not arrays or not fixed_batch and (len(batches) != 1 or None in batches):
        raise ExportError(f"example inputs must share their leading (batch) dimension; got "
                          f"shapes {[a.shape for a in arrays]} (an argument without the batch, "
                          "such as a uint32 PRNG key or a scalar, is given to the exporter as a "
                          "keyword of the call, name=value, or as a typed key, jax.random.key: "
                          "passed to the call as given; inputs of other sizes, such as a graph "
                          "net's nodes and edges: fixed_batch=True, the example's shapes only)")
    return arrays


def writable_path(path: str) -> str:
    """``path`` made absolute, after checking that its folder exists and is writable.

    Raises:
      ExportError: naming the folder.
    """
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


def _compare(run, forward, shape, batches, what, examples=None) -> tuple[float, float, float]:
    """Run the export and JAX on random batches (with several inputs, ``examples``: their rows
    repeated to each batch); raise ExportError past the tolerance: :data:`ATOL` + :data:`RTOL`
    of each output's own scale, or, for a model whose own output moves more than that when its
    inputs and the values it computes move by one float32 rounding, :data:`CONDITIONED` times
    that move if more (returned, the largest taken, with the largest error and scale). ``run``
    returns the outputs as a list in ``jax.tree.leaves`` order of JAX's."""
    worst, scale, rtol, low, conditioning = 0.0, 0.0, RTOL, "", 0.0
    for i, b in enumerate(batches):
        xs = [np.random.default_rng(i).standard_normal((b, *shape[1:])).astype(np.float32)] \
            if examples is None else [a if b == shape[0] else np.take(a, np.arange(b) % len(a), 0)
                                      for a in examples]  # (the example's own, as given)
        if i == 0:
            rtol, low = _tolerance(forward, xs)
        try:
            tree = forward(*map(jnp.asarray, xs))  # JAX arrays, as the model is called with
        except Exception as e:  # noqa: BLE001 - the model's own code, at another batch
            if i == 0:
                raise
            raise ExportError(f"the model does not run on a batch of {b} (the export is checked "
                              f"on the example's batch and one more): {_first_line(e)}; a model "
                              f"written for one batch size: fixed_batch=True") from None
        wanted = jax.tree.leaves(tree)
        names = runtimes.output_names(tree) if len(wanted) > 1 else [""]
        try:
            outputs = run(*xs)
        except Exception as e:  # noqa: BLE001 - the runtime's own types
            raise ExportError(f"{what} fails to run the export on a batch of {b}: "
                              f"{_first_line(e)}; nothing written") from None
        for leaf, (name, want, got) in enumerate(zip(names, wanted, outputs, strict=True)):
            want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
            where = f"{what} output {name}" if name else f"{what} output"
            if got.shape != want.shape:
                raise ExportError(f"{where} has shape {got.shape}, JAX's {want.shape}")
            err = float(np.max(np.abs(got - want))) if want.size else 0.0
            top = float(np.max(np.abs(want))) if want.size else 0.0
            jitter = rounding_jitter(forward, xs, leaf) if np.isfinite(err) and \
                err > ATOL + rtol * top else 0.0
            if jitter and err <= CONDITIONED * jitter:
                conditioning = max(conditioning, jitter)  # (as close as JAX is to itself)
            elif not np.isfinite(err) or err > ATOL + rtol * top:
                cause = mismatch_cause(forward, xs, leaf, ATOL + rtol * top, jitter) \
                    if np.isfinite(err) else ""
                raise ExportError(f"{where} does not match JAX on a batch of {b}: max "
                                  f"|difference| {err:.3g} > {ATOL:g} + {rtol:g} * {top:.3g}"
                                  f"{low}{cause}; nothing written")
            worst, scale = max(worst, err), max(scale, top)
    return worst, scale, conditioning


def _tolerance(forward, xs) -> tuple[float, str]:
    """The relative tolerance of :func:`_compare` for ``forward`` on ``xs``: :data:`RTOL`, or 4
    units of rounding of the least precise dtype it computes in (bfloat16: 2^-5; the runtime and
    JAX may round in different places), and the words saying so."""
    try:
        low = replay.lowest_precision(jax.make_jaxpr(forward)(*xs))
    except Exception:  # noqa: BLE001 - the comparison itself reports what does not run
        low = None
    if low is None:
        return RTOL, ""
    return max(RTOL, 4 * float(jnp.finfo(low).eps)), f" (the model computes in {low})"


def _first_line(error: Exception) -> str:
    """An error's first line (its type's name when it says nothing)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _symbolic_failure(error: Exception, what: str, fix: str, fixed: bool = False,
                      unbatched: bool = False) -> str:
    """The one line for a model that traced at the example's batch (:func:`_fn` checks) and not
    with a symbolic one (``fixed``: not for the export at that batch either; ``unbatched``: none
    of its outputs leads with its input's first axis, :func:`_unbatched`)."""
    if fixed:
        return f"the model does not trace for {what} export: {_first_line(error)}"
    if unbatched:
        return (f"the model does not trace with a symbolic batch, which {what} export keeps "
                f"free, and none of its outputs leads with its input's first axis: an unbatched "
                f"call (one example, as google/dopamine's networks take one observation), to "
                f"export at its own shapes: {fix}")
    return (f"the model does not trace with a symbolic batch, which {what} export keeps free: "
            f"{_first_line(error)} (code computing with the batch size, e.g. "
            f"int(x.shape[0] / n), needs a fixed one: {fix})")


def _unbatched(forward, shape, inputs) -> bool:
    """Whether none of ``forward``'s outputs at the example's shapes leads with the first
    input's first axis (of more than one entry)."""
    specs = inputs or [jax.ShapeDtypeStruct(tuple(shape), np.float32)]
    first = int(specs[0].shape[0]) if specs[0].shape else 1
    try:
        outputs = jax.eval_shape(forward, *specs)
    except Exception:  # noqa: BLE001 - the caller's error stands
        return False
    return first > 1 and not any(tuple(o.shape)[:1] == (first,) for o in jax.tree.leaves(outputs))


# ---------------------------------------------------------------------------------------------
# StableHLO


@constants_evaluated
def to_stablehlo(module, variables, example_input, path: str, *, platforms=("cpu",),
                 check: bool = True, fixed_batch: bool = False, compute_dtype=None,
                 **apply_kwargs) -> ExportResult:
    """Serialize the inference function with ``jax.export``, batch dimension symbolic.

    The artifact holds StableHLO for ``platforms``; ``jax.export.deserialize(data).call(x)``
    runs it (any batch size). Checked by deserializing it and running batches of the example's
    size and one more. ``fixed_batch``: the example's batch only (a model whose code computes
    with its batch size, or whose keyword inputs hold it: a KV cache); ``compute_dtype``: as
    :func:`to_onnx`'s. An output of types ``jax.export`` cannot serialize (a namedtuple such as
    jraph's ``GraphsTuple``, a dataclass such as Hugging Face's ``ModelOutput``) comes back as
    its arrays, a tuple in ``jax.tree.leaves`` order (one array: itself), as from LiteRT.
    """
    shape, examples, inputs, tree, apply_kwargs = _example_inputs(example_input, apply_kwargs,
                                                                  fixed_batch)
    path = writable_path(path)
    forward = _fn(module, variables, apply_kwargs, shape, inputs=inputs, tree=tree,
                  compute_dtype=compute_dtype)
    scope = jax.export.SymbolicScope()  # one batch symbol for every input
    specs = [runtimes.symbolic_batch(shape)] if inputs is None else \
        [runtimes.symbolic_batch(i.shape, i.dtype, scope) for i in inputs]
    if fixed_batch:
        specs = [jax.ShapeDtypeStruct(tuple(shape), jnp.float32)] if inputs is None else \
            [jax.ShapeDtypeStruct(tuple(i.shape), i.dtype) for i in inputs]
    def serialized(fn) -> bytes:
        try:
            with formulations.policy("portable"):
                exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*specs)
        except jax.errors.ConcretizationTypeError:
            raise  # retried with the constants evaluated (linen_trace.constants_evaluated)
        except Exception as e:  # noqa: BLE001 - it traced at the example's batch (_fn checks)
            raise ExportError(_symbolic_failure(
                e, "StableHLO", "fixed_batch=True", fixed_batch,
                _unbatched(fn, shape, inputs))) from None
        return bytes(exported.serialize())

    try:
        data = serialized(forward)
    except ValueError as e:  # an output type jax.export cannot serialize: its arrays, flat
        if "unregistered type" not in str(e):
            raise
        data = serialized(_flat_outputs(forward))
    batches = (shape[0],) if fixed_batch else (shape[0], shape[0] + 1)
    err, scale, jitter = 0.0, 0.0, 0.0
    if check and "cpu" in platforms:
        restored = jax.export.deserialize(bytearray(data))
        err, scale, jitter = _compare(lambda *xs: jax.tree.leaves(restored.call(*xs)), forward,
                                      shape, batches, "the StableHLO artifact", examples)
    size = _write(path, data)
    return ExportResult(path, "stablehlo", err, scale, batches if check else (), size, jitter)


# ---------------------------------------------------------------------------------------------
# ONNX


@constants_evaluated
def to_onnx(module, variables, example_input, path: str, *, fold: bool = True,
            check: bool = True, fixed_batch: bool = False, compute_dtype=None,
            **apply_kwargs) -> ExportResult:
    """Export to ONNX (opset 17) with a symbolic ``batch`` input dimension (``fixed_batch``:
    the example's, for a model whose code computes with its batch size, e.g. Swin's window
    partition ``int(windows.shape[0] / n)``).

    ``module, variables``: a linen module and its variables, or an NNX model and ``None`` (run
    in eval mode; the same for every exporter here). ``example_input``: an NHWC float32 batch
    ``(N, H, W, C)``, or a tuple of the model's positional inputs (any ranks and dtypes, the
    batch first in each: a diffusion U-Net's latents, timesteps and text states; a 1-D conv
    net's ``(N, W, C)`` as a 1-tuple; graph inputs ``input_0``, ``input_1``, ..., checked on the
    examples' own rows; arguments that are not arrays, such as a ``False`` flag or the
    ``nnx.Rngs`` of an NNX ``__call__(x, rngs)``, are passed to the call as given);
    ``**apply_kwargs`` go to the call (e.g. ``train=False``).

    The inference jaxpr is translated by :mod:`lrjax.onnx_convert` (convs as ONNX ``Conv`` in
    NCHW, groups and dilation mapped). With ``fold``, per-channel affine ops right after a conv
    (batch norm in inference) are folded into it. A model returning a pytree of arrays (big_vision's
    ``(logits, {"stem": ..., ...})``) gets one graph output per array, named by its path in the
    tree (:func:`lrjax.runtimes.output_names`). Checked with ONNX Runtime on batches of the
    example's size and one more, every output against its own scale (a model whose own output
    moves more than that when its inputs and the values it computes move by one float32
    rounding: within 4x that move, the result's ``conditioning``; so for every exporter here).

    ``compute_dtype=jnp.float32``: a model computing in bfloat16 or float16 (a Flax layer's
    ``dtype=jnp.bfloat16``, casts in its code; ONNX Runtime's CPU kernels take neither for
    convs) is exported computing in float32 wherever it computes in those
    (:func:`lrjax.replay.in_float32`), and checked against JAX computing the same way; its
    outputs are a float32 copy's, not the bfloat16 model's rounded ones. The same for every
    exporter here. ``None``: as the model computes.
    """
    from lrjax import onnx_convert

    shape, examples, inputs, tree, apply_kwargs = _example_inputs(example_input, apply_kwargs,
                                                                  fixed_batch)
    path = writable_path(path)
    forward = _fn(module, variables, apply_kwargs, shape, inputs=inputs, tree=tree,
                  compute_dtype=compute_dtype)
    try:
        model = runtimes.onnx_model(forward, shape, fold=fold, graph_name=type(module).__name__,
                                    inputs=inputs, fixed_batch=fixed_batch)
    except onnx_convert.TranslationError as e:
        raise ExportError(re.sub(r"\(layer (.*?)\) to ONNX",  # the layer may be vmap(...)/...
                                 lambda m: f"(layer {user_layer(m.group(1), module)}) to ONNX",
                                 str(e), count=1)) from None
    except jax.errors.ConcretizationTypeError:
        raise  # retried with the constants evaluated (linen_trace.constants_evaluated)
    except Exception as e:  # noqa: BLE001 - it traced at the example's batch (_fn checks)
        raise ExportError(_symbolic_failure(e, "ONNX", "fixed_batch=True", fixed_batch,
                                            _unbatched(forward, shape, inputs))) from None
    data = model.SerializeToString()
    batches = (shape[0],) if fixed_batch else (shape[0], shape[0] + 1)
    err, scale, jitter = 0.0, 0.0, 0.0
    if check:
        try:
            session = onnx_session(data)
        except Exception as e:  # onnxruntime's own types: InvalidGraph, NotImplemented, ...
            first = _first_line(e)
            hint = ("; the model computes in bfloat16 (its dtype, or a cast in its code), which "
                    "ONNX Runtime's CPU kernels do not take for every op: export with "
                    "compute_dtype=jnp.float32 (the graph computes in float32 where the model "
                    "computes in bfloat16)"
                    if "bfloat16" in first or _computes_in_bfloat16(model) else "")
            raise ExportError(f"ONNX Runtime cannot load the exported graph: {first}{hint}") \
                from None
        names = [i.name for i in session.get_inputs()]
        err, scale, jitter = _compare(
            lambda *xs: session.run(None, dict(zip(names, xs, strict=True))), forward, shape,
            batches, "ONNX Runtime", examples)
    size = _write(path, data)
    return ExportResult(path, "onnx", err, scale, batches if check else (), size, jitter)


def _computes_in_bfloat16(model) -> bool:
    """Whether an ONNX graph holds bfloat16 constants or casts to bfloat16."""
    import onnx

    bf16 = onnx.TensorProto.BFLOAT16
    return any(t.data_type == bf16 for t in model.graph.initializer) or any(
        a.name == "to" and a.i == bf16 for n in model.graph.node if n.op_type == "Cast"
        for a in n.attribute)


# ---------------------------------------------------------------------------------------------
# LiteRT


@constants_evaluated
def to_tflite(module, variables, example_input, path: str, *, check: bool = True,
              compute_dtype=None, **apply_kwargs) -> ExportResult:
    """Export to a LiteRT (TFLite) flatbuffer of builtin ops, at the example's batch size.

    Route: :func:`lrjax.runtimes.tflite_model` (builtin ops only, so a pair becomes two
    ``CONV_2D``); float32. Checked with ``ai_edge_litert``'s interpreter on a
    batch of the example's size. The batch is fixed on purpose: the same VGG-16 converted with a
    dynamic batch (``polymorphic_shapes``, input signature ``[-1, 224, 224, 3]``) ran 2.4x
    (full) and 4.7x (low-rank) slower in LiteRT at batch 8 (514 -> 1245 ms, 202 -> 960 ms).
    A model returning a pytree of arrays gets one output tensor per array, in
    ``jax.tree.leaves`` order (:func:`lrjax.runtimes.litert_outputs` runs them in that order).
    ``compute_dtype``: as :func:`to_onnx`'s.
    """
    shape, examples, inputs, tree, apply_kwargs = _example_inputs(example_input, apply_kwargs,
                                                                  True)
    path = writable_path(path)
    forward = _fn(module, variables, apply_kwargs, shape, for_litert=True, inputs=inputs,
                  tree=tree, compute_dtype=compute_dtype)
    nnx_model = isinstance(module, nnx.Module)
    size = runtimes.weight_bytes(nnx.state(module) if nnx_model else variables)
    large = size >= runtimes.BUFFER_OFFSET_BYTES
    try:  # NNX, or small weights: constants of the traced module (no SavedModel: ~1 s faster)
        if nnx_model or size < runtimes.SAVED_MODEL_BYTES:
            data = runtimes.tflite_model(_flat_outputs(forward), shape, buffer_offsets=large,
                                         inputs=inputs)
        else:  # the weights as variables: a fraction of the converter's memory
            apply = _linen_apply(module, apply_kwargs, True)
            with_params = lambda v, *xs: _call(functools.partial(apply, v), tree, xs, {})  # noqa: E731
            if compute_dtype is not None:  # (checked by _fn)
                with_params = replay.in_float32(with_params)
            data = runtimes.tflite_model(_flat_outputs(with_params), shape, params=variables,
                                         buffer_offsets=large, inputs=inputs)
    except Exception as e:  # the converter raises several types for unsupported graphs
        raise ExportError(converter_failure(
            e, forward, inputs or [jax.ShapeDtypeStruct(shape, np.float32)], module)) from None
    batches = (shape[0],)
    err, scale, jitter = 0.0, 0.0, 0.0
    if check:
        try:
            run = runtimes.litert_outputs(litert_interpreter(data))
        except Exception as e:  # noqa: BLE001 - a kernel failing to prepare: RuntimeError
            raise ExportError(f"LiteRT's interpreter cannot run the converted model: "
                              f"{_first_line(e)}; nothing written") from None
        err, scale, jitter = _compare(run, forward, shape, batches, "LiteRT", examples)
    size = _write(path, data)
    return ExportResult(path, "tflite", err, scale, batches if check else (), size, jitter)


EXPORTERS = {"onnx": to_onnx, "tflite": to_tflite, "stablehlo": to_stablehlo}
