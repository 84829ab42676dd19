"""Build and run an inference function in the runtimes lrjax deploys to: ONNX Runtime and LiteRT.

The conversions here are unchecked and write no file; :mod:`lrjax.export` adds the checks
against JAX and the atomic writes. Both conversions trace under the ``"portable"`` formulation
policy (plain XLA ops: a low-rank pair becomes two ``Conv`` / ``CONV_2D`` nodes). The runtimes'
packages (``onnx``, ``onnxruntime``, ``tensorflow``, ``ai_edge_litert``) are optional
dependencies, imported by the functions that need them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import complex_real, formulations, litert_math, macs, replay

__all__ = ["RUNTIMES", "BUFFER_OFFSET_BYTES", "SAVED_MODEL_BYTES", "symbolic_batch",
           "onnx_model", "onnx_session", "tflite_model", "weight_bytes", "release_memory",
           "litert_interpreter", "litert_runner", "litert_outputs", "layer_call"]

RUNTIMES = ("jax", "onnxruntime", "litert")

# weights of this size or more are written to a TFLite flatbuffer at buffer offsets
# (:func:`tflite_model`)
BUFFER_OFFSET_BYTES = 1 << 28
# linen weights of this size or more are converted as a SavedModel's variables, smaller ones as
# constants of the traced function (:func:`lrjax.export.to_tflite`: no SavedModel written)
SAVED_MODEL_BYTES = 1 << 24


def symbolic_batch(shape, dtype=jnp.float32, scope=None) -> jax.ShapeDtypeStruct:
    """An input of ``shape`` and ``dtype`` (default float32) with a symbolic batch dimension
    ``b`` (``scope``: a ``jax.export.SymbolicScope`` shared by several inputs)."""
    spec = ", ".join(["b", *map(str, shape[1:])])
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(spec, scope=scope), dtype)


def output_names(tree) -> list[str]:
    """The names of a function's outputs, one per array of its output pytree in
    ``jax.tree.leaves`` order: ``["output"]`` for one array, else each array's path in the tree
    (``("0", "1/stem")`` for ``(logits, {"stem": ...})``)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return ["output"]
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]


def onnx_model(forward: Callable, shape, *, fold: bool = True, graph_name: str = "lrjax",
               inputs=None, fixed_batch: bool = False):
    """The ONNX model (opset :data:`lrjax.onnx_convert.OPSET`) of ``forward: x -> y`` for inputs
    of ``shape`` with a symbolic batch dimension (``fixed_batch``: the batch of ``shape``,
    for code that computes with the batch size); ``y`` an array or a pytree of arrays (one
    graph output each, named by :func:`output_names`). ``inputs``: several inputs instead
    (``forward(*xs)``; shapes and dtypes as ``jax.ShapeDtypeStruct`` each, batch first, one
    symbolic batch for all), graph inputs ``input_0``, ``input_1``, ...

    With ``fold``, per-channel affine ops right after a conv (batch norm in inference, biases)
    are folded into it (:func:`lrjax.onnx_passes.fold_conv_affine`).

    Raises:
      lrjax.onnx_convert.TranslationError: a primitive or form the translator does not cover,
        naming it and the layer it comes from.
    """
    from lrjax import onnx_convert, onnx_passes

    with formulations.policy("portable"):
        scope = jax.export.SymbolicScope()
        spec = (lambda shp, dtype=jnp.float32, _=None: jax.ShapeDtypeStruct(shp, dtype)) \
            if fixed_batch else symbolic_batch
        specs = [spec(shape)] if inputs is None else \
            [spec(i.shape, i.dtype, scope) for i in inputs]
        closed, out_shapes = jax.make_jaxpr(forward, return_shape=True)(*specs)
        if complex_real.holds_complex(closed):  # spectral layers: real and imaginary parts
            try:
                closed = jax.make_jaxpr(complex_real.replayed(closed))(*specs)
            except complex_real.ComplexError as e:
                raise onnx_convert.TranslationError(
                    f"cannot export primitive {e.primitive!r} (layer {e.layer}) to ONNX: "
                    f"{e.reason}") from None
        closed = _onnx_rewritten(closed, specs)
    closed = macs.live(closed)
    names = ["input"] if inputs is None else [f"input_{i}" for i in range(len(inputs))]
    model = onnx_convert.jaxpr_to_onnx(closed, names, output_names(out_shapes),
                                       graph_name=graph_name)
    if fold:
        onnx_passes.fold_conv_affine(model)
    return model


