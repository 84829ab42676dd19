"""Partitioning metadata of the variables, read through and given to the factors.

Models written for sharded training annotate their parameters. In linen,
``nn.with_partitioning(init, names)`` and ``nn.with_logical_partitioning`` store
:class:`flax.linen.Partitioned` / ``LogicallyPartitioned`` leaves (a value and one mesh- or
logical-axis name per axis) that ``nn.get_partition_spec`` reads; in NNX,
``nnx.with_partitioning`` gives a variable ``out_sharding`` metadata. The surgery works on the
plain arrays (:func:`unboxed`) and gives the decomposed layers the annotations back
(:func:`reboxed`, :func:`shard_pair_like`): every variable it keeps keeps its own, the bias of a
split layer its own, and the factors the names of the kernel axes they carry
(:func:`factor_names`): ``vertical/kernel`` the input side's (a conv's rows and input channels, a
dense layer's input axes), ``horizontal/kernel`` the output side's (a conv's columns and output
channels, a dense layer's output axes), both the stack axis of a scanned layer, and the new rank
axis none (replicated). An axis whose size is not the kernel axis's, or a kernel whose layout is
not one of those (an einsum's interleaved axes, a transposed kernel), is left unnamed. NNX
annotations given as a ``PartitionSpec`` or a ``NamedSharding`` are read by their spec and given
back in that form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lrjax import ragged
from lrjax.sites import ConvSite, batch_position, variable_key

__all__ = ["unboxed", "reboxed", "factor_names", "shard_pair_like"]


def unboxed(tree):
    """``tree`` with every ``AxisMetadata`` box replaced by its value (``nn.meta.unbox``)."""
    return nn.meta.unbox(tree)


_RANK = (None, None)  # the factors' new axis: unnamed, and no size of the kernel's


def _layout(site: ConvSite, axes: tuple) -> tuple[tuple, tuple] | None:
    """The kernel's ``axes`` (``(name, size)`` pairs) laid out as the two factors' axes, or None
    where the layout is not a plain one (see the module docstring)."""
    if site.stacked:  # the stack's axis where the factors have it (batch_position)
        at = site.stack_axis
        inner = _layout(dataclasses.replace(site, stack=1, scanned=False), axes[:at] + axes[at + 1:])
        return None if inner is None else tuple(
            (*a[:batch_position(at, len(a))], axes[at], *a[batch_position(at, len(a)):])
            for a in inner)
    if site.kernel_axes is not None or site.transpose_kernel:
        return None
    if site.dense_dims is not None:
        n_in = len(site.dense_dims[0])
        if n_in + len(site.dense_dims[1]) != len(axes):
            return None
        return (*axes[:n_in], _RANK), (_RANK, *axes[n_in:])
    if site.conv_dims == 2:  # HWIO: rows and input channels; columns and output channels
        if len(axes) != 4:
            return None
        return (axes[0], _RANK, axes[2], _RANK), (_RANK, axes[1], _RANK, axes[3])
    if site.nd_geometry is not None and set(site.nd_geometry[0]) != {1}:  # N-D: leading dims
        n = site.conv_dims  # and input channels; the last dim and output channels
        if len(axes) != n + 2:
            return None
        return ((*axes[:n - 1], _RANK, axes[n], _RANK),
                (*(_RANK,) * (n - 1), axes[n - 1], _RANK, axes[n + 1]))
    # a k-conv in the layer's own rank, then a pointwise one
    return (*axes[:-1], _RANK), (_RANK,) * (len(axes) - 1) + (axes[-1],)


def factor_names(site: ConvSite, names, kernel_shape, vertical_shape,
                 horizontal_shape) -> tuple[tuple, tuple]:
    """The axis names of a split layer's ``(vertical/kernel, horizontal/kernel)`` from its
    kernel's ``names`` (see the module docstring): a factor's axis keeps a name where it is
    that kernel axis at the kernel's size. Names that do not match the kernel's rank (Flax
    checks them only when it shards: Flax's lm1b example names its 3-D attention kernels
    ``("embed", "kv")``) name no factor axis."""
    layout = _layout(site, tuple(zip(names, kernel_shape, strict=True))) \
        if len(names) == len(kernel_shape) else None
    out = []
    for i, shape in enumerate((vertical_shape, horizontal_shape)):
        axes = layout[i] if layout is not None and len(layout[i]) == len(shape) else \
            (_RANK,) * len(shape)
        out.append(tuple(name if size == d else None
                         for (name, size), d in zip(axes, shape, strict=True)))
    return out[0], out[1]


def reboxed(flat: Mapping[tuple, Any], boxed: Mapping[tuple, Any],
            split: Mapping[str, ConvSite]) -> dict:
    """The flat decomposed variables ``flat`` boxed as the model's own ``boxed`` ones were:
    kept variables in their own box, the factors of the ``split`` layers (``{path: site}``) in
    their kernel's box with :func:`factor_names`. Unboxed models come back as they are."""
    out = {}
    for key, value in flat.items():
        box = boxed.get(key)
        out[key] = box.replace_boxed(value) if isinstance(box, nn.meta.AxisMetadata) else value
    for path, site in split.items():
        prefix = ("params", *variable_key(path))
        bias, moved = boxed.get((*prefix, "bias")), (*prefix, "horizontal", "bias")
        if isinstance(bias, nn.meta.AxisMetadata) and moved in flat:
            out[moved] = bias.replace_boxed(flat[moved])
        box = boxed.get(("params", *site.kernel_key))
        if not isinstance(box, nn.Partitioned):
            continue
        vkey, hkey = (*prefix, "vertical", "kernel"), (*prefix, "horizontal", "kernel")
        names = factor_names(site, tuple(box.names), np.shape(box.value),
                             np.shape(flat[vkey]), np.shape(flat[hkey]))
        out[vkey] = dataclasses.replace(box, value=flat[vkey], names=names[0])
        out[hkey] = dataclasses.replace(box, value=flat[hkey], names=names[1])
    return out


