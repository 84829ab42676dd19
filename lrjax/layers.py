r"""Flax (linen) layers: the vertical/horizontal low-rank conv pair.

:class:`LowRankConv` is a ``kh x kw`` conv computed as a vertical ``kh x 1`` conv (``C -> K``, no
bias) followed by a horizontal ``1 x kw`` conv (``K -> N``, with the bias). :func:`pair_forward`
is the same computation for code that runs inside another module's scope: model surgery
(:mod:`lrjax.surgery`) calls it inside an intercepted ``nn.Conv``, so that a decomposed conv's
factors live under the conv's own path (``conv1_1/vertical/kernel``, ``conv1_1/horizontal/...``),
the same variables as a ``LowRankConv`` of that name. :class:`LowRankModel` wraps any linen model
and swaps its chosen ``nn.Conv``\s for pairs that way while it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax import formulations, linen_cells, linen_wrappers
from lrjax.conv_views import nd_geometry, vertical_geometry
from lrjax.costs import as_pair, check_rank
from lrjax.linen_unbound import scope_path, share_scope
from lrjax.ranks import check_rank_map
from lrjax.sites import called_equation, computes_as, einsum_split, path_of, redefined
from lrjax.splittable import (
    conv_skip_reason,
    dense_skip_reason,
    dilated_conv_site,
    input_dilated,
    transposed_site,
    transposed_skip_reason,
)

__all__ = ["SPLIT_TYPES", "LowRankConv", "LowRankConvTranspose", "FactorConv", "FactorConvTranspose",
           "FactorDense", "FactorEinsum", "LowRankModel", "pair_forward",
           "transposed_pair_forward", "dense_pair_forward", "einsum_pair_forward",
           "pair_geometry", "transposed_pair_geometry", "split_padding", "conv_skip_reason",
           "transposed_skip_reason", "transposed_site", "input_dilated", "dilated_conv_site",
           "dense_skip_reason", "module_path", "split_type", "delegated_base", "delegates",
           "as_base", "split_call"]

_DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()  # nn.Conv's


def split_padding(padding) -> tuple[Any, Any]:
    """Split an ``nn.Conv`` padding into the vertical conv's and the horizontal conv's.

    String modes (``SAME``, ``SAME_LOWER``, ``VALID``, ``CIRCULAR``, ``REFLECT``) pass through: with a
    ``k x 1`` kernel they pad only the rows, with a ``1 x k`` kernel only the columns. Explicit
    padding ``((top, bottom), (left, right))`` (or ints) becomes ``((top, bottom), (0, 0))`` and
    ``((0, 0), (left, right))``.
    """
    if isinstance(padding, str):
        if padding.upper() == "CAUSAL":
            raise ValueError("padding 'CAUSAL' is defined for 1-D convs only")
        return padding, padding
    items = [padding, padding] if isinstance(padding, int) else list(padding)
    if len(items) != 2:
        raise ValueError(f"padding must give 2 spatial dims for a 2-D conv; got {padding!r}")
    rows, cols = ((p, p) if isinstance(p, int) else tuple(p) for p in items)
    return (rows, (0, 0)), ((0, 0), cols)


def pair_geometry(kernel_size, strides=1, padding="SAME", kernel_dilation=1) -> tuple[dict, dict]:
    """The two convs of a pair: ``(first, second)`` keyword arguments (``kernel_size``,
    ``strides``, ``padding``, ``kernel_dilation``) of the vertical and horizontal convs.

    A ``kh x kw`` conv splits as in the paper: rows (stride, padding, dilation) to the vertical
    ``kh x 1`` conv, columns to the horizontal ``1 x kw`` one. A 1x1 conv becomes two 1x1 convs,
    the first taking both strides and the padding (so the second runs on the output's pixels
    only); the output shape equals the conv's for every padding form. An N-D conv splits the
    same way, its leading dims to the vertical conv (``3x3x1``), its last to the horizontal one
    (``1x1x3``); a 1-D conv (and a pointwise N-D one) becomes the conv itself at ``C -> K`` then
    a pointwise ``K -> N`` (:func:`lrjax.conv_views.conv_view`).
    """
    kernel = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    geometry = nd_geometry(kernel, strides, padding, kernel_dilation)
    if geometry is not None and set(kernel) != {1}:  # N-D: leading dims, then the last
        window, steps, pads, dilation = geometry
        first = vertical_geometry(geometry)
        lead = (1,) * (len(kernel) - 1)
        cols = pads if isinstance(pads, str) else (((0, 0),) * len(lead) + (pads[-1],))
        return (dict(zip(("kernel_size", "strides", "padding", "kernel_dilation"), first,
                         strict=True)),
                dict(kernel_size=(*lead, window[-1]), strides=(*lead, steps[-1]), padding=cols,
                     kernel_dilation=(*lead, dilation[-1])))
    if len(kernel) != 2:  # 1-D, or pointwise N-D: the first conv takes it all (conv_view)
        ones = (1,) * len(kernel)
        return (dict(kernel_size=kernel, strides=strides, padding=padding,
                     kernel_dilation=kernel_dilation),
                dict(kernel_size=ones, strides=ones, padding="VALID", kernel_dilation=ones))
    kh, kw = as_pair(kernel_size, "kernel_size")
    sh, sw = as_pair(strides, "strides")
    dh, dw = as_pair(kernel_dilation, "kernel_dilation")
    if (kh, kw) == (1, 1):
        return (dict(kernel_size=(1, 1), strides=(sh, sw), padding=padding,
                     kernel_dilation=(1, 1)),
                dict(kernel_size=(1, 1), strides=(1, 1), padding="VALID",
                     kernel_dilation=(1, 1)))
    pad_v, pad_h = split_padding(padding)
    return (dict(kernel_size=(kh, 1), strides=(sh, 1), padding=pad_v, kernel_dilation=(dh, 1)),
            dict(kernel_size=(1, kw), strides=(1, sw), padding=pad_h, kernel_dilation=(1, dw)))


def transposed_pair_geometry(kernel_size, strides=1, padding="SAME",
                             kernel_dilation=1) -> tuple[dict, dict]:
    """The two transposed convs of a transposed conv's pair: ``(first, second)`` keyword
    arguments (``kernel_size``, ``strides``, ``padding``, ``kernel_dilation``).

    A transposed conv is a conv on its input dilated by its strides; that dilation is separable,
    so rows (stride, padding, dilation) go to a vertical ``kh x 1`` transposed conv and columns
    to a horizontal ``1 x kw`` one, for every kernel size (1x1 included). String paddings pass
    through (a size-1, stride-1 axis gets no padding under ``SAME`` or ``VALID``). A 1-D one
    (``kernel_size`` ``(k,)``) is itself at ``C -> K`` then a pointwise ``K -> N``; an N-D one
    splits as :func:`pair_geometry` splits an N-D conv (leading dims, then the last).
    """
    if not isinstance(kernel_size, int) and len(kernel_size) == 1:  # 1-D: it, then pointwise
        return (dict(kernel_size=tuple(kernel_size), strides=strides, padding=padding,
                     kernel_dilation=kernel_dilation),
                dict(kernel_size=(1,), strides=(1,), padding="VALID", kernel_dilation=(1,)))
    if not isinstance(kernel_size, int) and len(kernel_size) > 2:  # N-D: as a conv's pair
        return pair_geometry(kernel_size, strides, padding, kernel_dilation)
    kh, kw = as_pair(kernel_size, "kernel_size")
    sh, sw = as_pair(strides, "strides")
    dh, dw = as_pair(kernel_dilation, "kernel_dilation")
    pad_v, pad_h = split_padding(padding)
    return (dict(kernel_size=(kh, 1), strides=(sh, 1), padding=pad_v, kernel_dilation=(dh, 1)),
            dict(kernel_size=(1, kw), strides=(1, sw), padding=pad_h, kernel_dilation=(1, dw)))


class FactorConv(nn.Conv):
    """An ``nn.Conv`` that is one half of a low-rank pair.

    A distinct type, so that surgery (which rewrites modules whose type *is* ``nn.Conv``) never
    decomposes a pair's own factors. Its convolution is :func:`lrjax.formulations.conv_general_dilated`.
    """


def pair_forward(x: jax.Array, *, features: int, kernel_size, rank: int, strides=1,
                 padding="SAME", kernel_dilation=1, feature_group_count: int = 1,
                 use_bias: bool = True, mid_norm: Callable[..., nn.Module] | None = None,
                 dtype=None, param_dtype=jnp.float32, precision=None,
                 kernel_init: Callable = _DEFAULT_KERNEL_INIT,
                 bias_init: Callable = nn.initializers.zeros, where: str = "pair") -> jax.Array:
    """Apply a vertical/horizontal pair, creating its submodules in the current module's scope.

    Must be called inside a ``@nn.compact`` method (or a method interceptor) of the module that
    owns the pair's variables: ``vertical/kernel`` ``(kh, 1, C/groups, rank)``, optional
    ``mid_norm``, ``horizontal/kernel`` ``(1, kw, rank/groups, features)`` and ``horizontal/bias``.
    Stride, padding and dilation split as in the paper (rows to the vertical conv, columns to the
    horizontal one; a 1x1 conv's first half takes both, :func:`pair_geometry`), so the output
    shape equals ``nn.Conv``'s for every padding form.

    Args:
      x: ``(..., H, W, C)``.
      where: the layer's name, for error messages.

    Returns:
      ``(..., H_out, W_out, features)``.
    """
    kernel = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    kh, kw = (kernel[0], 1) if len(kernel) == 1 else (math.prod(kernel[:-1]), kernel[-1]) \
        if len(kernel) > 2 else kernel  # N-D: its 2-D view's (conv_views.conv_view)
    groups = feature_group_count
    c = x.shape[-1]
    if x.ndim < len(kernel) + 1:
        raise ValueError(f"{where}: input must be (..., {len(kernel)} spatial dims, C); got "
                         f"shape {x.shape}")
    if c % groups:
        raise ValueError(f"{where}: input channels {c} (input shape {x.shape}) are not divisible "
                         f"by feature_group_count={groups}")
    check_rank(rank, (kh, kw, c // groups, features), groups=groups, where=where)
    first, second = pair_geometry(kernel_size, strides, padding, kernel_dilation)
    common = dict(feature_group_count=groups, dtype=dtype, param_dtype=param_dtype,
                  precision=precision, kernel_init=kernel_init,
                  conv_general_dilated=formulations.conv_general_dilated)
    y = FactorConv(rank, use_bias=False, name="vertical", **first, **common)(x)
    if mid_norm is not None:
        y = mid_norm(name="mid_norm")(y)
    return FactorConv(features, use_bias=use_bias, bias_init=bias_init, name="horizontal",
                      **second, **common)(y)


class FactorConvTranspose(nn.ConvTranspose):
    """An ``nn.ConvTranspose`` that is one half of a transposed conv's pair (a distinct type, so
    that surgery never decomposes a pair's own factors)."""


def transposed_pair_forward(x: jax.Array, *, features: int, kernel_size, rank: int, strides=1,
                            padding="SAME", kernel_dilation=1, use_bias: bool = True,
                            transpose_kernel: bool = False,
                            mid_norm: Callable[..., nn.Module] | None = None, dtype=None,
                            param_dtype=jnp.float32, precision=None,
                            kernel_init: Callable = _DEFAULT_KERNEL_INIT,
                            bias_init: Callable = nn.initializers.zeros,
                            where: str = "pair") -> jax.Array:
    """A transposed conv (``nn.ConvTranspose``) as a vertical then a horizontal transposed conv
    (:func:`transposed_pair_geometry`), created in the current module's scope like
    :func:`pair_forward`.

    Variables: ``vertical/kernel`` ``(kh, 1, C, K)`` and ``horizontal/kernel`` ``(1, kw, K, N)``
    (with ``transpose_kernel``: ``(kh, 1, K, C)`` and ``(1, kw, N, K)``, each flipped as
    ``nn.ConvTranspose`` reads it), ``horizontal/bias``.

    Args:
      x: ``(..., H, W, C)``.

    Returns:
      ``(..., H_out, W_out, features)``: ``nn.ConvTranspose``'s output shape.
    """
    one_d = not isinstance(kernel_size, int) and len(kernel_size) == 1
    kh, kw = (kernel_size[0], 1) if one_d else (math.prod(kernel_size[:-1]), kernel_size[-1]) \
        if not isinstance(kernel_size, int) and len(kernel_size) > 2 else as_pair(kernel_size)
    if x.ndim < 3 - one_d:
        raise ValueError(f"{where}: input must be (..., {'L' if one_d else 'H, W'}, C); got "
                         f"shape {x.shape}")
    check_rank(rank, (kh, kw, x.shape[-1], features), where=where)
    first, second = transposed_pair_geometry(kernel_size, strides, padding, kernel_dilation)
    common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
                  kernel_init=kernel_init, transpose_kernel=transpose_kernel)
    y = FactorConvTranspose(rank, use_bias=False, name="vertical", **first, **common)(x)
    if mid_norm is not None:
        y = mid_norm(name="mid_norm")(y)
    return FactorConvTranspose(features, use_bias=use_bias, bias_init=bias_init,
                               name="horizontal", **second, **common)(y)


