"""Flax (linen) layers: the vertical/horizontal low-rank conv pair and the conv factory.

Models in :mod:`lrjax.models` create every conv through a *conv factory*
(``conv(features, kernel_size, name=..., **nn.Conv kwargs)``), the way Flax's ImageNet example
passes ``conv``; the full-rank and low-rank nets are the same definition with a different factory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax.decompose import max_rank

__all__ = [
    "LowRankConv", "ConvFactory", "full_rank", "low_rank", "split_padding", "conv1d_as_matmul",
]

IMPLEMENTATIONS = ("conv", "matmul")


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


def conv1d_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, precision=None):
    """A drop-in for ``lax.conv_general_dilated`` on NHWC/HWIO with a ``k x 1`` or ``1 x k`` kernel,
    written as matrix products over the channel axis plus shifted slices.

    Two orders compute the same thing; the one that shifts the narrower tensor is used: if
    ``K < C`` the channels are contracted first (``x @ [W_0 .. W_{k-1}]``, ``k K`` channels) and the
    ``k`` shifted slices summed; otherwise the ``k`` shifted slices of ``x`` are concatenated
    (``k C`` channels) and contracted once. XLA runs these large matrix products faster than its
    convolution kernel for thin channel counts on CPU. Groups and input dilation are not supported.
    """
    if feature_group_count != 1 or (lhs_dilation is not None and tuple(lhs_dilation) != (1, 1)):
        raise ValueError("conv1d_as_matmul supports feature_group_count=1 and no input dilation")
    kh, kw, c, k_out = rhs.shape
    if kh != 1 and kw != 1:
        raise ValueError(f"conv1d_as_matmul needs a k x 1 or 1 x k kernel; got {rhs.shape}")
    axis, taps = (1, kh) if kw == 1 else (2, kw)
    stride = tuple(window_strides)[axis - 1]
    dils = (1, 1) if rhs_dilation is None else tuple(rhs_dilation)
    dil = dils[axis - 1]
    if isinstance(padding, str):
        span = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dils, strict=True)]
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], span, window_strides, padding)
    padding = [tuple(p) for p in padding]
    other = 3 - axis  # the axis with kernel size 1: only its padding and stride apply
    if padding[other - 1] != (0, 0) or tuple(window_strides)[other - 1] != 1:
        lhs = jnp.pad(lhs, [(0, 0)] + [padding[0] if other == 1 else (0, 0),
                                       padding[1] if other == 2 else (0, 0)] + [(0, 0)])
        lhs = jax.lax.slice_in_dim(lhs, 0, None, tuple(window_strides)[other - 1], axis=other)
    pads = [(0, 0)] * 4
    pads[axis] = padding[axis - 1]
    n_out = (lhs.shape[axis] + sum(pads[axis]) - (taps - 1) * dil - 1) // stride + 1
    w = rhs.reshape(taps, c, k_out)

    def shifted(t, i):
        start = i * dil
        return jax.lax.slice_in_dim(t, start, start + (n_out - 1) * stride + 1, stride, axis=axis)

    if k_out < c:
        y = jnp.einsum("bhwc,ck->bhwk", lhs, jnp.transpose(w, (1, 0, 2)).reshape(c, taps * k_out),
                       precision=precision)
        y = jnp.pad(y, pads)
        return sum(shifted(y[..., i * k_out:(i + 1) * k_out], i) for i in range(taps))
    xp = jnp.pad(lhs, pads)
    cols = jnp.concatenate([shifted(xp, i) for i in range(taps)], axis=-1)
    return jnp.einsum("bhwc,ck->bhwk", cols, w.reshape(taps * c, k_out), precision=precision)


class LowRankConv(nn.Module):
    """A ``kh x kw`` conv as a vertical ``kh x 1`` conv (no bias) then a horizontal ``1 x kw`` conv.

    Arguments mean what they mean for ``nn.Conv``; stride, padding and dilation split as in the
    paper (rows to the vertical conv, columns to the horizontal one), so the output shape equals
    ``nn.Conv``'s for every padding form, and with the factors of ``vh_decompose`` at full rank the
    output equals ``nn.Conv``'s. Submodules: ``vertical`` (kernel ``(kh, 1, C/groups, rank)``),
    optional ``mid_norm``, ``horizontal`` (kernel ``(1, kw, rank/groups, features)``, bias).

    Attributes:
      features: output channels ``N``.
      kernel_size: ``(kh, kw)``.
      rank: total intermediate channels ``K``, divisible by ``feature_group_count``.
      mid_norm: optional factory ``mid_norm(name=...)`` of a norm layer applied between the convs.
      implementation: ``"conv"`` (two ``lax`` convolutions) or ``"matmul"``
        (:func:`conv1d_as_matmul`, faster for thin channel counts on CPU; no groups). Same
        variables and outputs either way.
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
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    implementation: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., H, W, C)`` -> ``(..., H_out, W_out, features)``."""
        kh, kw = _pair(self.kernel_size, "kernel_size")
        sh, sw = _pair(self.strides, "strides")
        dh, dw = _pair(self.kernel_dilation, "kernel_dilation")
        groups = self.feature_group_count
        c = x.shape[-1]
        if c % groups:
            raise ValueError(f"{self.name}: input channels {c} (input shape {x.shape}) are not "
                             f"divisible by feature_group_count={groups}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise ValueError(f"{self.name}: rank must be an int; got {self.rank!r}")
        top = max_rank((kh, kw, c // groups, self.features), groups=groups)
        if not 1 <= self.rank <= top:
            raise ValueError(f"{self.name}: rank={self.rank} is out of range [1, {top}] for a "
                             f"{kh}x{kw} conv {c}->{self.features} with groups={groups}")
        if self.rank % groups:
            raise ValueError(f"{self.name}: rank={self.rank} is not divisible by "
                             f"feature_group_count={groups}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"{self.name}: implementation must be one of {IMPLEMENTATIONS}; "
                             f"got {self.implementation!r}")
        if self.implementation == "matmul" and groups != 1:
            raise ValueError(f"{self.name}: implementation='matmul' needs feature_group_count=1")
        pad_v, pad_h = split_padding(self.padding)
        common = dict(feature_group_count=groups, dtype=self.dtype, param_dtype=self.param_dtype,
                      precision=self.precision, kernel_init=self.kernel_init)
        if self.implementation == "matmul":
            if isinstance(self.padding, str) and self.padding.upper() in ("CIRCULAR", "REFLECT"):
                raise ValueError(f"{self.name}: implementation='matmul' supports zero padding only")
            common["conv_general_dilated"] = conv1d_as_matmul
        y = nn.Conv(self.rank, (kh, 1), strides=(sh, 1), padding=pad_v, kernel_dilation=(dh, 1),
                    use_bias=False, name="vertical", **common)(x)
        if self.mid_norm is not None:
            y = self.mid_norm(name="mid_norm")(y)
        return nn.Conv(self.features, (1, kw), strides=(1, sw), padding=pad_h,
                       kernel_dilation=(1, dw), use_bias=self.use_bias, bias_init=self.bias_init,
                       name="horizontal", **common)(y)


@dataclasses.dataclass(frozen=True)
class ConvFactory:
    """Creates each named conv of a model: ``LowRankConv`` where ``ranks`` names it, else ``nn.Conv``.

    Hashable (ranks are stored as a sorted tuple), so it can be a field of a Flax module.
    """

    ranks: tuple[tuple[str, int], ...] = ()
    mid_norm: Callable[..., nn.Module] | None = None
    implementations: tuple[tuple[str, str], ...] = ()  # per-layer LowRankConv.implementation

    pointwise_as_matmul: bool = True  # 1x1 convs as channel matmuls (much faster on CPU)

    def __call__(self, features: int, kernel_size, *, name: str, **kwargs) -> nn.Module:
        rank = dict(self.ranks).get(name)
        if rank is None:
            pointwise = (tuple(_pair(kernel_size, "kernel_size")) == (1, 1)
                         and kwargs.get("feature_group_count", 1) == 1
                         and kwargs.get("padding", "SAME") in ("SAME", "VALID", 0))
            if self.pointwise_as_matmul and pointwise:
                kwargs = {**kwargs, "conv_general_dilated": conv1d_as_matmul}
            return nn.Conv(features, kernel_size, name=name, **kwargs)
        impl = dict(self.implementations).get(name, "conv")
        return LowRankConv(features, kernel_size, rank=rank, mid_norm=self.mid_norm, name=name,
                           implementation=impl, **kwargs)

    @property
    def rank_map(self) -> dict[str, int]:
        return dict(self.ranks)


def full_rank() -> ConvFactory:
    """The factory of a full-rank model (every conv an ``nn.Conv``)."""
    return ConvFactory()


def low_rank(ranks: Mapping[str, int | None], mid_norm=None,
             implementations: Mapping[str, str] | None = None) -> ConvFactory:
    """The factory of a low-rank model; layers mapped to ``None`` (or absent) stay full rank.

    ``implementations`` optionally picks ``LowRankConv.implementation`` per layer.
    """
    return ConvFactory(tuple(sorted((k, int(v)) for k, v in ranks.items() if v is not None)),
                       mid_norm, tuple(sorted((implementations or {}).items())))