_SHARDING = "out_sharding"  # NNX's variable metadata: one mesh-axis name per axis


def shard_pair_like(layer, pair, site: ConvSite) -> None:
    """Give an NNX pair's variables the sharding metadata of the ``layer`` it replaces
    (``nnx.with_partitioning``): the factors the names of the kernel axes they carry
    (:func:`factor_names`), the bias its own. Layers without it are left as they are."""
    kernel = layer.kernel
    sharding = kernel.get_metadata().get(_SHARDING) if kernel.has_metadata(_SHARDING) else None
    if sharding is not None:
        names, rebuilt = _spec(sharding, len(kernel.shape))
        shape = kernel.shape
        if isinstance(layer, ragged.RaggedDot):  # its names on the kernel its product uses
            names, shape = ragged.used_names(names, layer.steps, shape), layer.used_shape
        vertical, horizontal = pair.vertical.kernel, pair.horizontal.kernel
        factor = factor_names(site, names, shape, vertical.shape, horizontal.shape)
        vertical.set_metadata(**{_SHARDING: rebuilt(factor[0])})
        horizontal.set_metadata(**{_SHARDING: rebuilt(factor[1])})
    bias = getattr(layer, "bias", None)
    if hasattr(bias, "has_metadata") and bias.has_metadata(_SHARDING) and \
            pair.horizontal.bias is not None:  # (a bias of zeros may be a plain array)
        pair.horizontal.bias.set_metadata(**{_SHARDING: bias.get_metadata()[_SHARDING]})


def _spec(sharding, ndim: int):
    """``(names, rebuilt)`` of an NNX ``out_sharding``: one mesh-axis name per axis, and the
    function giving names back in the annotation's own form. A tuple of names (as
    ``nnx.with_partitioning(init, ("embed", "mlp"))`` stores it) is read as it is; a
    ``PartitionSpec``, or a ``NamedSharding`` (jax-ai-stack's miniGPT: ``NamedSharding(mesh,
    P(None, "model"))``), by its spec, unnamed trailing axes as ``None``."""
    spec, mesh = sharding, None
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec, mesh = sharding.spec, sharding.mesh
    if not isinstance(spec, jax.sharding.PartitionSpec):
        return tuple(spec), tuple
    names = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    if mesh is None:
        return names, lambda n: jax.sharding.PartitionSpec(*n)
    return names, lambda n: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*n))
