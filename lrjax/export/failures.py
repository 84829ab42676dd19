"""One-line messages for export failures, naming the user's layers: :func:`user_layer` (a name
stack as the user's variables name the layer), :func:`converter_failure` (a TFLite converter
error, located by the source line it reports) and :func:`mismatch_cause` (why a runtime's output
may differ from JAX's past the tolerance: the model's own sensitivity)."""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import source_info_util

from lrjax import formulations, macs, replay
from lrjax.layers import LowRankModel

__all__ = ["user_layer", "converter_failure", "mismatch_cause", "rounding_jitter", "CONDITIONED"]

CONDITIONED = 4  # an export may differ from JAX by 4x JAX's own move under rounding


# the converter's first error: the source line JAX recorded for the op it cannot convert
_CONVERTER_ERROR = re.compile(r"([^\s:]+\.py):(\d+):\d+: error: (.*)")
_USER_FRAME = re.compile(r"(.+?):(\d+)(?::\d+)? ")


_TRANSFORMED = re.compile(r"^[a-z_]+\((.*)\)$")  # a name stack's 'vmap(...)', 'jvp(...)'
_METHOD = re.compile(r"^(\w+)\.\w+(?:\[\d+\])?$")  # 'Net.encode', 'base.forward[0]'


def user_layer(where: str, module=None) -> str:
    """A layer path as a name stack gives it (``Net/block/conv``), as the user's variables name
    it (``block/conv``): without the root module's class name, nor a ``LowRankModel``'s
    ``base``, nor JAX's transform marks (``vmap(...)``, a ``jax.vmap`` inside a layer), nor the
    names of the methods other than ``__call__`` that ran (``couplings.forward``)."""
    parts = []
    for part in where.split("/"):
        while (marked := _TRANSFORMED.match(part)) is not None:
            part = marked.group(1)
        method = _METHOD.match(part)  # a module's other method: 'couplings.forward[0]'
        if method is not None:
            part = method.group(1)
            if parts and parts[-1] == part:
                continue  # the same module's methods calling each other
        if part:
            parts.append(part)
    if module is not None and not isinstance(module, nnx.Module):
        root = [type(module).__name__] + (["base"] if isinstance(module, LowRankModel) else [])
        if parts[:len(root)] == root:
            parts = parts[len(root):]
    return "/".join(parts) or "<top level>"


