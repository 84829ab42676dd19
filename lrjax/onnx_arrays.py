"""ONNX translations of the primitives that rearrange, select or scan along one axis: ``split``
(``jnp.split``), ``stack`` (``jnp.stack``), ``rev`` (``jnp.flip``; reflect padding is built
from it), ``argmax``, ``top_k`` (``lax.top_k``: a mixture-of-experts router's choice) and ``cumsum``
(``jnp.cumsum``: an expert's buffer positions); :func:`take`, the ``gather`` handler's case of
indices of the data (an embedding lookup of class labels), :func:`constant_windows`, windows of
one axis at constant starts (an STFT's frames), and :func:`gather_nd`, any gather of
single elements or whole trailing slices (``jnp.take_along_axis``, ``x[rows, cols]``: a masked
autoencoder's kept tokens) as ONNX ``GatherND``; ``dynamic_slice`` and ``dynamic_update_slice``
(a KV cache read and written at the decoding position), ``scatter`` of one window
(``x.at[...].set(y)``); :func:`pool`, pooling windows (dilated too: ``MaxPool``'s
dilations, a sum as a depthwise conv of ones), and :func:`pool_folded`, a pooling window over
more than 3 axes with its unit-window axes folded into the batch; :func:`as_dtype` casts a ``dot_general``'s
operands of other dtypes. Handlers of :data:`lrjax.onnx_convert.HANDLERS`: ``handler(converter, args, params,
out_aval)``, in the converter's layout (an NCHW tensor stays NCHW where the result is 4-D)."""

from __future__ import annotations

import functools
import operator

import jax
import numpy as np
from onnx import helper

from lrjax import onnx_scatter
from lrjax.onnx_graph import (
    INT64_MAX,
    Tensor,
    TranslationError,
    channels_first,
    channels_last,
    concrete,
    onnx_dtype,
    same_dim,
)

__all__ = ["split", "stack", "rev", "argmax", "top_k", "cumsum", "gather", "iota",
           "dim_as_value", "dynamic_slice", "dynamic_update_slice", "scatter"]  # handlers, by primitive


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


def arg_reduction(op: str):
    """The handler of ``jnp.argmax`` / ``jnp.argmin``: ONNX ``ArgMax`` / ``ArgMin`` (on the
    NHWC value), cast to the index dtype."""
    def handler(c, args, params, aval):
        (axis,) = params["axes"]
        out = c.g.node(op, [c.nhwc(args[0])], axis=int(axis), keepdims=0)
        return Tensor(c.g.node("Cast", [out], to=onnx_dtype(params["index_dtype"])),
                      tuple(aval.shape))
    return handler


argmax = arg_reduction("ArgMax")


