"""One-line messages for export failures, naming the user's layers: :func:`user_layer` (a name
stack as the user's variables name the layer) and :func:`converter_failure` (a TFLite converter
error, located by the source line it reports)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import source_info_util

from lrjax import formulations, macs
from lrjax.layers import LowRankModel

__all__ = ["user_layer", "converter_failure"]


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
