"""Flax (linen) layers: the vertical/horizontal low-rank conv pair.

:class:`LowRankConv` is a ``kh x kw`` conv computed as a vertical ``kh x 1`` conv (``C -> K``, no
bias) followed by a horizontal ``1 x kw`` conv (``K -> N``, with the bias). :func:`pair_forward`
is the same computation for code that runs inside another module's scope: model surgery
(:mod:`lrjax.surgery`) calls it inside an intercepted ``nn.Conv``, so that a decomposed conv's
factors live under the conv's own path (``conv1_1/vertical/kernel``, ``conv1_1/horizontal/...``),
the same variables as a ``LowRankConv`` of that name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax import formulations
from lrjax.decompose import max_rank

__all__ = ["LowRankConv", "FactorConv", "pair_forward", "split_padding", "check_pair_rank"]

_DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()  # nn.Conv's


def _pair(v, what) -> tuple[int, int]:
    if v is None:
        return (1, 1)
    if isinstance(v, int):
        return (v, v)
    t = tuple(v)
    if len(t) != 2:
        raise ValueError(f"{what} must be an int or a pair for a 2-D conv; got {v!r}")
    return t


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
    if isinstance(padding, int):
        padding = (padding, padding)
    items = list(padding)
    if len(items) != 2:
        raise ValueError(f"padding must give 2 spatial dims for a 2-D conv; got {padding!r}")
    rows, cols = ((p, p) if isinstance(p, int) else tuple(p) for p in items)
    return (rows, (0, 0)), ((0, 0), cols)


def check_pair_rank(rank, kernel_shape, groups: int, where: str) -> int:
    """Validate a pair's total rank for an HWIO kernel shape; returns it as an int."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{where}: rank must be an int; got {rank!r}")
    top = max_rank(kernel_shape, groups=groups)
    kh, kw, cg, n = kernel_shape
    if not 1 <= rank <= top:
        raise ValueError(f"{where}: rank={rank} is out of range [1, {top}] for a {kh}x{kw} conv "
                         f"{cg * groups}->{n} with groups={groups}")
    if rank % groups:
        raise ValueError(f"{where}: rank={rank} is not divisible by feature_group_count={groups}")
    return rank


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
    horizontal one), so the output shape equals ``nn.Conv``'s for every padding form.

    Args:
      x: ``(..., H, W, C)``.
      where: the layer's name, for error messages.

    Returns:
      ``(..., H_out, W_out, features)``.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(kernel_dilation, "kernel_dilation")
    groups = feature_group_count
    c = x.shape[-1]
    if x.ndim < 3:
        raise ValueError(f"{where}: input must be (..., H, W, C); got shape {x.shape}")
    if c % groups:
        raise ValueError(f"{where}: input channels {c} (input shape {x.shape}) are not divisible "
                         f"by feature_group_count={groups}")
    check_pair_rank(rank, (kh, kw, c // groups, features), groups, where)
    pad_v, pad_h = split_padding(padding)
    common = dict(feature_group_count=groups, dtype=dtype, param_dtype=param_dtype,
                  precision=precision, kernel_init=kernel_init,
                  conv_general_dilated=formulations.conv_general_dilated)
    y = FactorConv(rank, (kh, 1), strides=(sh, 1), padding=pad_v, kernel_dilation=(dh, 1),
                   use_bias=False, name="vertical", **common)(x)
    if mid_norm is not None:
        y = mid_norm(name="mid_norm")(y)
    return FactorConv(features, (1, kw), strides=(1, sw), padding=pad_h,
                      kernel_dilation=(1, dw), use_bias=use_bias, bias_init=bias_init,
                      name="horizontal", **common)(y)


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