def gather(c, args, params, aval):
    """``jnp.take`` along one axis with constant indices (a nearest ``jax.image.resize``) as
    ONNX ``Gather``; a gather from one constant start (static indexing traced with a symbolic
    batch: ``x[:, 1:]``, ``x[:, 0]`` (a ViT's class token), ``x[:, :, 0, 0]``) as ``Slice``
    then ``Squeeze`` of the indexed axes it drops; others: :func:`gather_nd`."""
    x, idx = args
    if isinstance(idx, Tensor):
        return take(c, args, params, aval)
    dn, sizes, rank = params["dimension_numbers"], params["slice_sizes"], len(x.shape)
    axes, dropped = tuple(dn.start_index_map), tuple(dn.collapsed_slice_dims)
    point = np.ndim(idx) == 1  # one start: a static slice
    if dn.operand_batching_dims or not axes or \
            np.ndim(idx) not in (1, 2) or np.shape(idx)[-1] != len(axes) or \
            not set(dropped) <= set(axes) or not all(concrete(sizes[a]) for a in axes) or \
            (not point and (len(axes) != 1 or dropped != axes)):
        return gather_nd(c, args, params, aval)  # take_along_axis, ...
    starts = np.asarray(idx).reshape(-1, len(axes)).astype(np.int64)
    if params["mode"] != jax.lax.GatherScatterMode.FILL_OR_DROP and all(
            concrete(x.shape[a]) for a in axes):  # clamped, as JAX clamps them
        starts = np.clip(starts, 0, [int(x.shape[a]) - int(sizes[a]) for a in axes])
    ends = starts + [int(sizes[a]) for a in axes]
    whole = all(s == 1 if i in dropped else i in axes or same_dim(s, d)
                for i, (s, d) in enumerate(zip(sizes, x.shape, strict=True)))
    # the indices' axis: in the gathered axis's place (jnp.take), or elsewhere (jnp.percentile
    # of several q puts it first)
    placed = next((p for p in range(rank) if tuple(dn.offset_dims) == tuple(
        i for i in range(rank) if i != p)), None)
    offsets = tuple(range(rank - len(dropped))) if point else tuple(dn.offset_dims)
    if not whole or tuple(dn.offset_dims) != offsets or starts.min(initial=0) < 0 or \
            (not point and placed is None) or np.any(ends > [int(x.shape[a]) for a in axes]):
        raise TranslationError(f"a gather of slices {sizes} at indices in "
                               f"[{starts.min(initial=0)}, {starts.max(initial=0)}] of "
                               f"{x.shape}")
    if point:  # dropped axes change the rank: then in the logical layout
        nchw = x.nchw and not dropped
        y = c.g.node("Slice", [x.name if nchw else c.nhwc(x), c.g.ints(starts[0]),
                               c.g.ints(ends[0]), c.g.ints(
                                   [c.axis(x, a) if nchw else a for a in axes])])
        if dropped:
            y = c.g.node("Squeeze", [y, c.g.ints(dropped)])
        return Tensor(y, tuple(aval.shape), nchw)
    if placed == axes[0]:
        y = c.g.node("Gather", [x.name, c.g.ints(starts[:, 0])], axis=c.axis(x, axes[0]))
        return Tensor(y, tuple(aval.shape), x.nchw)
    y = c.g.node("Gather", [c.nhwc(x), c.g.ints(starts[:, 0])], axis=axes[0])
    order = [i for i in range(rank) if i != axes[0]]
    order.insert(placed, axes[0])
    return Tensor(c.g.node("Transpose", [y], perm=order), tuple(aval.shape))


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
        return gather_nd(c, args, params, aval)
    data = c.nhwc(x) if isinstance(x, Tensor) else c.g.const(np.asarray(x))
    indices = c.g.node("Cast", [c.g.node("Squeeze", [c.nhwc(idx), c.g.ints([batch])])],
                       to=onnx_dtype(np.int64))
    return Tensor(c.g.node("Gather", [data, indices], axis=axes[0]), tuple(aval.shape))


