"""ONNX translation of any ``scatter`` (``x.at[idx].set(y)`` with index arrays, ``.add``,
``.subtract``, ``.multiply``; ``jax.ops.segment_sum``; a token unshuffle written as a scatter at
indices of the data) as one ``ScatterND`` of single elements: every element of the updates gets
its full operand coordinate, built from the scatter's indices, its window offsets and its batching
axes, and JAX's ``FILL_OR_DROP`` mode (windows not wholly inside dropped) and ``CLIP`` mode
(starts clamped) are computed in the graph. :func:`lrjax.onnx_arrays.scatter` keeps its
``dynamic_update_slice`` form for one window at one start; handlers of
:data:`lrjax.onnx_convert.HANDLERS` for the reducing scatters (:data:`HANDLERS`)."""

from __future__ import annotations

import functools

import numpy as np

from lrjax.onnx_graph import Tensor, TranslationError, concrete, reshape_spec

__all__ = ["scatter_nd", "scatter_sub", "HANDLERS"]

_INT64 = 7  # onnx.TensorProto.INT64


def _shape(v) -> tuple:
    return tuple(v.shape) if isinstance(v, Tensor) else np.shape(v)


def _placed(c, value, dims: list[int], rank: int):
    """``value`` (its axes in order) with its axes placed at ``dims`` of a rank-``rank`` array,
    1 elsewhere."""
    target = [1] * rank
    for d, n in zip(dims, _shape(value), strict=True):
        target[d] = n
    if not isinstance(value, Tensor):
        return np.reshape(value, target)
    spec = reshape_spec(tuple(value.shape), tuple(target))
    return Tensor(c.g.node("Reshape", [value.name, c.g.ints(spec)]), tuple(target))


def _iota(c, n, position: int, rank: int):
    """``0 .. n-1`` along ``position`` of a rank-``rank`` array (``n``: the symbolic batch
    too)."""
    if concrete(n):
        return _placed(c, np.arange(int(n), dtype=np.int64), [position], rank)
    count = c.g.node("Squeeze", [c.shape_tensor((n,)), c.g.ints([0])])
    line = Tensor(c.g.node("Range", [c.g.const(np.asarray(0, np.int64)), count,
                                     c.g.const(np.asarray(1, np.int64))]), (n,))
    return _placed(c, line, [position], rank)