_ONNX_REWRITES = ("scatter-max", "scatter-min",  # ScatterND reduces by max / min in opset 18
                  "approx_top_k", "ragged_dot_general")  # (no ONNX op)


def _onnx_rewritten(closed, specs):
    """``closed`` with the primitives of :data:`_ONNX_REWRITES` replayed in ops the graph's opset
    has (:func:`lrjax.litert_math.scatter_combine`, :func:`~lrjax.litert_math.exact_top_k`,
    :func:`~lrjax.litert_math.dense_ragged_dot`), where they are of its form; as it is when it
    holds none (the translator then names what it lacks)."""
    if not any(e.primitive.name in _ONNX_REWRITES for e, _ in macs.iter_eqns(closed.jaxpr)):
        return closed

    def rule(eqn, ins, here):
        name = eqn.primitive.name
        if name == "approx_top_k":
            return litert_math.exact_top_k(ins[0], eqn.params)
        if name == "ragged_dot_general":
            out = litert_math.dense_ragged_dot(*ins, eqn.params)
        elif name in _ONNX_REWRITES:
            out = litert_math.scatter_combine(*ins, eqn.params["dimension_numbers"], name)
        else:
            return None
        return None if out is None else [out]

    return jax.make_jaxpr(lambda *args: replay.run(closed.jaxpr, closed.consts, list(args),
                                                   rule))(*specs)


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