def gather_nd(c, args, params, aval):
    """A ``gather`` whose every indexed or batching axis is taken one element at a time and whose
    other axes are taken whole (``jnp.take_along_axis``, ``x[jnp.arange(n), idx]``, integer
    indexing of several axes) as one ONNX ``GatherND``: the operand transposed to (batching axes,
    indexed axes, the rest), the indices to (their batching axes, the others, the index vector),
    ``batch_dims`` the batching axes, the result transposed to the gather's order. Constant
    indices out of range fail here. ONNX Runtime rejects indices out of range, which JAX clamps
    or fills: indices of the data are clamped into range, and where JAX's ``FILL_OR_DROP`` mode
    fills, the gathered values are its fill value."""
    x, idx = args
    dn, sizes, shape = params["dimension_numbers"], params["slice_sizes"], np.shape(x)
    batching, mapped = tuple(dn.operand_batching_dims), tuple(int(i) for i in dn.start_index_map)
    # an indexed axis taken whole has its start clamped to 0: its index is dropped (NaFlex pads
    # its coordinates with one for the features)
    keep = [k for k, i in enumerate(mapped) if i in dn.collapsed_slice_dims]
    indexed = tuple(mapped[k] for k in keep)
    rest = [i for i in range(len(shape)) if i not in batching + indexed]
    if not indexed or set(dn.collapsed_slice_dims) != set(indexed) or len(set(mapped)) != len(
            mapped) or any(sizes[i] != 1 for i in batching + indexed) or not all(
            same_dim(sizes[i], shape[i]) for i in rest):
        if _batched_windows(dn, sizes, len(shape), np.shape(idx)):
            return windows(c, args, params, aval)
        if not isinstance(idx, Tensor) and _one_windowed_axis(dn, sizes, shape) is not None:
            return constant_windows(c, args, params, aval)
        raise TranslationError(f"only gathers of single elements along the indexed axes (whole "
                               f"slices along the others) are covered; got {dn}, slices {sizes}")
    if len(keep) < len(mapped):
        idx = Tensor(c.g.node("Gather", [c.nhwc(idx), c.g.ints(keep)], axis=len(idx.shape) - 1),
                     (*idx.shape[:-1], len(keep))) if isinstance(idx, Tensor) \
            else np.asarray(idx)[..., keep]
    if not isinstance(idx, Tensor):
        bound = np.asarray([shape[i] for i in indexed])
        if params["mode"] != jax.lax.GatherScatterMode.FILL_OR_DROP:  # clamped, as in JAX
            idx = np.clip(idx, 0, bound - 1)
        if np.any(np.asarray(idx) < 0) or np.any(np.asarray(idx) >= bound):
            raise TranslationError(f"a gather at constant indices outside {tuple(bound)}")
    idx_rank = len(np.shape(idx))
    idx_order = list(dn.start_indices_batching_dims) + [
        i for i in range(idx_rank - 1) if i not in dn.start_indices_batching_dims]
    data = c.nhwc(x) if isinstance(x, Tensor) else c.g.const(np.asarray(x))
    data = c.g.node("Transpose", [data], perm=list(batching + indexed) + rest)
    index = c.nhwc(idx) if isinstance(idx, Tensor) else c.g.const(np.asarray(idx))
    index = c.g.node("Transpose", [c.g.node("Cast", [index], to=onnx_dtype(np.int64))],
                     perm=idx_order + [idx_rank - 1])
    valid = None
    if isinstance(idx, Tensor):  # as JAX: clamped, or filled (along a symbolic axis: as given)
        clamped = c.g.node("Min", [c.g.node("Max", [index, c.g.ints(0)]), c.g.ints([
            int(shape[i]) - 1 if concrete(shape[i]) else INT64_MAX for i in indexed])])
        if params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
            valid = c.g.node("ReduceMin", [c.g.node("Cast", [c.g.node("Equal", [
                index, clamped])], to=onnx_dtype(np.int32))], axes=[-1], keepdims=0)
        index = clamped
    y = c.g.node("GatherND", [data, index], batch_dims=len(batching))
    if valid is not None:  # the fill value where an index was out of range
        fill = params.get("fill_value")
        dtype = np.dtype(aval.dtype)
        fill = fill if fill is not None else np.nan if np.issubdtype(dtype, np.inexact) else \
            True if dtype == np.dtype(bool) else np.iinfo(dtype).min if np.issubdtype(
                dtype, np.signedinteger) else np.iinfo(dtype).max
        valid = c.g.node("Cast", [c.g.node("Unsqueeze", [valid, c.g.ints(list(range(
            idx_rank - 1, idx_rank - 1 + len(rest))))])], to=onnx_dtype(bool))
        y = c.g.node("Where", [valid, y, c.g.const(np.asarray(fill, dtype))])
    offsets, out_perm, k = tuple(dn.offset_dims), [], 0
    for p in range(len(aval.shape)):  # each output axis: where GatherND put it
        if p in offsets:
            out_perm.append(len(idx_order) + offsets.index(p))
        else:
            out_perm.append(idx_order.index(k))
            k += 1
    return Tensor(c.g.node("Transpose", [y], perm=out_perm), tuple(aval.shape))


def _batched_windows(dn, sizes, rank: int, idx_shape) -> bool:
    """Whether a gather is a ``dynamic_slice`` under ``jax.vmap``: the leading batching axes
    taken one row at a time, each row a window (whole along unindexed axes) from its own start,
    nothing dropped, the output (batch, the operand's other axes)."""
    batching = tuple(int(i) for i in dn.operand_batching_dims)
    nb = len(batching)
    return bool(batching) and batching == tuple(range(nb)) and not dn.collapsed_slice_dims \
        and tuple(dn.start_indices_batching_dims) == tuple(range(nb)) \
        and len(idx_shape) == nb + 1 and all(sizes[i] == 1 for i in batching) \
        and tuple(dn.offset_dims) == tuple(range(nb, rank)) \
        and not set(int(i) for i in dn.start_index_map) & set(batching)


