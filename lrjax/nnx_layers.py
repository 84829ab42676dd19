"""NNX pairs: the modules that replace a split NNX layer (:class:`LowRankConvNNX` for convs and
transposed convs, :class:`LowRankLinearNNX` for ``nnx.Linear`` / ``nnx.LinearGeneral`` and
hand-written dense layers, :class:`LowRankEinsumNNX` for ``nnx.Einsum``,
:class:`lrjax.ragged.LowRankRaggedNNX` for a ``ragged_dot``), built from a layer, its
site (:class:`lrjax.sites.ConvSite`) and its factors (:func:`pair_module`); the NNX counterpart
of :mod:`lrjax.layers`. :func:`lrjax.nnx_surgery.decompose_nnx` builds them.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx

from lrjax import decompose, formulations, ragged, sites
from lrjax.layers import pair_geometry, transposed_pair_geometry
from lrjax.sites import ConvSite, redefined

__all__ = ["LowRankConvNNX", "LowRankLinearNNX", "LowRankEinsumNNX", "pair_module",
           "placeholder_factors", "delegating_base", "hooked", "base_view", "paired_in_place"]

# the NNX layers whose subclasses may be split in their base's call (``super().__call__``)
_DELEGATES = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral)


class LowRankConvNNX(nnx.Module):
    """A conv as two: ``vertical`` (``kh x 1``, or the first 1x1; no bias) then ``horizontal``
    (``1 x kw``, or the second 1x1), both ``nnx.Conv`` (both ``nnx.ConvTranspose`` for a
    transposed conv)."""

    kernel_shape: tuple[int, ...] | None = None  # the replaced layer's (set by the surgery)
    kernel_dtype: str = "float32"

    def __init__(self, vertical: nnx.Module, horizontal: nnx.Module):
        self.vertical = vertical
        self.horizontal = horizontal

    @property
    def kernel(self) -> jax.ShapeDtypeStruct:
        """The replaced layer's kernel, as its shape and dtype: model code that reads
        ``layer.kernel.shape`` runs on (bonsai's Qwen 3 reads its head counts from
        ``o_proj.kernel.shape``). The pair holds no such array: its factors are
        ``vertical.kernel`` and ``horizontal.kernel``."""
        if self.kernel_shape is None:
            raise AttributeError("this pair was built without the replaced layer's kernel shape")
        return jax.ShapeDtypeStruct(self.kernel_shape, np.dtype(self.kernel_dtype))

    def __call__(self, x, out_sharding=None):
        """``horizontal(vertical(x))``; ``out_sharding`` (as the layer's own ``__call__`` takes
        it, e.g. from ``nnx.MultiHeadAttention``) is the output's, given to ``horizontal``
        (``nnx.ConvTranspose`` takes none); a ``PartitionSpec`` outside a mesh, none (as
        bonsai's ``ShardedLinear`` reads it: JAX refuses one there)."""
        if isinstance(out_sharding, jax.sharding.PartitionSpec) and \
                jax.sharding.get_abstract_mesh().empty:
            out_sharding = None
        y = self.vertical(x)
        return self.horizontal(y) if out_sharding is None else \
            self.horizontal(y, out_sharding=out_sharding)


class LowRankLinearNNX(LowRankConvNNX):
    """A dense layer as two: ``vertical`` (``C -> K``, no bias, contracting the layer's axes)
    then ``horizontal`` (``K -> N``, the layer's bias)."""


class LowRankEinsumNNX(LowRankConvNNX):
    """An ``nnx.Einsum`` as two (:class:`lrjax.sites.EinsumSplit`): ``vertical``
    (``lhs,Cz->free z``, kernel ``(*contracted dims, K)``, no bias) then ``horizontal``
    (``free z,zO->out``, kernel ``(K, *produced dims)``, the layer's bias). ``equation`` is the
    one it was split for; a call naming another is an error."""

    def __init__(self, vertical: nnx.Module, horizontal: nnx.Module, equation: str):
        super().__init__(vertical, horizontal)
        self.equation = equation

    def __call__(self, x, einsum_str: str | None = None, out_sharding=None):
        if einsum_str is not None and einsum_str.replace(" ", "") != self.equation:
            raise ValueError(f"this pair was split for {self.equation!r}; called with "
                             f"einsum_str={einsum_str!r}")
        return super().__call__(x, out_sharding)


def _given(value):
    """An initializer returning ``value`` (the layers of a pair are built with their factors,
    without drawing random weights first)."""

    def init(key, shape, dtype):  # nnx.LinearGeneral asks for its kernel as a matrix
        if math.prod(shape) != value.size:
            raise ValueError(f"factor of shape {tuple(value.shape)} for a variable of shape "
                             f"{tuple(shape)}")
        return sites.device_array(np.reshape(value, shape), dtype)

    return init


def pair_module(layer, site: ConvSite, factors: decompose.Factors,
                bias=None) -> LowRankConvNNX:
    """The pair computing ``layer`` (an ``nnx.Conv`` or linear layer) with the given factors
    (and ``bias``, default the layer's), knowing the layer's kernel shape and dtype
    (:attr:`LowRankConvNNX.kernel`) and holding its settings under their names
    (``in_features``, ``out_features``, ``kernel_size``, ``dtype``: what model code reads of
    its layers)."""
    pair = _built_pair(layer, site, factors, bias)
    pair.kernel_shape = tuple(int(d) for d in layer.kernel.shape)
    pair.kernel_dtype = str(np.dtype(layer.kernel.dtype))
    for name, value in vars(layer).items():  # its configuration, as model code reads it
        if not name.startswith("_") and not hasattr(pair, name) and _setting(value):
            setattr(pair, name, value)  # (openpi's pi0: action_in_proj.out_features)
    return pair


def _setting(value) -> bool:
    """Whether ``value`` is a layer's setting (a number, a string, a dtype, a tuple of
    them), which its pair keeps under the layer's attribute name (read-only use)."""
    if isinstance(value, (tuple, list)):
        return all(map(_setting, value))
    return value is None or isinstance(value, (bool, int, float, str, np.dtype)) or (
        isinstance(value, type) and issubclass(value, np.generic))


def _built_pair(layer, site: ConvSite, factors: decompose.Factors, bias) -> LowRankConvNNX:
    """:func:`pair_module`'s pair. A stacked layer's (``nnx.scan`` over ``nnx.vmap``-made
    blocks) is built as one iteration's pair, then given every iteration's factors, stacked."""
    if site.lifted:
        vertical, horizontal = site.factor_variables(factors)
        k, n = (int(f.shape[-1]) // site.stack for f in factors)
        pair = pair_module(layer, site.restacked(1), decompose.Factors(
            factors.vertical[..., :k], factors.horizontal[..., :n]),
            None if layer.bias is None else layer.bias[...][0])
        pair.vertical.kernel.set_value(vertical)
        pair.horizontal.kernel.set_value(horizontal)
        if layer.bias is not None:
            pair.horizontal.bias.set_value(layer.bias[...])
        return pair
    vertical_kernel, horizontal_kernel = site.factor_variables(factors)
    if isinstance(layer, ragged.RaggedDot):  # (G, C, K) and (G, K, N), over the same groups
        return ragged.LowRankRaggedNNX(*(
            ragged.RaggedDot(nnx.Param(sites.device_array(k, layer.kernel.dtype)),
                             precision=layer.precision, dtype=layer.dtype)
            for k in (vertical_kernel, horizontal_kernel)))
    if bias is None and layer.bias is not None:
        bias = layer.bias[...]
    rank = int(factors.vertical.shape[-1]) // (site.stack if site.batched else 1)
    common = dict(dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
                  rngs=nnx.Rngs(0))
    first = dict(kernel_init=_given(vertical_kernel))
    second = dict(kernel_init=_given(horizontal_kernel))
    if bias is not None:
        second["bias_init"] = _given(bias)
    if isinstance(layer, nnx.Einsum):
        split = sites.einsum_split(site.equation)
        shapes = split.factor_shapes(site.kernel_variable_shape, rank)
        common.update(promote_dtype=layer.promote_dtype,
                      preferred_element_type=layer.preferred_element_type)
        vertical = nnx.Einsum(split.first, shapes[0], **first, **common)
        horizontal = nnx.Einsum(split.second, shapes[1],
                                None if bias is None else bias.shape,
                                **second, **common)
        return LowRankEinsumNNX(vertical, horizontal, site.equation)
    if site.kind == "dense":
        in_dims, out_dims = site.dense_dims
        vertical = nnx.LinearGeneral(in_dims, rank, axis=sites.contracted_axes(layer),
                                     use_bias=False, **first, **common)
        horizontal = nnx.LinearGeneral(rank, out_dims, axis=-1, use_bias=layer.use_bias,
                                       **second, **common)
        return LowRankLinearNNX(vertical, horizontal)
    if site.kind == "transposed":  # an nnx.ConvTranspose, or an input-dilated nnx.Conv
        conv = isinstance(layer, nnx.Conv)
        geometry = transposed_pair_geometry(
            layer.kernel_size, layer.input_dilation if conv else layer.strides, layer.padding,
            layer.kernel_dilation)
        common.update(transpose_kernel=not conv and layer.transpose_kernel)
        vertical = nnx.ConvTranspose(layer.in_features, rank, use_bias=False, **geometry[0],
                                     **first, **common)
        horizontal = nnx.ConvTranspose(rank, layer.out_features, use_bias=layer.use_bias,
                                       **geometry[1], **second, **common)
        return LowRankConvNNX(vertical, horizontal)
    geometry = pair_geometry(layer.kernel_size, layer.strides, layer.padding,
                             layer.kernel_dilation)
    common.update(feature_group_count=layer.feature_group_count,
                  conv_general_dilated=formulations.conv_general_dilated)
    vertical = nnx.Conv(layer.in_features, rank, use_bias=False, **geometry[0], **first,
                        **common)
    horizontal = nnx.Conv(rank, layer.out_features, use_bias=layer.use_bias, **geometry[1],
                          **second, **common)
    return LowRankConvNNX(vertical, horizontal)


def placeholder_factors(site: ConvSite, rank: int) -> decompose.Factors:
    """Zero factors of ``site``'s pair at ``rank`` (HWIO, ``(kh, 1, C/g, K)`` and ``(1, kw, K/g,
    N)`` on its 2-D view): a pair's structure before its variables are restored from a
    checkpoint, with no decomposition."""
    kh, kw, c, n = site.shape.kernel_shape
    return decompose.Factors(np.zeros((kh, 1, c, rank), np.float32),
                             np.zeros((1, kw, rank // site.shape.groups, n), np.float32))


@functools.cache
def delegating_base(cls: type) -> type | None:
    """The NNX conv or linear type a subclass ``cls`` runs in its ``__call__`` when it redefines
    only ``__call__`` (``super().__call__(x)`` on a padded or scaled input), else None."""
    for base in _DELEGATES:
        if issubclass(cls, base) and cls is not base and redefined(cls, base) == ["__call__"]:
            return base
    return None


def _with_base_call(cls: type, base: type, suffix: str, inner, **attributes) -> type:
    """``cls`` (a subclass of ``base``) with ``inner`` as its base's ``__call__``: a class
    between them in its method order, so that ``super().__call__`` in ``cls`` reaches it."""
    hook = type(f"_{base.__name__}{suffix}", (base,), {"__call__": inner,
                                                       "__module__": __name__, **attributes})
    return type(cls.__name__, (cls, hook), {"__module__": cls.__module__})


@functools.cache
def hooked(cls: type, base: type) -> type:
    """``cls`` whose base's ``__call__`` (what its own reaches by ``super()``) calls
    ``self.lrjax_hook(self, base_call, *args, **kwargs)`` instead: the layer's own code runs as
    written, and lrjax sees (and may replace) the base's computation, as linen's interceptors
    do. Instances are made by swapping ``__class__`` on a copy."""
    def inner(self, *args, **kwargs):
        return self.lrjax_hook(self, functools.partial(base.__call__, self), *args, **kwargs)

    return _with_base_call(cls, base, "Hooked", inner)


@functools.cache
def _paired(cls: type, base: type, pair_type: type) -> type:
    """``cls`` whose base's ``__call__`` is a pair's (its ``vertical`` and ``horizontal``)."""
    def inner(self, *args, **kwargs):
        return pair_type.__call__(self, *args, **kwargs)

    return _with_base_call(cls, base, "Paired", inner, kernel=LowRankConvNNX.kernel)


def base_view(layer, base: type):
    """An unattached ``base`` instance holding ``layer``'s attributes: what its base's call
    computes, for its site and skip reasons (read, never run)."""
    view = object.__new__(base)
    view.__dict__.update(vars(layer))
    return view


def paired_in_place(layer, pair: LowRankConvNNX, base: type):
    """``layer`` (a copy: it is changed) as a subclass computing ``pair`` in its base's call,
    its own code kept around it; its kernel and bias replaced by the pair's ``vertical`` and
    ``horizontal`` (the variable layout of :class:`LowRankConvNNX`)."""
    for name in ("kernel", "bias"):
        if name in vars(layer):
            delattr(layer, name)
    layer.__class__ = _paired(type(layer), base, type(pair))
    layer.vertical, layer.horizontal = pair.vertical, pair.horizontal
    layer.kernel_shape, layer.kernel_dtype = pair.kernel_shape, pair.kernel_dtype
    return layer
