"""Cost model: multiply-adds and parameters of a conv and of its vertical/horizontal pair.

A ``kh x kw`` conv with stride ``(sh, sw)``, padding ``((pt, pb), (pl, pr))`` and dilation
``(dh, dw)`` becomes a vertical ``kh x 1`` conv (stride ``(sh, 1)``, padding ``((pt, pb), (0, 0))``,
dilation ``(dh, 1)``) and a horizontal ``1 x kw`` conv (stride ``(1, sw)``, padding
``((0, 0), (pl, pr))``, dilation ``(1, dw)``). The vertical conv runs at the output height and the
*input* width, so with a horizontal stride the pair costs more than the paper's
``d K (C + N)`` per output pixel; the counts here are exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

__all__ = [
    "ConvShape",
    "Cost",
    "LayerCost",
    "NetCost",
    "explicit_padding",
    "output_size",
    "conv_cost",
    "lowrank_cost",
    "rank_cost_slope",
    "breakeven_rank",
    "layer_speedup",
    "net_cost",
    "vgg16_conv_shapes",
    "caffenet_conv_shapes",
]

_SAME_LIKE = ("SAME", "CIRCULAR", "REFLECT")


def _pair(v, name) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair; got {v!r}")
    return t


def explicit_padding(padding, input_hw, kernel_size, strides=1, dilation=1):
    """Explicit ``((top, bottom), (left, right))`` padding for any Flax ``nn.Conv`` padding form.

    Args:
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"`` (same amounts as SAME), an
        int, a pair of ints (one per spatial dim) or a pair of ``(low, high)`` pairs.
      input_hw, kernel_size, strides, dilation: ints or pairs.
    """
    h, w = _pair(input_hw, "input_hw")
    ks, st = _pair(kernel_size, "kernel_size"), _pair(strides, "strides")
    dl = _pair(dilation, "dilation")
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode not in _SAME_LIKE:
            raise ValueError(f"unsupported padding {padding!r} for a 2-D conv")
        pads = []
        for size, k, s, d in zip((h, w), ks, st, dl, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    items = list(padding)
    if len(items) != 2:
        raise ValueError(f"padding must have one entry per spatial dim (2); got {padding!r}")
    return tuple((int(p), int(p)) if isinstance(p, int) else _pair(p, "padding") for p in items)


def output_size(input_hw, kernel_size, strides=1, padding="SAME", dilation=1) -> tuple[int, int]:
    """Output ``(H, W)`` of a 2-D conv (Flax ``nn.Conv`` semantics)."""
    pads = explicit_padding(padding, input_hw, kernel_size, strides, dilation)
    out = []
    for size, k, s, d, (lo, hi) in zip(_pair(input_hw, "input_hw"), _pair(kernel_size, "k"),
                                       _pair(strides, "s"), _pair(dilation, "d"), pads,
                                       strict=True):
        span = size + lo + hi - (k - 1) * d
        if span < 1:
            raise ValueError(f"input size {input_hw} is too small for kernel {kernel_size} "
                             f"with padding {padding!r} and dilation {dilation}")
        out.append((span - 1) // s + 1)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """Geometry of one 2-D conv layer (enough to count its cost)."""

    name: str
    input_hw: tuple[int, int]
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: object = "SAME"
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    use_bias: bool = True

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """HWIO kernel shape ``(kh, kw, C // groups, N)``."""
        return (*self.kernel_size, self.in_channels // self.groups, self.out_channels)

    @property
    def output_hw(self) -> tuple[int, int]:
        return output_size(self.input_hw, self.kernel_size, self.strides, self.padding,
                           self.dilation)

    @property
    def vertical_output_hw(self) -> tuple[int, int]:
        """Output of the vertical conv: output height, *input* width (after width padding 0)."""
        return (self.output_hw[0], self.input_hw[1])


@dataclasses.dataclass(frozen=True)
class Cost:
    macs: int
    params: int


def conv_cost(layer: ConvShape) -> Cost:
    """Multiply-adds and parameters (bias included when ``use_bias``) of the full conv."""
    ho, wo = layer.output_hw
    kh, kw, cg, n = layer.kernel_shape
    return Cost(macs=ho * wo * kh * kw * cg * n, params=kh * kw * cg * n + n * layer.use_bias)


def _check_rank(layer: ConvShape, rank: int):
    from lrjax.decompose import max_rank  # local: keeps costs free of jax at import

    top = max_rank(layer.kernel_shape, groups=layer.groups)
    if not 1 <= rank <= top or rank % layer.groups:
        raise ValueError(f"rank {rank} is invalid for layer {layer.name!r} "
                         f"(kernel {layer.kernel_shape}, groups {layer.groups}, max rank {top})")


def lowrank_cost(layer: ConvShape, rank: int) -> Cost:
    """Multiply-adds and parameters of the rank-``rank`` vertical/horizontal pair."""
    _check_rank(layer, rank)
    kh, kw, cg, n = layer.kernel_shape
    kg = rank // layer.groups
    hv, wv = layer.vertical_output_hw
    ho, wo = layer.output_hw
    macs = hv * wv * kh * cg * rank + ho * wo * kw * kg * n
    params = kh * cg * rank + kw * kg * n + n * layer.use_bias
    return Cost(macs=macs, params=params)


def rank_cost_slope(layer: ConvShape) -> float:
    """Multiply-adds added by one more unit of total rank (the pair's cost is linear in K)."""
    kh, kw, cg, n = layer.kernel_shape
    hv, wv = layer.vertical_output_hw
    ho, wo = layer.output_hw
    return hv * wv * kh * cg + ho * wo * kw * n / layer.groups


def breakeven_rank(layer: ConvShape) -> int:
    """Largest total rank (multiple of ``groups``) whose pair costs no more than the full conv."""
    from lrjax.decompose import max_rank

    k = math.floor(conv_cost(layer).macs / rank_cost_slope(layer))
    k = min(k, max_rank(layer.kernel_shape, groups=layer.groups))
    return k - k % layer.groups


def layer_speedup(layer: ConvShape, rank: int) -> float:
    """Theoretical speedup ``macs(full) / macs(pair)`` of one layer."""
    return conv_cost(layer).macs / lowrank_cost(layer, rank).macs


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    kernel_shape: tuple[int, int, int, int]
    rank: int | None  # None: kept full rank
    full: Cost
    lowrank: Cost

    @property
    def speedup(self) -> float:
        return self.full.macs / self.lowrank.macs


@dataclasses.dataclass(frozen=True)
class NetCost:
    layers: tuple[LayerCost, ...]

    @property
    def full_macs(self) -> int:
        return sum(lc.full.macs for lc in self.layers)

    @property
    def lowrank_macs(self) -> int:
        return sum(lc.lowrank.macs for lc in self.layers)

    @property
    def full_params(self) -> int:
        return sum(lc.full.params for lc in self.layers)

    @property
    def lowrank_params(self) -> int:
        return sum(lc.lowrank.params for lc in self.layers)

    @property
    def speedup(self) -> float:
        return self.full_macs / self.lowrank_macs

    def table(self) -> str:
        """A plain-text per-layer table."""
        head = f"{'layer':<12}{'kernel':>20}{'rank':>6}{'MACs full':>14}{'MACs pair':>14}" \
               f"{'params full':>13}{'params pair':>13}{'speedup':>9}"
        rows = [head, "-" * len(head)]
        for lc in self.layers:
            rows.append(f"{lc.name:<12}{str(lc.kernel_shape):>20}{lc.rank or 'full':>6}"
                        f"{lc.full.macs:>14,}{lc.lowrank.macs:>14,}{lc.full.params:>13,}"
                        f"{lc.lowrank.params:>13,}{lc.speedup:>8.2f}x")
        rows.append(f"{'total':<38}{self.full_macs:>14,}{self.lowrank_macs:>14,}"
                    f"{self.full_params:>13,}{self.lowrank_params:>13,}{self.speedup:>8.2f}x")
        return "\n".join(rows)


def net_cost(layers: Sequence[ConvShape], ranks: Mapping[str, int | None]) -> NetCost:
    """Per-layer and whole-net cost; layers missing from ``ranks`` (or mapped to None) stay full."""
    known = {layer.name for layer in layers}
    unknown = sorted(set(ranks) - known)
    if unknown:
        raise ValueError(f"ranks name unknown layers {unknown}; known: {sorted(known)}")
    out = []
    for layer in layers:
        rank = ranks.get(layer.name)
        full = conv_cost(layer)
        out.append(LayerCost(layer.name, layer.kernel_shape, rank, full,
                             full if rank is None else lowrank_cost(layer, rank)))
    return NetCost(tuple(out))


def vgg16_conv_shapes(image_size: int = 224) -> list[ConvShape]:
    """The 13 conv layers of VGG-16 (Simonyan & Zisserman, config D) at a square input size."""
    widths = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
    layers, c, size = [], 3, image_size
    for block, outs in enumerate(widths, start=1):
        for i, n in enumerate(outs, start=1):
            layers.append(ConvShape(f"conv{block}_{i}", (size, size), c, n, (3, 3)))
            c = n
        size //= 2
    return layers


def caffenet_conv_shapes(image_size: int = 227) -> list[ConvShape]:
    """The 5 conv layers of CaffeNet (grouped conv2, conv4, conv5) at a square input size."""
    s1 = output_size((image_size,) * 2, (11, 11), 4, "VALID")
    p1 = ((s1[0] - 3) // 2 + 1,) * 2
    s2 = output_size(p1, (5, 5), 1, 2)
    p2 = ((s2[0] - 3) // 2 + 1,) * 2
    return [
        ConvShape("conv1", (image_size, image_size), 3, 96, (11, 11), (4, 4), "VALID"),
        ConvShape("conv2", p1, 96, 256, (5, 5), padding=2, groups=2),
        ConvShape("conv3", p2, 256, 384, (3, 3), padding=1),
        ConvShape("conv4", p2, 384, 384, (3, 3), padding=1, groups=2),
        ConvShape("conv5", p2, 384, 256, (3, 3), padding=1, groups=2),
    ]