def windows(c, args, params, aval):
    """A ``dynamic_slice`` under ``jax.vmap`` (``jnp.roll`` by each row's own shift: Flax's
    sst2 example flips each padded sequence within its length) as ONNX ``GatherElements``, one
    per windowed axis: each row's start clamped into ``[0, dim - size]`` (the gather's ``CLIP``
    mode, as ``dynamic_slice`` clamps), plus ``0 .. size - 1``, broadcast over the other axes."""
    x, idx = args
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    nb, rank = len(dn.operand_batching_dims), len(np.shape(x))
    data = c.nhwc(x) if isinstance(x, Tensor) else c.g.const(np.asarray(x))
    index = c.nhwc(idx) if isinstance(idx, Tensor) else c.g.const(np.asarray(idx))
    index = c.g.node("Cast", [index], to=onnx_dtype(np.int64))
    shape = list(np.shape(x))
    for k, axis in enumerate(int(a) for a in dn.start_index_map):
        size, dim = sizes[axis], shape[axis]
        if same_dim(size, dim):
            continue  # a start on an axis taken whole is clamped to 0
        if not (concrete(size) and concrete(dim)):
            raise TranslationError(f"a window of {size} of an axis of size {dim}")
        start = c.g.node("Gather", [index, c.g.ints([k])], axis=nb)  # (*batch, 1)
        start = c.g.node("Min", [c.g.node("Max", [start, c.g.ints([0])]),
                                 c.g.ints([int(dim) - int(size)])])
        positions = c.g.node("Add", [start, c.g.ints(np.arange(int(size)).reshape(
            (1,) * nb + (int(size),)))])  # (*batch, size)
        ranked = c.g.node("Unsqueeze", [positions, c.g.ints(list(range(nb + 1, rank)))]) \
            if rank > nb + 1 else positions  # (*batch, size, 1, ...)
        if axis != nb:  # the window's axis into its place
            perm = list(range(rank))
            perm.insert(axis, perm.pop(nb))
            ranked = c.g.node("Transpose", [ranked], perm=perm)
        shape[axis] = int(size)
        target = c.shape_tensor(tuple(shape))
        data = c.g.node("GatherElements", [data, c.g.node("Expand", [ranked, target])],
                        axis=axis)
    return Tensor(data, tuple(aval.shape))


def _one_windowed_axis(dn, sizes, shape) -> int | None:
    """The one axis a gather takes windows of (slices shorter than the axis, nothing dropped,
    no batching axes; every other indexed axis taken whole, its start clamped to 0), or
    ``None``."""
    if dn.operand_batching_dims or dn.collapsed_slice_dims:
        return None
    windowed = [int(a) for a in dn.start_index_map if not same_dim(sizes[a], shape[a])]
    return windowed[0] if len(windowed) == 1 and concrete(shape[windowed[0]]) else None


