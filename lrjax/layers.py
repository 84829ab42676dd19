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

__all__ = ["LowRankConv", "ConvFactory", "full_rank", "low_rank", "split_padding"]


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
        pad_v, pad_h = split_padding(self.padding)
        common = dict(feature_group_count=groups, dtype=self.dtype, param_dtype=self.param_dtype,
                      precision=self.precision, kernel_init=self.kernel_init)
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

    def __call__(self, features: int, kernel_size, *, name: str, **kwargs) -> nn.Module:
        rank = dict(self.ranks).get(name)
        if rank is None:
            return nn.Conv(features, kernel_size, name=name, **kwargs)
        return LowRankConv(features, kernel_size, rank=rank, mid_norm=self.mid_norm, name=name,
                           **kwargs)

    @property
    def rank_map(self) -> dict[str, int]:
        return dict(self.ranks)


def full_rank() -> ConvFactory:
    """The factory of a full-rank model (every conv an ``nn.Conv``)."""
    return ConvFactory()


def low_rank(ranks: Mapping[str, int | None], mid_norm=None) -> ConvFactory:
    """The factory of a low-rank model; layers mapped to ``None`` (or absent) stay full rank."""
    return ConvFactory(tuple(sorted((k, int(v)) for k, v in ranks.items() if v is not None)),
                       mid_norm)