def converter_failure(error: Exception, forward, inputs, module=None) -> str:
    """One line for a TFLite converter failure, naming the user's layers: the converter reports
    the source line of the op it cannot convert; the equations of ``forward``'s trace (on
    ``inputs``, ``jax.ShapeDtypeStruct``\\s) at that line give the layer paths (their name
    stacks, as :func:`user_layer` of ``module``)."""
    text = str(error).strip()
    found = _CONVERTER_ERROR.search(text)
    try:
        with formulations.policy("portable"):  # as the converter traced it
            jaxpr = jax.make_jaxpr(forward)(*inputs)
    except Exception:  # noqa: BLE001 - the message without the layer is still the converter's
        jaxpr = None
    lacking = [(eqn.primitive.name, where) for eqn, where in macs.iter_eqns(jaxpr)
               if eqn.primitive.name in _LITERT_LACKS] if jaxpr is not None else []
    if lacking and (not found or "XlaCallModule" in found.group(3)):
        # the converter names only the module it could not legalize: name the op and layer
        name, where = lacking[0]
        return (f"the TFLite converter failed at layer {user_layer(where, module)!r}: it "
                f"cannot convert {name!r} to LiteRT's builtin ops")
    if not found:  # its first line, or its last under a header ("in user code:" ... error)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(error).__name__]
        return f"the TFLite converter failed: {lines[-1] if lines[0].endswith(':') else lines[0]}"
    file, line, what = found.group(1), int(found.group(2)), found.group(3).strip()
    layers = sorted({user_layer(p, module) for p in _layers_at(jaxpr, file, line)}) \
        if jaxpr is not None else []
    named = ", ".join(repr(p) for p in layers[:3]) + (
        f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    where = f" at layer {named}" if layers else ""
    half = next((d for d in (jnp.bfloat16, jnp.float16) if jaxpr is not None and any(
        getattr(v.aval, "dtype", None) == d for eqn, _ in macs.iter_eqns(jaxpr)
        for v in eqn.outvars)), None)  # (a float16 conv's padding: "tfl.pad" not legalized)
    hint = (f"; the model computes in {jnp.dtype(half).name} (its dtype, or a cast in its code), "
            "which the converter does not take for every op: export with "
            "compute_dtype=jnp.float32 (the graph computes in float32 where the model computes "
            f"in {jnp.dtype(half).name})" if half is not None else "")
    return (f"the TFLite converter failed{where} ({os.path.basename(file)}:{line}): "
            f"{what}{hint}")


# primitives the TFLite converter cannot legalize and names only as its XlaCallModule
_LITERT_LACKS = ("top_k", "sort")


def _layers_at(jaxpr, file: str, line: int) -> set[str]:
    """Layer paths of the equations whose user source line is ``file:line``."""
    found = set()
    for eqn, where in macs.iter_eqns(jaxpr):
        # "file:line:column (function)" of the user frame, as JAX names it in locations
        at = _USER_FRAME.match(source_info_util.summarize(eqn.source_info))
        if at and int(at.group(2)) == line and \
                os.path.basename(at.group(1)) == os.path.basename(file):
            found.add(where or "<top level>")
    return found


def mismatch_cause(forward, xs, leaf: int, tolerance: float, jitter: float | None = None) -> str:
    """Words for an export whose output ``leaf`` (of ``jax.tree.leaves``) differs from JAX's on
    the batch ``xs`` past ``tolerance``, where the model itself says why: its outputs for one
    example depend on the others in the batch (a norm or softmax over the batch axis: changing
    the last example moves the others'), or JAX's own output moves past the tolerance when the
    float inputs and the values computed move by one float32 rounding (an ill-conditioned model,
    which the runtime's rounding moves as much as JAX's would: :func:`rounding_jitter`, unless
    its value is given as ``jitter``). ``""`` where neither holds."""
    def last_moved(x):
        x = np.array(x)
        x[-1] += 1
        return x

    try:
        base, batch = _output(forward, xs, leaf), len(xs[0])
        jitter = rounding_jitter(forward, xs, leaf) if jitter is None else jitter
        coupled = float(np.max(np.abs(_output(forward, _floats(xs, last_moved), leaf)[:-1]
                                      - base[:-1]))) \
            if batch > 1 and base.shape[:1] == (batch,) else 0.0
    except Exception:  # noqa: BLE001 - a diagnosis only: the mismatch is reported as it is
        return ""
    words = []
    if jitter > tolerance:
        words.append(f"JAX's own output moves by {jitter:.3g} when its inputs and the values "
                     "it computes move by one float32 rounding: the model is that sensitive, and "
                     "the runtime rounds in other places, here more than the "
                     f"{CONDITIONED}x of that the check allows")
    if coupled > tolerance:
        words.append(f"its output for one example depends on the others in the batch (changing "
                     f"the last example moves the others' by {coupled:.3g}: a norm over the "
                     "batch axis?)")
    return f" ({'; '.join(words)})" if words else ""


def _output(forward, inputs, leaf: int) -> np.ndarray:
    return np.asarray(jax.tree.leaves(forward(*map(jnp.asarray, inputs)))[leaf], np.float64)


def _floats(xs, change) -> list:
    return [change(x) if np.issubdtype(x.dtype, np.floating) else x for x in xs]


def rounding_jitter(forward, xs, leaf: int, draws: int = 3) -> float:
    """How far JAX's own output ``leaf`` (of ``jax.tree.leaves``) moves when every float input
    of the batch ``xs`` and every float value it computes moves by one float32 rounding, up or
    down (seeded): what another runtime's rounding in other places moves it by, the model's own
    conditioning (a diffusion net's Fourier features of its noise level, frequencies to 2e4:
    ``sin`` of arguments of 1e5, whose last bit is 0.01). The largest of ``draws`` draws; where
    the model cannot be run so, its inputs alone moved; 0 where not even that runs."""
    base = _output(forward, xs, leaf)
    try:
        closed = jax.make_jaxpr(forward)(*map(jnp.asarray, xs))
        moved = jax.jit(functools.partial(_rounded_run, closed))
        outs = [np.asarray(jax.tree.leaves(moved(jnp.uint32(i), *xs))[leaf], np.float64)
                for i in range(draws)]
    except Exception:  # noqa: BLE001 - a program not run so (a constant needed at trace time)
        signs = np.random.default_rng(0)

        def rounded(x):
            step = np.finfo(np.float32).eps * signs.choice([-1.0, 1.0], np.shape(x))
            return (x * (1 + step)).astype(x.dtype)

        try:
            outs = [_output(forward, _floats(xs, rounded), leaf) for _ in range(draws)]
        except Exception:  # noqa: BLE001 - a model that does not run so: no such allowance
            return 0.0
    return max(float(np.max(np.abs(out - base))) for out in outs)


def _rounded_run(closed, draw, *xs):
    """``closed`` on ``xs`` with every float input and every float value an equation computes
    (calls inlined) moved by one rounding of its dtype, up or down as bit ``draw`` of the
    value's own bits says (a sign per element that costs no random stream)."""
    def moved(value):
        dtype = jnp.result_type(value)
        if not jnp.issubdtype(dtype, jnp.floating):
            return value
        bits = jax.lax.bitcast_convert_type(value, _UNSIGNED[jnp.dtype(dtype).itemsize])
        up = ((bits >> draw.astype(bits.dtype)) & 1).astype(dtype)
        return value * (1 + jnp.finfo(dtype).eps * (2 * up - 1))

    def rule(eqn, ins, here):
        return [moved(out) for out in replay.bind(eqn, ins)] if replay.call_jaxpr(eqn) is None \
            else None

    return replay.run(closed.jaxpr, closed.consts, [moved(x) for x in xs], rule)


_UNSIGNED = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}