class FactorDense(nn.DenseGeneral):
    """An ``nn.DenseGeneral`` that is one half of a low-rank dense pair (a distinct type, so that
    surgery never decomposes a pair's own factors)."""


def dense_pair_forward(x: jax.Array, *, features, rank: int, axis=-1, use_bias: bool = True,
                       mid_norm: Callable[..., nn.Module] | None = None, dtype=None,
                       param_dtype=jnp.float32, precision=None,
                       kernel_init: Callable = _DEFAULT_KERNEL_INIT,
                       bias_init: Callable = nn.initializers.zeros,
                       where: str = "pair") -> jax.Array:
    """A dense layer (``nn.Dense``, or ``nn.DenseGeneral`` contracting ``axis``) as two: ``C -> K``
    (no bias) then ``K -> N``, created in the current module's scope like :func:`pair_forward`.

    Variables: ``vertical/kernel`` ``(*in_dims, K)``, optional ``mid_norm``, ``horizontal/kernel``
    ``(K, *out_dims)`` and ``horizontal/bias`` ``out_dims``, where ``in_dims`` are ``x``'s
    contracted dims and ``out_dims`` the layer's ``features``.

    Returns:
      What the dense layer returns: ``x``'s other dims followed by ``out_dims``.
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out_dims = (features,) if isinstance(features, int) else tuple(features)
    c, n = math.prod(x.shape[a] for a in axes), math.prod(out_dims)
    check_rank(rank, (1, 1, c, n), where=where)
    common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
                  kernel_init=kernel_init)
    y = FactorDense(rank, axis=axis, use_bias=False, name="vertical", **common)(x)
    if mid_norm is not None:
        y = mid_norm(name="mid_norm")(y)
    return FactorDense(features, axis=-1, use_bias=use_bias, bias_init=bias_init,
                       name="horizontal", **common)(y)


class FactorEinsum(nn.Einsum):
    """An ``nn.Einsum`` that is one half of a split einsum (never decomposed itself)."""


def einsum_pair_forward(x: jax.Array, module: nn.Einsum, rank: int, einsum_str: str | None = None,
                        mid_norm: Callable[..., nn.Module] | None = None,
                        where: str = "pair") -> jax.Array:
    """An ``nn.Einsum`` whose equation is one product of input axes into output axes
    (:func:`lrjax.sites.einsum_split`) as two einsums through ``rank`` channels, created in the
    current module's scope: ``vertical/kernel (*contracted dims, K)`` (no bias), then
    ``horizontal/kernel (K, *produced dims)`` with the layer's own bias; with a batch letter
    (a batch of kernels), ``rank`` is each matrix's and both factors keep the batch axis."""
    equation = einsum_str or module.einsum_str
    split = einsum_split(equation)
    if isinstance(split, str):
        raise ValueError(f"{where}: {split}")
    contracted, produced = split.dims(module.shape)
    check_rank(rank, (1, 1, math.prod(contracted), math.prod(produced)), where=where)
    first, second = split.factor_shapes(module.shape, rank)
    common = dict(dtype=module.dtype, param_dtype=module.param_dtype, precision=module.precision,
                  kernel_init=module.kernel_init)
    y = FactorEinsum(first, split.first, use_bias=False, name="vertical", **common)(x)
    if mid_norm is not None:
        y = mid_norm(name="mid_norm")(y)
    return FactorEinsum(second, split.second, use_bias=module.use_bias,
                        bias_init=module.bias_init, name="horizontal", **common)(y)