def _binary(c, op: str, a, b):
    """``op`` on int64 values, constants folded."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return {"Add": np.add, "Min": np.minimum, "Max": np.maximum,
                "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal,
                "And": np.logical_and}[op](a, b)
    names = [v.name if isinstance(v, Tensor) else c.g.const(np.asarray(v)) for v in (a, b)]
    shape = np.broadcast_shapes(*(tuple(1 if not concrete(d) else d for d in _shape(v))
                                  for v in (a, b)))
    return Tensor(c.g.node(op, names), tuple(shape))


def scatter_nd(c, args, params, aval, reduction: str = "none"):
    """``lax.scatter`` (and its reducing forms) as ONNX ``ScatterND`` of single elements."""
    operand, indices, updates = args
    dn, rank = params["dimension_numbers"], len(aval.shape)
    mode = str(params["mode"])
    ushape, urank = _shape(updates), len(_shape(updates))
    window = tuple(int(d) for d in dn.update_window_dims)
    scattered = [d for d in range(urank) if d not in window]  # the indices' leading axes
    batching = tuple(int(d) for d in dn.operand_batching_dims)
    receiving = [d for d in range(rank) if d not in dn.inserted_window_dims and d not in batching]
    if isinstance(indices, Tensor):
        index = Tensor(c.g.node("Cast", [c.nhwc(indices)], to=_INT64), tuple(indices.shape))
    else:
        index = np.asarray(indices, np.int64)

    def component(p):  # the indices' p-th coordinate, on the updates' scatter axes
        if isinstance(index, Tensor):
            k = len(index.shape) - 1
            part = Tensor(c.g.node("Squeeze", [c.g.node("Slice", [
                index.name, c.g.ints([p]), c.g.ints([p + 1]), c.g.ints([k])]),
                c.g.ints([k])]), tuple(index.shape[:-1]))
        else:
            part = index[..., p]
        return _placed(c, part, scattered, urank)

    coords, valid = [], True
    for od in range(rank):
        start = None
        if od in dn.scatter_dims_to_operand_dims:
            start = component(list(dn.scatter_dims_to_operand_dims).index(od))
        if od in batching:  # paired with an axis of the indices' own batch
            axis = dn.scatter_indices_batching_dims[batching.index(od)]
            start = _iota(c, ushape[scattered[axis]], scattered[axis], urank)
        size = 1
        if od in receiving:
            size = ushape[window[receiving.index(od)]]
        if start is not None and od not in batching and "PROMISE" not in mode:
            dim = aval.shape[od]
            if not concrete(size):
                raise TranslationError(f"a scatter of windows of size {size} not known at export")
            # a window wholly inside starts in [0, last] (the batch's: a value of the graph)
            last = np.int64(int(dim) - int(size)) if concrete(dim) else Tensor(c.g.node(
                "Sub", [c.shape_tensor((dim,)), c.g.ints([int(size)])]), (1,))
            if "CLIP" in mode:
                start = _binary(c, "Min", _binary(c, "Max", start, np.int64(0)), last)
            else:  # FILL_OR_DROP: windows not wholly inside are dropped
                inside = _binary(c, "And", _binary(c, "GreaterOrEqual", start, np.int64(0)),
                                 _binary(c, "LessOrEqual", start, last))
                valid = inside if valid is True else _binary(c, "And", valid, inside)
        coord = start
        if od in receiving:
            offset = _iota(c, size, window[receiving.index(od)], urank)
            coord = offset if coord is None else _binary(c, "Add", coord, offset)
        coords.append(coord if coord is not None else np.zeros((1,) * urank, np.int64))
    if not isinstance(valid, Tensor) and np.all(valid):
        valid = True
    if valid is not True and not isinstance(valid, Tensor) and not np.any(valid):
        return operand  # every window outside: all dropped
    data = c.nhwc(operand) if isinstance(operand, Tensor) else c.g.const(
        np.asarray(operand, aval.dtype))
    pad_axis = None
    if valid is not True:  # dropped elements go to one extra slot of a padded axis, cut after
        known = [d for d in range(rank) if concrete(aval.shape[d])]
        pad_axis = max(known) if known else 0  # (none known: a multiple of the batch)
        pads = [0] * (2 * rank)
        pads[rank + pad_axis] = 1
        data = c.g.node("Pad", [data, c.g.ints(pads)])
        size = aval.shape[pad_axis]
        end = c.g.ints([int(size)]) if concrete(size) else c.shape_tensor((size,))
        spare_slot = np.int64(size) if concrete(size) else Tensor(
            c.g.node("Reshape", [end, c.g.ints([1] * urank)]), (1,) * urank)
        for od, coord in enumerate(coords):  # at 0 along the others, the spare slot along it
            spare = spare_slot if od == pad_axis else np.int64(0)
            if any(isinstance(v, Tensor) for v in (valid, coord, spare)):
                names = [v.name if isinstance(v, Tensor) else c.g.const(np.asarray(v))
                         for v in (valid, coord, spare)]
                coords[od] = Tensor(c.g.node("Where", names), (1,) * urank)  # expanded below
            else:
                coords[od] = np.where(valid, coord, spare)
    full = c.shape_tensor(ushape)
    columns = []
    for coord in coords:
        name = coord.name if isinstance(coord, Tensor) else c.g.const(np.asarray(coord))
        columns.append(c.g.node("Unsqueeze", [c.g.node("Expand", [name, full]),
                                              c.g.ints([urank])]))
    where = c.g.node("Concat", columns, axis=urank)
    values = c.nhwc(updates) if isinstance(updates, Tensor) else c.g.const(
        np.asarray(updates, aval.dtype))
    attrs = {} if reduction == "none" else {"reduction": reduction}
    out = c.g.node("ScatterND", [data, where, values], **attrs)
    if pad_axis is not None:
        out = c.g.node("Slice", [out, c.g.ints([0]), end, c.g.ints([pad_axis])])
    return Tensor(out, tuple(aval.shape))


def scatter_sub(c, args, params, aval):
    """``x.at[idx].subtract(y)``: the updates negated, added."""
    operand, indices, updates = args
    negated = Tensor(c.g.node("Neg", [c.nhwc(updates)]), tuple(updates.shape)) \
        if isinstance(updates, Tensor) else -np.asarray(updates)
    return scatter_nd(c, [operand, indices, negated], params, aval, reduction="add")


HANDLERS = {
    "scatter-add": functools.partial(scatter_nd, reduction="add"),
    "scatter-sub": scatter_sub,
    "scatter-mul": functools.partial(scatter_nd, reduction="mul"),
}  # scatter-min / scatter-max: ScatterND's reductions of opset 18, newer than the graph's