def constant_windows(c, args, params, aval):
    """A gather of windows of one axis at constant starts (``jax.scipy.signal.stft``'s frames:
    ``(frames, batch, nperseg)`` from ``(batch, time)``) as one ONNX ``Gather`` of that axis at
    every window's positions (each start clamped into ``[0, dim - size]``, as JAX clamps it),
    transposed to the gather's output order."""
    x, idx = args
    dn, sizes, shape = params["dimension_numbers"], params["slice_sizes"], np.shape(x)
    axis = _one_windowed_axis(dn, sizes, shape)
    size, dim = int(sizes[axis]), int(shape[axis])
    starts = np.asarray(idx)[..., list(dn.start_index_map).index(axis)].astype(np.int64)
    if params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP and (
            starts.min(initial=0) < 0 or starts.max(initial=0) > dim - size):
        raise TranslationError(f"windows of {size} at starts outside [0, {dim - size}]")
    positions = np.clip(starts, 0, dim - size)[..., None] + np.arange(size)  # (*I, size)
    data = c.nhwc(x) if isinstance(x, Tensor) else c.g.const(np.asarray(x))
    y = c.g.node("Gather", [data, c.g.ints(positions)], axis=axis)
    # Gather's layout: operand axes before `axis`, the index dims, the window, the rest
    n_index, rank = positions.ndim - 1, len(shape)
    where = [i if i < axis else i + n_index for i in range(rank)]
    where[axis] = axis + n_index
    offsets, perm, k = tuple(dn.offset_dims), [], 0
    for p in range(len(aval.shape)):
        if p in offsets:
            perm.append(where[offsets.index(p)])
        else:
            perm.append(axis + k)
            k += 1
    if perm != list(range(len(perm))):
        y = c.g.node("Transpose", [y], perm=perm)
    return Tensor(y, tuple(aval.shape))


def iota(c, args, params, aval):
    """``jnp.arange`` of the symbolic batch's size or broadcast over it (the row indices of
    ``x[jnp.arange(len(x)), idx]``): ONNX ``Range`` up to the batch, or the constant values,
    reshaped onto the primitive's axis and expanded to its shape."""
    shape, axis = tuple(params["shape"]), int(params["dimension"])
    if concrete(shape[axis]):
        values = c.g.const(np.arange(shape[axis], dtype=aval.dtype))
    else:
        size = c.g.node("Squeeze", [c.shape_tensor((shape[axis],))])
        values = c.g.node("Range", [c.g.ints(0), size, c.g.ints(1)])
        values = c.g.node("Cast", [values], to=onnx_dtype(aval.dtype))
    ranked = c.g.ints([-1 if i == axis else 1 for i in range(len(shape))])
    y = c.g.node("Expand", [c.g.node("Reshape", [values, ranked]), c.shape_tensor(shape)])
    return Tensor(y, tuple(aval.shape))


def dim_as_value(c, args, params, aval):
    """The symbolic batch's size as a value (``x.shape[0]`` in arithmetic: negative indices
    wrapped by ``jnp`` indexing): a scalar of the graph input's shape."""
    size = c.g.node("Squeeze", [c.shape_tensor((params["dim"],))])
    return Tensor(c.g.node("Cast", [size], to=onnx_dtype(aval.dtype)), ())


def dynamic_slice(c, args, params, aval):
    """``lax.dynamic_slice`` (Flax's lm1b example shifts its tokens right with
    ``dynamic_slice_in_dim(padded, 0, ...)``; ``x[0]`` of a symbolic batch starts at an index
    wrapped by the batch's size): a ``Slice``, each start clamped as JAX clamps it (into
    ``[0, dim - size]``), in the graph (``Max``, ``Min``) where the start or the dim is not
    known at export."""
    t, starts, sizes = args[0], args[1:], tuple(params["slice_sizes"])
    known = all(not isinstance(s, Tensor) for s in starts)
    if not isinstance(t, Tensor):  # a table of constants (position codes) read at an index
        if known:
            return np.asarray(jax.lax.dynamic_slice(np.asarray(t), [np.asarray(s) for s in starts],
                                                    sizes))
        t = Tensor(c.g.const(np.asarray(t)), tuple(np.shape(t)))
    cut = [(ax, s, size, dim) for ax, (s, size, dim) in
           enumerate(zip(starts, sizes, t.shape, strict=True)) if not same_dim(size, dim)]
    if not cut:
        return t
    if known and all(concrete(dim) for _, _, _, dim in cut):
        first = {ax: min(max(int(np.asarray(s)), 0), int(dim) - int(size))
                 for ax, s, size, dim in cut}
        return c.slice([t], dict(
            start_indices=[first.get(ax, 0) for ax in range(len(sizes))],
            limit_indices=[first[ax] + int(sizes[ax]) if ax in first else dim
                           for ax, dim in enumerate(t.shape)]), aval)
    begin, end = [], []
    for _, s, size, dim in cut:
        first = _clamped_start(c, s, size, dim)
        begin.append(first)
        end.append(c.g.node("Add", [first, c.g.ints([int(size)])]))
    out = c.g.node("Slice", [t.name, c.g.node("Concat", begin, axis=0),
                             c.g.node("Concat", end, axis=0),
                             c.g.ints([c.axis(t, ax) for ax, _, _, _ in cut])])
    return Tensor(out, tuple(aval.shape), t.nchw)


