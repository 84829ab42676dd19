"""ONNX translations of the primitives that rearrange arrays without computing: ``split``
(``jnp.split``), ``stack`` (``jnp.stack``) and ``rev`` (``jnp.flip``; reflect padding is built
from it). Handlers of :data:`lrjax.onnx_convert.HANDLERS`: ``handler(converter, args, params,
out_aval)``, in the converter's layout (an NCHW tensor stays NCHW where the result is 4-D)."""

from __future__ import annotations

import jax
import numpy as np

from lrjax.onnx_graph import INT64_MAX, Tensor

__all__ = ["split", "stack", "rev"]


def split(c, args, params, aval):
    """``jnp.split`` as one ``Slice`` per piece."""
    t, axis, start, pieces = args[0], int(params["axis"]), 0, []
    for size in params["sizes"]:
        starts, limits = [0] * len(t.shape), list(t.shape)
        starts[axis], limits[axis] = start, start + int(size)
        piece = jax.ShapeDtypeStruct(tuple(limits[:axis]) + (int(size),)
                                     + tuple(limits[axis + 1:]), aval.dtype)
        pieces.append(c.slice([t], dict(start_indices=starts, limit_indices=limits), piece))
        start += int(size)
    return pieces


def stack(c, args, params, aval):
    """``jnp.stack``: each operand given a unit axis (``Reshape``), then one ``Concat``."""
    axis = int(params["axis"])
    unit = jax.ShapeDtypeStruct(tuple(1 if i == axis else d for i, d in enumerate(aval.shape)),
                                aval.dtype)
    parts = [c.reshape([a], {}, unit) if isinstance(a, Tensor) else np.expand_dims(a, axis)
             for a in args]
    return c.concatenate(parts, {"dimension": axis}, aval)


def rev(c, args, params, aval):
    """``jnp.flip`` over the primitive's dimensions: a ``Slice`` with step -1 on each."""
    t = args[0]
    if not isinstance(t, Tensor):
        return np.flip(np.asarray(t), tuple(params["dimensions"]))
    axes = [c.axis(t, int(a)) for a in params["dimensions"]]
    n = len(axes)
    out = c.g.node("Slice", [t.name, c.g.ints([-1] * n), c.g.ints([-INT64_MAX] * n),
                             c.g.ints(axes), c.g.ints([-1] * n)])
    return Tensor(out, tuple(aval.shape), t.nchw)