class LowRankConv(nn.Module):
    """A ``kh x kw`` conv as a vertical ``kh x 1`` conv (no bias) then a horizontal ``1 x kw`` conv.

    Arguments mean what they mean for ``nn.Conv``; with the factors of
    :func:`lrjax.decompose.vh_decompose` at full rank the output equals ``nn.Conv``'s. Submodules:
    ``vertical`` (kernel ``(kh, 1, C/groups, rank)``), optional ``mid_norm``, ``horizontal``
    (kernel ``(1, kw, rank/groups, features)``, bias). How the two convs are computed is
    :mod:`lrjax.formulations`' choice.

    Attributes:
      features: output channels ``N``.
      kernel_size: ``(kh, kw)``.
      rank: total intermediate channels ``K``, divisible by ``feature_group_count``.
      mid_norm: optional factory ``mid_norm(name=...)`` of a norm layer applied between the convs.
    """

    features: int
    kernel_size: Sequence[int]
    rank: int
    strides: int | Sequence[int] | None = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] | None = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mid_norm: Callable[..., nn.Module] | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = _DEFAULT_KERNEL_INIT
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., H, W, C)`` -> ``(..., H_out, W_out, features)``."""
        return pair_forward(
            x, features=self.features, kernel_size=self.kernel_size, rank=self.rank,
            strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count, use_bias=self.use_bias,
            mid_norm=self.mid_norm, dtype=self.dtype, param_dtype=self.param_dtype,
            precision=self.precision, kernel_init=self.kernel_init, bias_init=self.bias_init,
            where=self.name or "LowRankConv")


class LowRankConvTranspose(nn.Module):
    """A ``kh x kw`` transposed conv as a vertical ``kh x 1`` then a horizontal ``1 x kw``
    transposed conv (:func:`transposed_pair_forward`). Arguments mean what they mean for
    ``nn.ConvTranspose``; with :func:`lrjax.decompose.vh_decompose`'s factors of its kernel at
    full rank the output equals ``nn.ConvTranspose``'s.

    Attributes:
      features: output channels ``N``.
      kernel_size: ``(kh, kw)``.
      rank: intermediate channels ``K``.
      mid_norm: optional factory ``mid_norm(name=...)`` of a norm layer applied between the two.
    """

    features: int
    kernel_size: Sequence[int]
    rank: int
    strides: int | Sequence[int] | None = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] | None = 1
    use_bias: bool = True
    transpose_kernel: bool = False
    mid_norm: Callable[..., nn.Module] | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = _DEFAULT_KERNEL_INIT
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., H, W, C)`` -> ``(..., H_out, W_out, features)``."""
        return transposed_pair_forward(
            x, features=self.features, kernel_size=self.kernel_size, rank=self.rank,
            strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
            use_bias=self.use_bias, transpose_kernel=self.transpose_kernel,
            mid_norm=self.mid_norm, dtype=self.dtype, param_dtype=self.param_dtype,
            precision=self.precision, kernel_init=self.kernel_init, bias_init=self.bias_init,
            where=self.name or "LowRankConvTranspose")