def tflite_model(forward: Callable, shape, params=None, *,
                 buffer_offsets: bool = False, inputs=None) -> bytes:
    """A LiteRT (TFLite) flatbuffer of builtin ops computing ``forward`` on a float32 input of
    the fixed ``shape`` (``inputs``: several inputs instead, ``forward(*xs)``, each a
    ``jax.ShapeDtypeStruct``; the model's inputs ``input_0``, ``input_1``, ...).

    Route: ``jax2tf.convert`` -> ``tf.function`` -> ``TFLiteConverter`` (builtin ops only).
    With ``params`` (a pytree of arrays), ``forward(params, x)`` is converted with the params
    held as TensorFlow variables of a SavedModel written to a temporary folder, rather than as
    constants baked into the traced module, and the variables are freed before the converter
    reads the folder: the converter then keeps far fewer copies of the weights.

    Args:
      buffer_offsets: write the weights after the flatbuffer, at offsets (the converter's
        large-model layout, read by LiteRT and TFLite 2.14 or later): the converter then skips
        its Python passes over the whole model (buffer deduplication, metadata), each of which
        held copies of every weight. :func:`lrjax.export.to_tflite` asks for it when the
        weights are :data:`BUFFER_OFFSET_BYTES` or more. The low-rank VGG-16 (516 MB):
        3.0 GiB peak for the whole export instead of 5.2 GB (README, "Memory and time").

    Raises:
      Exception: whatever the TFLite converter raises for a graph it cannot convert.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    spec = [tf.TensorSpec(tuple(shape), tf.float32)] if inputs is None else [
        tf.TensorSpec(tuple(i.shape), tf.as_dtype(i.dtype), name=f"input_{n}")
        for n, i in enumerate(inputs)]
    example = [jax.ShapeDtypeStruct(tuple(shape), np.float32)] if inputs is None else list(inputs)
    if params is not None:
        example.insert(0, jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                       params))
    with formulations.policy("portable"):
        forward = litert_primitives(forward, example)  # traced here: outside TensorFlow's graph
    # converted outside any mesh the caller set: under one, JAX's export writes Shardy's mesh
    # and shardings into the module, a dialect the TFLite converter does not read
    with formulations.policy("portable"), jax.set_mesh(None):
        converted = jax2tf.convert(forward, with_gradient=False)
        if params is None:
            fn = tf.function(converted, autograph=False, input_signature=spec)
            converter = tf.lite.TFLiteConverter.from_concrete_functions(
                [fn.get_concrete_function()], fn)
            return _convert(converter, buffer_offsets)
        with tempfile.TemporaryDirectory(prefix="lrjax-tflite-") as saved:
            _save_model(converted, params, spec, saved)
            release_memory()  # the variables' copies of the weights
            return _convert(_saved_model_converter(saved), buffer_offsets)


def litert_primitives(fn: Callable, example) -> Callable:
    """``fn`` with the primitives the TFLite converter cannot legalize written with ones it can:
    those of :mod:`lrjax.litert_math` (``erf`` as ``1 - erfc``, inverse trigonometric and
    hyperbolic functions, ``cbrt``, ``xor``, ``sort`` and ``top_k`` by comparisons, transposed
    convs in the one padding the converter gets right); complex values as real and imaginary
    parts, FFTs as DFT matrix products (:mod:`lrjax.complex_real`); random
    draws from a key given as a constant (the call's ``rngs=``: a masked autoencoder's
    shuffle) evaluated into constants, as everything computed from constants alone (the
    converter has no unsigned multiply); a ``tile`` of more than 4 axes as concatenated copies
    (Qwen 3-VL's ``repeat_kv``); a ``cond`` on data as every branch and ``select_n`` (as the
    ONNX export computes it); loops rebuilt around their rewritten bodies (``_looped``). Call-like
    primitives are inlined; the rest are bound as they are. ``fn`` is traced here, eagerly, on
    ``example`` (the arguments' ``jax.ShapeDtypeStruct`` pytrees), and the result replays its
    program: a model that runs TensorFlow ops eagerly while it is traced (big_vision's FlexiViT
    builds its patch-kernel resize matrix with ``tf.image.resize(...).numpy()``) cannot be
    traced inside the converter's ``tf.function``."""
    def rule(eqn, ins, here):
        name = eqn.primitive.name
        if name in _SHARDING:  # (one device here: the values as they are)
            return list(ins)
        placed = {k: None for k in ("out_sharding", "sharding") if eqn.params.get(k) is not None}
        if placed and replay.call_jaxpr(eqn) is None:  # (converted where no mesh is set)
            return replay.bind(eqn, ins, {**eqn.params, **placed})
        rewritten = litert_math.rewrite(eqn, ins)
        if rewritten is not None:
            return rewritten
        if name == "tile" and 2 * len(eqn.params["reps"]) > 8:  # converted as a broadcast to
            y = ins[0]  # twice its rank; LiteRT's BROADCAST_TO takes 8 axes at most: copies
            for axis, reps in enumerate(eqn.params["reps"]):  # concatenated along each axis
                y = jnp.concatenate([y] * int(reps), axis=axis) if int(reps) > 1 else y
            return [y]
        if name == "dot_general" and _unconvertible_dot(eqn):
            return [_batched_matmul(*ins, eqn.params["dimension_numbers"],
                                    eqn.outvars[0].aval.dtype)]
        if not any(isinstance(a, jax.core.Tracer) for a in ins):  # constants alone
            with jax.ensure_compile_time_eval():
                return replay.bind(eqn, ins)
        if name == "cond" and not isinstance(ins[0], jax.core.Tracer):  # a known branch
            branches = eqn.params["branches"]
            branch = branches[int(np.clip(ins[0], 0, len(branches) - 1))]
            return replay.run(branch.jaxpr, branch.consts, ins[1:], rule, here)
        if name == "cond":  # on data: every branch, the taken one selected (the converter's
            branches = eqn.params["branches"]  # STABLEHLO_CASE fails to prepare in LiteRT)
            index = jnp.clip(ins[0].astype(jnp.int32), 0, len(branches) - 1)
            outs = [replay.run(b.jaxpr, b.consts, ins[1:], rule, here) for b in branches]
            return [jax.lax.select_n(index, *col) for col in zip(*outs, strict=True)]
        if name == "scan" and any(e.primitive.name in _STEPWISE for e, _ in
                                  macs.iter_eqns(eqn.params["jaxpr"])):
            return _unrolled(rule, eqn, ins, here)
        if name in ("scan", "while"):
            return _looped(rule, eqn, ins, here)
        return None  # a call inlined, the rest bound as they are

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*_plain(example))
    if complex_real.holds_complex(closed):  # spectral layers: real and imaginary parts
        closed = jax.make_jaxpr(complex_real.replayed(closed))(*jax.tree.leaves(_plain(example)))
    tree = jax.tree.structure(out_shape)
    consts = [np.asarray(c) if _on_mesh(c) else c for c in closed.consts]
    return lambda *args: jax.tree.unflatten(
        tree, replay.run(closed.jaxpr, consts, jax.tree.leaves(_plain(args)), rule))


