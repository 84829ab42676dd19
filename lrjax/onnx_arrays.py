"""ONNX translations of the primitives that rearrange, select or scan along one axis: ``split``
(``jnp.split``), ``stack`` (``jnp.stack``), ``rev`` (``jnp.flip``; reflect padding is built
from it), ``argmax``, ``top_k`` (``lax.top_k``: a mixture-of-experts router's choice) and ``cumsum``
(``jnp.cumsum``: an expert's buffer positions); :func:`take`, the ``gather`` handler's case of
indices of the data (an embedding lookup of class labels); :func:`as_dtype` casts a ``dot_general``'s
operands of other dtypes. Handlers of :data:`lrjax.onnx_convert.HANDLERS`: ``handler(converter, args, params,
out_aval)``, in the converter's layout (an NCHW tensor stays NCHW where the result is 4-D)."""

from __future__ import annotations

import jax
import numpy as np
from onnx import helper

from lrjax.onnx_graph import INT64_MAX, Tensor, TranslationError, onnx_dtype

__all__ = ["split", "stack", "rev", "argmax", "top_k", "cumsum"]  # handlers, by primitive


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


def top_k(c, args, params, aval):
    """``lax.top_k``: ONNX ``TopK`` (largest first; equal values in index order, as JAX), its
    indices cast to the primitive's integer type."""
    t, k = args[0], int(params["k"])
    axis = c.axis(t, int(params.get("axis", len(t.shape) - 1)))
    values, indices = c.g.name("topk_values"), c.g.name("topk_indices")
    c.g.nodes.append(helper.make_node("TopK", [t.name, c.g.ints([k])], [values, indices],
                                      axis=axis, largest=1, sorted=1))
    cast = c.g.node("Cast", [indices], to=onnx_dtype(np.int32))
    return [Tensor(values, tuple(aval.shape), t.nchw), Tensor(cast, tuple(aval.shape), t.nchw)]


def cumsum(c, args, params, aval):
    """``jnp.cumsum`` (``reverse=`` too): ONNX ``CumSum`` along the primitive's axis."""
    t = args[0]
    axis = c.g.const(np.asarray(c.axis(t, int(params["axis"])), np.int64), "axis")
    out = c.g.node("CumSum", [t.name, axis], reverse=int(bool(params.get("reverse", False))))
    return Tensor(out, tuple(aval.shape), t.nchw)


def argmax(c, args, params, aval):
    """``jnp.argmax``: ONNX ``ArgMax`` (on the NHWC value), cast to the index dtype."""
    (axis,) = params["axes"]
    out = c.g.node("ArgMax", [c.nhwc(args[0])], axis=int(axis), keepdims=0)
    return Tensor(c.g.node("Cast", [out], to=onnx_dtype(params["index_dtype"])),
                  tuple(aval.shape))


def take(c, args, params, aval):
    """``jnp.take(x, indices, axis)`` with indices of the data (``nnx.Embed`` / ``nn.Embed`` of
    class labels or timesteps) as ONNX ``Gather``; indices past the end fail there, where JAX
    fills them (an embedding's indices are in range)."""
    x, idx = args
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    rank, batch = len(np.shape(x)), len(idx.shape) - 1
    axes = tuple(dn.start_index_map)
    if len(axes) != 1 or tuple(dn.collapsed_slice_dims) != axes or dn.operand_batching_dims or \
            idx.shape[-1] != 1 or tuple(dn.offset_dims) != tuple(
                i for i in range(rank - 1 + batch) if not axes[0] <= i < axes[0] + batch) or \
            any(s != (1 if i == axes[0] else d) for i, (s, d) in enumerate(zip(
                sizes, np.shape(x), strict=True))):
        raise TranslationError(f"only jnp.take along one axis at indices of the data is "
                               f"covered; got {dn}")
    data = c.nhwc(x) if isinstance(x, Tensor) else c.g.const(np.asarray(x))
    indices = c.g.node("Cast", [c.g.node("Squeeze", [c.nhwc(idx), c.g.ints([batch])])],
                       to=onnx_dtype(np.int64))
    return Tensor(c.g.node("Gather", [data, indices], axis=axes[0]), tuple(aval.shape))


def as_dtype(c, args, invars, dtype) -> list:
    """``args`` (of the jaxpr variables ``invars``) in ``dtype``: JAX multiplies a boolean or
    integer operand with a float one (``preferred_element_type``), ONNX's ``MatMul`` / ``Einsum``
    do not."""
    out = []
    for a, v in zip(args, invars, strict=True):
        if v.aval.dtype == dtype:
            out.append(a)
        elif isinstance(a, Tensor):
            out.append(Tensor(c.g.node("Cast", [a.name], to=onnx_dtype(dtype)), a.shape, a.nchw))
        else:
            out.append(np.asarray(a).astype(dtype))
    return out