def module_path(module: nn.Module, root: tuple[str, ...] = ()) -> str:
    """A bound module's variable path joined with ``/``, relative to ``root`` (a scope path
    prefix); see :func:`lrjax.linen_unbound.scope_path`."""
    return path_of(scope_path(module)[len(root):])


def _normalise_ranks(ranks: Mapping[str, int | None] | Iterable) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((p, r) for p, r in check_rank_map(dict(
        ranks.items() if isinstance(ranks, Mapping) else ranks)).items() if r is not None))


# the layer types a LowRankModel splits (and their subclasses that compute as they do)
SPLIT_TYPES = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral, nn.Einsum)


def split_type(module) -> type | None:
    """The type of :data:`SPLIT_TYPES` whose computation a linen layer runs
    (:func:`computes_as`); None for other modules and for a pair's own halves."""
    if isinstance(module, (FactorConv, FactorConvTranspose, FactorDense, FactorEinsum)):
        return None
    return computes_as(module, SPLIT_TYPES)


@functools.cache
def _delegating_base(cls: type) -> type | None:
    for base in SPLIT_TYPES:
        if issubclass(cls, base) and cls is not base and redefined(cls, base) == ["__call__"]:
            return base
    return None


def delegated_base(module, context) -> type | None:
    """For a linen subclass of a type of :data:`SPLIT_TYPES` that redefines only ``__call__``
    and runs its base's in it (``super().__call__(x)`` on a padded input, as MAGVIT's and
    VQGAN-style ``Conv`` subclasses do): that base type while ``context`` (an intercepted call,
    ``nn.intercept_methods``) runs the base's own ``__call__``; None in the subclass's own
    ``__call__`` (whose code runs as written around the pair) and for any other module."""
    base = _delegating_base(type(module))
    if base is None or context.method_name != "__call__":
        return None
    called = getattr(context.orig_method, "func", None)
    return base if called is inspect.unwrap(base.__call__) else None