def _on_mesh(value) -> bool:
    """Whether ``value`` is an array placed on a mesh (its shardings are not exported: the
    conversion runs where no mesh is set)."""
    return isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and \
        isinstance(value.sharding, jax.sharding.NamedSharding)


def _unconvertible_dot(eqn) -> bool:
    """A ``dot_general`` the TFLite converter cannot legalize as it is (``failed to legalize
    operation 'tfl.batch_matmul'``): operands of rank 5 and up, or no contracted axis (an
    element-wise product written as an einsum: Mamba 2's ``bclhn,bcshn,bhcls,bcshp->bclhp``)."""
    (contract, _), _ = eqn.params["dimension_numbers"]
    return not contract or max(len(v.aval.shape) for v in eqn.invars) > 4


def _batched_matmul(lhs, rhs, dimension_numbers, dtype):
    """``lax.dot_general`` as one 3-D batched matmul: each operand transposed to (batch, free,
    contracted) / (batch, contracted, free) and reshaped to rank 3, the product reshaped back to
    ``dot_general``'s (batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dimension_numbers
    lf = [i for i in range(lhs.ndim) if i not in (*lc, *lb)]
    rf = [i for i in range(rhs.ndim) if i not in (*rc, *rb)]
    batch = [lhs.shape[i] for i in lb]
    size = int(np.prod(batch, dtype=np.int64))
    m = int(np.prod([lhs.shape[i] for i in lf], dtype=np.int64))
    n = int(np.prod([rhs.shape[i] for i in rf], dtype=np.int64))
    k = int(np.prod([lhs.shape[i] for i in lc], dtype=np.int64))
    a = jnp.transpose(lhs, (*lb, *lf, *lc)).reshape(size, m, k).astype(dtype)
    b = jnp.transpose(rhs, (*rb, *rc, *rf)).reshape(size, k, n).astype(dtype)
    out = a * b if k == 1 else jnp.matmul(a, b)  # k == 1: outer (element-wise) products
    return out.reshape(*batch, *[lhs.shape[i] for i in lf], *[rhs.shape[i] for i in rf])


# a scan whose body holds one of these runs step by step in LiteRT (:func:`_unrolled`)
_STEPWISE = frozenset({"cond", "random_bits", "threefry2x32"})
_SHARDING = frozenset({"reshard", "sharding_constraint", "mesh_cast"})  # (layout only)


def _looped(rule, eqn, ins, caller) -> list:
    """A ``scan`` or ``while`` rebuilt around its bodies replayed with ``rule`` (what the
    converter cannot legalize rewritten inside loops too), its 0-d carries held as ``(1,)``
    arrays: the converter crashes the process (a segmentation fault, nothing to catch) on a
    loop inside another whose 0-d carry, computed from data, scales an array (a conjugate-
    gradient solve's residual norm inside ``lax.map`` over the batch, lanl/scico's MoDL)."""
    params = eqn.params
    if eqn.primitive.name == "scan":
        first, count = params["num_consts"], params["num_carry"]
        carry_outs = {id(params["jaxpr"]): count}
    else:
        first = params["cond_nconsts"] + params["body_nconsts"]
        count = len(ins) - first
        carry_outs = {id(params["body_jaxpr"]): count}

    def body(closed):
        n = carry_outs.get(id(closed), 0)

        def run(*values):
            values = [jnp.reshape(x, ()) if _scalar(v) and jnp.ndim(x) == 1 else x
                      for x, v in zip(values, closed.jaxpr.invars, strict=True)]
            outs = replay.run(closed.jaxpr, closed.consts, values, rule, caller)
            return [jnp.reshape(o, (1,)) if i < n and not jnp.ndim(o) else o
                    for i, o in enumerate(outs)]

        return run

    held = [jnp.reshape(x, (1,)) if first <= i < first + count and not jnp.ndim(x) else x
            for i, x in enumerate(ins)]
    outs = replay.rebuilt(eqn, held, body)
    return [jnp.reshape(o, ()) if _scalar(v) and jnp.ndim(o) == 1 else o
            for o, v in zip(outs, eqn.outvars, strict=True)]


def _scalar(var) -> bool:
    return getattr(var.aval, "shape", None) == ()


def _unrolled(rule, eqn, ins, caller) -> list:
    """A ``scan`` equation run step by step with ``rule`` (:func:`litert_primitives`): each
    step's ``cond`` sees its own index (a Jet coupling's kind), which XNNPack cannot prepare as
    the converter's ``IF`` inside its ``WHILE``, and each step's random draw its own key (Flax's
    seq2seq decoder samples a token per step from keys split per step), which folds, where the
    converter has no unsigned multiply for the draw itself."""
    params = eqn.params
    consts, carry = ins[:params["num_consts"]], ins[params["num_consts"]:][:params["num_carry"]]
    xs, body, steps = ins[params["num_consts"] + params["num_carry"]:], params["jaxpr"], []
    for i in (reversed if params["reverse"] else iter)(range(params["length"])):
        with jax.ensure_compile_time_eval():  # a constant's slice stays a constant
            step = [x[i] if isinstance(x, jax.core.Tracer) else jnp.asarray(x)[i] for x in xs]
        out = replay.run(body.jaxpr, body.consts, [*consts, *carry, *step], rule, caller)
        carry, ys = out[:len(carry)], out[len(carry):]
        steps.append(ys)
    steps = steps[::-1] if params["reverse"] else steps
    return [*carry, *(jnp.stack(col) for col in zip(*steps, strict=True))] if steps else carry


def _plain(tree):
    """``tree`` with its mappings as dicts (TensorFlow's tracked ``_DictWrapper`` of a
    SavedModel's variables is one leaf to ``jax.tree``), so it flattens as its example did."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, list) or type(tree) is tuple:  # its ListWrapper too
        return type(tree)(map(_plain, tree)) if type(tree) is tuple else list(map(_plain, tree))
    return tree


def _save_model(converted: Callable, params, spec, path: str) -> None:
    """``converted(params, x)`` as a SavedModel at ``path``, ``params`` as its variables."""
    import tensorflow as tf

    holder = tf.Module()
    holder.params = tf.nest.map_structure(  # None: a variable set to None (Swin's mask)
        lambda a: None if a is None else tf.Variable(np.asarray(a), trainable=False), params)
    holder.forward = tf.function(lambda *xs: converted(holder.params, *xs), autograph=False,
                                 input_signature=spec)
    tf.saved_model.save(holder, path, signatures=holder.forward.get_concrete_function())


def _saved_model_converter(path: str):
    """The TFLite converter of the SavedModel at ``path`` (its serving signature), made without
    loading the model into this process first (``from_saved_model`` restores every variable
    only to read the signature names; the converter reads the folder itself)."""
    import tensorflow as tf

    try:
        from tensorflow.lite.python.lite import TFLiteSavedModelConverterV2
        converter = TFLiteSavedModelConverterV2(path, {tf.saved_model.SERVING},
                                                [tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY])
        if converter.saved_model_dir:
            return converter
    except (ImportError, TypeError):  # another TensorFlow: the public route
        pass
    return tf.lite.TFLiteConverter.from_saved_model(path)


def _convert(converter, buffer_offsets: bool) -> bytes:
    import tensorflow as tf

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if buffer_offsets:
        converter._experimental_use_buffer_offset = True  # noqa: SLF001 - no public switch
    with _diagnostics_held():
        data = converter.convert()
    del converter
    release_memory()
    return data


@contextlib.contextmanager
def _diagnostics_held():
    """The converter's own diagnostics, which its C++ writes to the process's stderr: on a
    failure, every failing op's location chain (2.6 k characters for one FFT), which the
    export's one ``ExportError`` line summarizes (its layer, source line and first error), so
    they are dropped; after a conversion that succeeds, written out as they came."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        converted = False
        try:
            yield
            converted = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if converted:
                held.seek(0)
                os.write(2, held.read())


def weight_bytes(tree) -> int:
    """Bytes of the arrays in a pytree (read from their shapes: nothing is copied)."""
    return sum(int(getattr(a, "nbytes", 0)) for a in jax.tree.leaves(tree))


def release_memory() -> None:
    """Collect garbage and hand the freed heap back to the OS (glibc's ``malloc_trim``, where
    there is one): large exports otherwise keep the peak of each stage resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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


def litert_outputs(interpreter):
    """``*xs -> [outputs]`` through a LiteRT interpreter, the inputs in the order of the
    converted function's (named ``input_<i>`` by :func:`tflite_model` when there are several),
    the outputs in the order of its outputs (a tuple's). A SavedModel's signature names them
    ``output_<i>``, and ``get_output_details`` lists them in another order (``output_10`` before
    ``output_2``); a concrete function's graph names them ``Identity``, ``Identity_<i>`` in
    order (an array returned twice: one name, at both places in the list)."""
    signatures = interpreter.get_signature_list()
    if signatures:
        (key, signature), = signatures.items()
        runner = interpreter.get_signature_runner(key)
        names = sorted(signature["inputs"], key=_number)
        order = sorted(signature["outputs"], key=_number)
        return lambda *xs: list(map(runner(**dict(zip(names, xs, strict=True))).get, order))
    ins = [d["index"] for d in sorted(interpreter.get_input_details(),
                                      key=lambda d: _number(d["name"].split(":")[0]))]
    details = interpreter.get_output_details()
    if len({d["name"] for d in details}) == len(details):
        details = sorted(details, key=lambda d: _number(d["name"]))
    # else an array returned twice (NaFlex's logits, also out["logits"]) is one tensor, named
    # once for both places: the list is in the function's order
    outs = [d["index"] for d in details]

    def run(*xs):
        for i, x in zip(ins, xs, strict=True):
            interpreter.set_tensor(i, x)
        interpreter.invoke()
        return [interpreter.get_tensor(i) for i in outs]

    return run


def _number(name: str) -> int:
    """The number that ends an output's name (``output_10``: 10), 0 if none (``Identity``)."""
    found = re.search(r"(\d+)$", name)
    return int(found.group(1)) if found else 0


def layer_call(runtime: str) -> Callable:
    """``call(module, variables, x)``: a zero-argument call running the linen ``module`` on ``x``
    in ``runtime`` (``"onnxruntime"`` or ``"litert"``, float32), for
    :func:`lrjax.timing.layer_times`.
    """
    if runtime not in ("onnxruntime", "litert"):
        raise ValueError(f"layer_call runs 'onnxruntime' or 'litert'; got {runtime!r}")

    def call(module, variables, x):
        xs = np.asarray(x, np.float32)

        def forward(v):
            return module.apply(variables, v)

        if runtime == "onnxruntime":
            session = onnx_session(onnx_model(forward, xs.shape))
            return lambda: session.run(None, {"input": xs})

        run = litert_runner(litert_interpreter(tflite_model(forward, xs.shape)))
        return lambda: run(xs)

    return call