def dynamic_update_slice(c, args, params, aval):
    """``lax.dynamic_update_slice`` (a KV cache written at the decoding position: bonsai's
    Qwen 3, Flax's attention with ``decode=True``): the update padded to the operand's shape
    (``Pad``), each start clamped as JAX clamps it (into ``[0, dim - size]``), and taken where
    the written window's mask is true (``Where``); starts and dims may be unknown at export."""
    t, u, starts = args[0], args[1], args[2:]
    t, u = (a if isinstance(a, Tensor) else Tensor(c.g.const(np.asarray(a, aval.dtype)),
                                                   tuple(np.shape(a))) for a in (t, u))
    cut = [(ax, s, size, dim) for ax, (s, size, dim) in
           enumerate(zip(starts, u.shape, t.shape, strict=True)) if not same_dim(size, dim)]
    if not cut:  # the whole operand written
        return Tensor(c.nhwc(u), tuple(aval.shape))
    rank, zero = len(aval.shape), c.g.ints([0])
    before, after, mask = [zero] * rank, [zero] * rank, None
    for ax, s, size, dim in cut:
        first = _clamped_start(c, s, size, dim)
        last = c.g.node("Add", [first, c.g.ints([int(size)])])
        extent = c.g.ints([int(dim)]) if concrete(dim) else c.shape_tensor((dim,))
        before[ax], after[ax] = first, c.g.node("Sub", [extent, last])
        positions = c.g.node("Range", [c.g.const(np.asarray(0, np.int64)),
                                       c.g.node("Squeeze", [extent, c.g.ints([0])]),
                                       c.g.const(np.asarray(1, np.int64))])
        inside = c.g.node("And", [c.g.node("GreaterOrEqual", [positions, first]),
                                  c.g.node("Less", [positions, last])])
        inside = c.g.node("Reshape", [inside, c.g.ints([-1 if i == ax else 1
                                                        for i in range(rank)])])
        mask = inside if mask is None else c.g.node("And", [mask, inside])
    padded = c.g.node("Pad", [c.nhwc(u), c.g.node("Concat", before + after, axis=0)])
    return Tensor(c.g.node("Where", [mask, padded, c.nhwc(t)]), tuple(aval.shape))