def delegates(module) -> bool:
    """Whether ``module`` is a subclass :func:`delegated_base` splits in its base's call."""
    return _delegating_base(type(module)) is not None


def split_call(module, context) -> tuple[type, Any] | None:
    """``(type, layer)`` of an intercepted call that runs a split type's own computation: the
    module's ``__call__`` when it computes as one of :data:`SPLIT_TYPES` (``layer``: the module),
    or a delegating subclass's base call (:func:`delegated_base`; ``layer``: its fields as that
    base, :func:`as_base`); None for any other call."""
    if context.method_name != "__call__":
        return None
    own = split_type(module)
    if own is not None:
        return own, module
    base = delegated_base(module, context)
    return None if base is None else (base, as_base(module, base))


def as_base(module, base: type):
    """``module``'s fields on an unbound instance of ``base``: what its base's call computes, for
    the sites and skip reasons of a subclass split there (:func:`delegated_base`)."""
    names = [f.name for f in dataclasses.fields(base) if f.init and f.name not in
             ("parent", "name")]
    return base(**{n: getattr(module, n) for n in names}, name=module.name, parent=None)


class LowRankModel(nn.Module):
    """Any linen model with some of its linear layers replaced by pairs.

    Called exactly like ``base`` (same arguments, same outputs' meaning). While it runs, each
    ``nn.Conv`` whose path is in ``ranks`` computes :func:`lrjax.layers.pair_forward` with that
    rank, each ``nn.ConvTranspose`` :func:`transposed_pair_forward`, each ``nn.Dense`` /
    ``nn.DenseGeneral`` :func:`dense_pair_forward` and each ``nn.Einsum``
    :func:`einsum_pair_forward`, inside the layer's own scope. ``base``'s scope is shared
    (``nn.share_scope``), so the variables are ``base``'s with ``{path}/kernel`` and
    ``{path}/bias`` replaced by ``{path}/vertical/kernel``, ``{path}/horizontal/kernel`` and
    ``{path}/horizontal/bias``.

    Build it with :meth:`wrap` (which normalises the rank map) or get it from
    :func:`decompose_linen`. Every method of ``base`` runs decomposed: ``apply(v, x)`` its
    ``__call__``, ``apply(v, x, method="encode")`` (or ``method=Base.encode``) its ``encode``
    (a VAE's encoder, big_vision's Jet ``forward``), ``method=lambda m, x: ...`` that function
    of the model. A call that does not reach every conv of
    the rank map raises ``ValueError`` (a misspelt path must not pass silently), so a map should
    name only convs that every call of that method runs.

    Attributes:
      base: the original module (unbound).
      ranks: ``((path, rank), ...)``, sorted.
      mid_norm: optional norm factory applied between the two halves of every pair.
      partial: a call may reach only some of the map's layers (a VAE's encode and decode).
      unwrapped: paths of ``nn.WeightNorm`` / ``nn.SpectralNorm`` wrappers folded into the
        variables of the layers they wrap, which run without them
        (:mod:`lrjax.linen_wrappers`).
    """

    base: nn.Module
    ranks: tuple[tuple[str, int], ...] = ()
    mid_norm: Callable[..., nn.Module] | None = None
    partial: bool = False
    unwrapped: tuple[str, ...] = ()

    @classmethod
    def wrap(cls, base: nn.Module, ranks: Mapping[str, int | None], mid_norm=None, partial=False,
             unwrapped=()):
        """``LowRankModel(base, ranks)`` with ``ranks`` as a dict (``None`` entries dropped)."""
        if isinstance(base, LowRankModel):
            raise ValueError("the model is already a LowRankModel: wrap its .base instead")
        return cls(base, _normalise_ranks(ranks), mid_norm, partial, tuple(sorted(unwrapped)))

    def setup(self):
        share_scope(self, self.base)

    def __getattr__(self, name):  # base's other methods, decomposed: apply(..., method=name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base")
            if name in getattr(base, "__dataclass_fields__", ()) and not isinstance(getattr(
                    base, name), nn.Module):  # its settings: openpi reads llm.module.vocab_size
                return getattr(base, name)
            if name.startswith("_") or not (callable(getattr(type(base), name, None)) or
                                            isinstance(getattr(base, name, None), nn.Module)):
                raise  # (a submodule by name, as Flax takes it: apply(..., method="encoder"))
        return types.MethodType(lambda module, *a, **k: module._run(name, a, k), self)

    @nn.nowrap
    def apply(self, variables, *args, method=None, **kwargs):
        """``nn.Module.apply``; ``method`` as Flax takes it for ``base``: a name, one of ``base``'s
        methods (``Base.encode``, ``model.encode``) or a function of the module
        (``lambda m, x: m.decode(m.encode(x))``), run decomposed."""
        return super().apply(variables, *args, method=self._decomposed(method), **kwargs)

    @nn.nowrap
    def init_with_output(self, rngs, *args, method=None, **kwargs):
        """``nn.Module.init_with_output`` (and so ``init``); ``method`` as for :meth:`apply`."""
        return super().init_with_output(rngs, *args, method=self._decomposed(method), **kwargs)

    @nn.nowrap
    def _decomposed(self, method):
        """``method`` (None, a name, a function) as one of this module's: ``base``'s methods by
        name, any other function run on ``base`` under the pairs (:meth:`_run`)."""
        if method is None or isinstance(method, str) or not callable(method):
            return method
        if getattr(type(self.base), getattr(method, "__name__", ""), None) is getattr(
                method, "__func__", method):
            return method.__name__
        return lambda module, *args, **kwargs: module._run(method, args, kwargs)

    def __call__(self, *args, **kwargs):
        return self._run("__call__", args, kwargs)

    def _run(self, method: str | Callable, args, kwargs):
        ranks = dict(self.ranks)
        root = tuple(self.scope.path)
        mid_norm = self.mid_norm
        seen = set()

        def decompose_conv(next_fun, call_args, call_kwargs, context):
            module = context.module
            found = split_call(module, context)
            if found is None:
                return next_fun(*call_args, **call_kwargs)
            base, layer = found
            path = module_path(module, root)
            rank = ranks.get(path)
            if rank is None:
                return next_fun(*call_args, **call_kwargs)
            transposed = base is nn.ConvTranspose
            dense = base not in (nn.Conv, nn.ConvTranspose)
            reason = (dense_skip_reason(layer) if dense else transposed_skip_reason(layer)
                      if transposed else conv_skip_reason(layer))
            if reason is not None:
                raise ValueError(f"layer {path!r} cannot be decomposed: {reason}")
            seen.add(path)
            x = call_args[0] if call_args else call_kwargs["inputs"]
            if base is nn.Einsum:
                equation = called_equation(module.einsum_str, call_args[1:], call_kwargs,
                                           jnp.ndim(x))
                return einsum_pair_forward(x, module, rank, equation, mid_norm, where=path)
            if transposed or (base is nn.Conv and input_dilated(module)):
                return transposed_pair_forward(
                    x, features=module.features, kernel_size=module.kernel_size, rank=rank,
                    strides=module.strides if transposed else module.input_dilation,
                    padding=module.padding, kernel_dilation=module.kernel_dilation,
                    use_bias=module.use_bias,
                    transpose_kernel=transposed and module.transpose_kernel, mid_norm=mid_norm,
                    dtype=module.dtype, param_dtype=module.param_dtype,
                    precision=module.precision, kernel_init=module.kernel_init,
                    bias_init=module.bias_init, where=path)
            if dense:
                return dense_pair_forward(
                    x, features=module.features, rank=rank, axis=getattr(module, "axis", -1),
                    use_bias=module.use_bias, mid_norm=mid_norm, dtype=module.dtype,
                    param_dtype=module.param_dtype, precision=module.precision,
                    kernel_init=module.kernel_init, bias_init=module.bias_init, where=path)
            return pair_forward(
                x, features=module.features, kernel_size=module.kernel_size, rank=rank,
                strides=module.strides, padding=module.padding,
                kernel_dilation=module.kernel_dilation,
                feature_group_count=module.feature_group_count, use_bias=module.use_bias,
                mid_norm=mid_norm, dtype=module.dtype, param_dtype=module.param_dtype,
                precision=module.precision, kernel_init=module.kernel_init,
                bias_init=module.bias_init, where=path)

        with linen_cells.as_sublayers(), linen_wrappers.unwrapped(self.unwrapped, root), \
                nn.intercept_methods(decompose_conv):
            call = getattr(self.base, method) if isinstance(method, str) else \
                functools.partial(method, self.base)
            out = call(*args, **kwargs)
        missing = sorted(set(ranks) - seen)
        if missing and not self.partial:
            raise ValueError("rank map names layers the model never called as nn.Conv, nn."
                             f"ConvTranspose, nn.Dense, nn.DenseGeneral or nn.Einsum: {missing}")
        return out