def scatter(c, args, params, aval):
    """A ``scatter`` that writes one window at one start: ``x.at[...].set(y)`` (an NNX variable
    assigned as ``v[...] = y``: Qwen 3-VL writes its KV cache so), ``x.at[a:b].set(y)`` or
    ``x.at[:, i].set(y)``, ``i`` known at export or a value of the graph (a decoder writing its
    cache at a computed position), translated as :func:`dynamic_update_slice`; a window past
    the end is dropped, as JAX's ``FILL_OR_DROP`` mode drops it (``CLIP``: clamped)."""
    operand, indices, update = args
    dn, rank = params["dimension_numbers"], len(aval.shape)
    inserted = tuple(dn.inserted_window_dims)  # x.at[:, 5].set(y): y without that axis
    if dn.operand_batching_dims or len(np.shape(indices) if not isinstance(
            indices, Tensor) else indices.shape) != 1 or \
            tuple(dn.update_window_dims) != tuple(range(rank - len(inserted))) or \
            params.get("update_jaxpr") is not None:
        return onnx_scatter.scatter_nd(c, args, params, aval)  # any other: ScatterND
    if inserted:
        size = iter(update.shape if isinstance(update, Tensor) else np.shape(update))
        unit = tuple(1 if i in inserted else next(size) for i in range(rank))
        update = c.reshape([update], {}, jax.ShapeDtypeStruct(unit, aval.dtype)) \
            if isinstance(update, Tensor) else np.reshape(update, unit)
    starts: list = [np.asarray(0)] * rank
    for k, axis in enumerate(dn.scatter_dims_to_operand_dims):
        starts[axis] = Tensor(c.g.node("Slice", [c.nhwc(indices), c.g.ints([k]), c.g.ints(
            [k + 1])]), (1,)) if isinstance(indices, Tensor) else np.asarray(indices)[k]
    size = update.shape if isinstance(update, Tensor) else np.shape(update)
    drop = "FILL_OR_DROP" in str(params["mode"])
    if not isinstance(indices, Tensor):
        inside = all(not concrete(d) or 0 <= int(s) <= int(d) - int(n)
                     for s, n, d in zip(starts, size, aval.shape, strict=True))
        if not inside and drop:
            return operand
    written = dynamic_update_slice(c, [operand, update, *starts], {}, aval)
    if not isinstance(indices, Tensor) or not drop:
        return written
    inside = None  # in the graph: each computed start within [0, dim - size]
    for s, n, d in zip(starts, size, aval.shape, strict=True):
        if isinstance(s, Tensor):
            if not concrete(d):
                raise TranslationError(f"a scatter at a computed start along a dim {d}")
            start = c.g.node("Cast", [s.name], to=7)
            ok = c.g.node("And", [c.g.node("GreaterOrEqual", [start, c.g.ints([0])]),
                                  c.g.node("LessOrEqual", [start, c.g.ints([int(d) - int(n)])])])
            inside = ok if inside is None else c.g.node("And", [inside, ok])
    kept = operand if isinstance(operand, Tensor) else Tensor(
        c.g.const(np.asarray(operand, aval.dtype)), tuple(np.shape(operand)))
    return Tensor(c.g.node("Where", [inside, written.name, c.nhwc(kept)]), tuple(aval.shape))


def _clamped_start(c, s, size, dim) -> str:
    """A 1-element int64 tensor: the start ``s`` (a graph scalar or a constant) of a window of
    ``size`` along an axis of ``dim``, clamped into ``[0, dim - size]`` as ``lax`` clamps it."""
    if not concrete(size):
        raise TranslationError(f"a slice of size {size} not known at export")
    if isinstance(s, Tensor):
        start = c.g.node("Cast", [c.g.node("Reshape", [s.name, c.g.ints([1])])], to=7)
    else:
        start = c.g.ints([int(np.asarray(s))])
    last = c.g.ints([int(dim) - int(size)]) if concrete(dim) else \
        c.g.node("Sub", [c.shape_tensor((dim,)), c.g.ints([int(size)])])
    return c.g.node("Min", [c.g.node("Max", [start, c.g.ints([0])]), last])


def _pool_widened(c, op: str, x: Tensor, params, aval) -> Tensor:
    """A window over the leading or the last axis, or over a 1-D or 2-D array (the padding
    flags of a framed signal, ``(batch, samples)`` pooled along the samples): pooled with a unit
    axis put first and last (``Reshape``), so that every window axis is spatial."""
    def widened(key, unit):
        return (unit, *params[key], unit)

    window = dict(params, **{k: widened(k, 1) for k in (
        "window_dimensions", "window_strides", "base_dilation", "window_dilation")},
        padding=widened("padding", (0, 0)))
    wide = c.reshape([x], {}, jax.ShapeDtypeStruct((1, *x.shape, 1), aval.dtype))
    y = pool(c, op, [wide], window, jax.ShapeDtypeStruct((1, *aval.shape, 1), aval.dtype))
    return c.reshape([y], {}, aval)


def pool_folded(c, op: str, args, params, aval):
    """A pooling window over more than 3 axes (Flax's pool of a 5-D tensor with a 4-D window,
    which it takes as unbatched: Gemma 3's multimodal projector, ``nnx.avg_pool(x[..., None],
    (1, 1, k, k))``): the axes of unit window (size and stride 1, no padding) moved next to the
    leading one and folded into it (``Transpose``, ``Reshape``), the others pooled by
    ``converter.pool``, and the result unfolded."""
    x, rank = args[0], len(args[0].shape)
    dims, strides, pads = (params[k] for k in ("window_dimensions", "window_strides", "padding"))
    unit = [i for i in range(1, rank - 1) if dims[i] == 1 and strides[i] == 1
            and tuple(pads[i]) == (0, 0)]
    pooled = [i for i in range(1, rank - 1) if i not in unit]
    if len(pooled) > 3:
        raise TranslationError(f"pooling over {len(pooled)} axes (ONNX's take 3 at most): "
                               f"window {tuple(dims)}")
    order, lead = [0, *unit, *pooled, rank - 1], functools.reduce(
        operator.mul, [x.shape[i] for i in (0, *unit)])
    moved = c.transpose([x], {"permutation": order}, jax.ShapeDtypeStruct(
        tuple(x.shape[i] for i in order), aval.dtype))
    flat = c.reshape([moved], {}, jax.ShapeDtypeStruct(
        (lead, *(x.shape[i] for i in pooled), x.shape[-1]), aval.dtype))
    window = dict(params, window_dimensions=(1, *(dims[i] for i in pooled), 1),
                  window_strides=(1, *(strides[i] for i in pooled), 1),
                  padding=((0, 0), *(pads[i] for i in pooled), (0, 0)),
                  base_dilation=(1,) * (len(pooled) + 2), window_dilation=(1,) * (len(pooled) + 2))
    y = pool(c, op, [flat], window, jax.ShapeDtypeStruct(
        (lead, *(aval.shape[i] for i in pooled), aval.shape[-1]), aval.dtype))
    y = c.reshape([y], {}, jax.ShapeDtypeStruct(tuple(aval.shape[i] for i in order), aval.dtype))
    return c.transpose([y], {"permutation": [int(i) for i in np.argsort(order)]}, aval)


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


def pool(c, op: str, args, params, aval) -> Tensor:
    """``MaxPool`` (reduce_window_max) or ``AveragePool`` times the window size
    (reduce_window_sum) over the spatial dims of a channels-last tensor (NHWC, NWC, NDHWC)."""
    x, rank = args[0], len(args[0].shape)
    dims, strides, pads = params["window_dimensions"], params["window_strides"], \
        [tuple(int(v) for v in p) for p in params["padding"]]
    if rank < 3 or dims[0] != 1 or dims[-1] != 1 or pads[0] != (0, 0) or pads[-1] != (0, 0):
        return _pool_widened(c, op, x, params, aval)
    if rank > 5:  # over more than 3 axes (ONNX Runtime's most): unit windows to the batch
        return pool_folded(c, op, args, params, aval)
    dilation = [int(d) for d in params["window_dilation"]]
    if any(d != 1 for d in params["base_dilation"]) or dilation[0] != 1 or dilation[-1] != 1:
        raise TranslationError("a pooling window over a dilated input")
    space = range(1, rank - 1)
    attrs = dict(kernel_shape=[int(dims[i]) for i in space],
                 strides=[int(strides[i]) for i in space],
                 pads=[pads[i][0] for i in space] + [pads[i][1] for i in space])
    source = c.nchw(x) if rank == 4 else \
        c.g.node("Transpose", [x.name], perm=channels_first(rank - 2))
    dilated = any(d != 1 for d in dilation)
    if dilated:  # MaxPool's dilations (AveragePool takes them from opset 19 only)
        attrs["dilations"] = [dilation[i] for i in space]
    if op == "AveragePool" and dilated:  # the window's sum as a depthwise conv of ones
        channels = int(x.shape[-1])
        ones = np.ones((channels, 1, *attrs.pop("kernel_shape")), aval.dtype)
        y = c.g.node("Conv", [source, c.g.const(ones)], "window_sum", group=channels, **attrs)
    elif op == "AveragePool":  # reduce_window_sum: the average times the window size
        y = c.g.node(op, [source], op.lower(), count_include_pad=1, **attrs)
        y = c.g.node("Mul", [y, c.g.const(np.asarray(np.prod(dims), aval.dtype))])
    else:
        y = c.g.node(op, [source], op.lower(), **attrs)
    if rank != 4:
        return Tensor(c.g.node("Transpose", [y], perm=channels_last(rank - 2)), tuple(aval.shape))
    return Tensor(y, tuple(aval.shape), True)
