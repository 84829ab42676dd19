"""Cost model: multiply-adds and parameters of a conv and of its vertical/horizontal pair.

A ``kh x kw`` conv with stride ``(sh, sw)``, padding ``((pt, pb), (pl, pr))`` and dilation
``(dh, dw)`` becomes a vertical ``kh x 1`` conv (stride ``(sh, 1)``, padding ``((pt, pb), (0, 0))``,
dilation ``(dh, 1)``) and a horizontal ``1 x kw`` conv (stride ``(1, sw)``, padding
``((0, 0), (pl, pr))``, dilation ``(1, dw)``). The vertical conv runs at the output height and the
*input* width, so with a horizontal stride the pair costs more than the paper's
``d K (C + N)`` per output pixel; the counts here are exact. A 1x1 conv (``d = 1``; dense layers
are counted as one) becomes two 1x1 convs, the first taking both strides and the padding, so its
pair costs exactly ``K (C + N)`` per output pixel.

A transposed conv (``nn.ConvTranspose``, ``transposed=True``) is a conv with stride 1 on its input
dilated by its strides (:func:`transpose_padding` gives that conv's padding); its pair is a
vertical ``kh x 1`` transposed conv (strides ``(sh, 1)``, the row padding) then a horizontal
``1 x kw`` one (strides ``(1, sw)``, the column padding): input dilation is separable, so the
split is exact, and the counts here are exact for it too (a 1x1 kernel included).

Multiply-adds are the ones performed: a tap that falls on padding multiplies a zero and is not
counted (:func:`valid_taps`), which is how XLA counts a convolution's flops
(``jax.jit(f).lower(...).compile().cost_analysis()["flops"]`` is twice the multiply-adds plus the
element-wise work). Without padding that is ``H_out W_out kh kw C N``, the papers' count; with SAME
padding it is lower (VGG-16 at 224: 15.35 G counting whole windows, 14.85 G performed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping, Sequence

__all__ = [
    "as_pair",
    "check_kernel_shape",
    "max_rank",
    "check_rank",
    "ConvShape",
    "Cost",
    "LayerCost",
    "NetCost",
    "explicit_padding",
    "transpose_padding",
    "output_size",
    "valid_taps",
    "conv_cost",
    "lowrank_cost",
    "rank_cost_slope",
    "breakeven_rank",
    "layer_speedup",
    "net_cost",
]

_SAME_LIKE = ("SAME", "CIRCULAR", "REFLECT")


def as_pair(v, name: str = "value") -> tuple[int, int]:
    """A 2-D conv's per-dimension value: ``(v, v)`` for an int, the pair itself for a pair, and
    ``(1, 1)`` for ``None`` (Flax's default stride / dilation).

    Raises:
      ValueError: anything else, naming ``name`` and the value.
    """
    if v is None:
        return (1, 1)
    if isinstance(v, numbers.Integral):
        return (int(v), int(v))
    try:
        t = tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints; got {v!r}") from None
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints for a 2-D conv; got {v!r}")
    return t


def check_kernel_shape(shape, groups: int = 1) -> tuple[int, int, int, int]:
    """Validate an HWIO kernel shape ``(kh, kw, C / groups, N)`` and its group count.

    Raises:
      ValueError: not 4-D, an empty dimension, a bad ``groups``, or ``N`` not divisible by it.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4:
        raise ValueError(f"kernel must be 4-D HWIO (kh, kw, C/groups, N); got shape {shape}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    if min(shape) < 1:
        raise ValueError(f"kernel has an empty dimension: shape {shape}")
    if shape[3] % groups:
        raise ValueError(f"output channels N={shape[3]} of kernel shape {shape} are not divisible "
                         f"by groups={groups}")
    return shape


def max_rank(kernel_shape, *, groups: int = 1) -> int:
    """The largest total rank for an HWIO kernel shape: ``groups * min(C_g * kh, kw * N_g)``."""
    kh, kw, cg, n = check_kernel_shape(kernel_shape, groups)
    return groups * min(cg * kh, kw * (n // groups))


def check_rank(rank, kernel_shape, *, groups: int = 1, where: str = "") -> int:
    """Validate a pair's total rank for an HWIO kernel shape; returns it as an int.

    A valid rank is an int in ``[1, max_rank]`` divisible by ``groups`` (each group gets
    ``rank / groups`` intermediate channels).

    Raises:
      ValueError: naming ``where`` (e.g. ``"layer 'conv1'"``), the rank, what is wrong, the
        kernel shape and groups.
    """
    of = f" of {where}" if where else ""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"rank{of} must be an int; got {rank!r}")
    rank = int(rank)
    top = max_rank(kernel_shape, groups=groups)
    if not 1 <= rank <= top:
        problem = f"out of range [1, {top}]"
    elif rank % groups:
        problem = f"not divisible by groups={groups}"
    else:
        return rank
    raise ValueError(f"rank {rank} is invalid{' for ' + where if where else ''}: {problem} "
                     f"(kernel {tuple(int(d) for d in kernel_shape)}, groups {groups})")


def explicit_padding(padding, input_hw, kernel_size, strides=1, dilation=1):
    """Explicit ``((top, bottom), (left, right))`` padding for any Flax ``nn.Conv`` padding form.

    Args:
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"`` (same amounts as SAME), an
        int, a pair of ints (one per spatial dim) or a pair of ``(low, high)`` pairs.
      input_hw, kernel_size, strides, dilation: ints or pairs.
    """
    h, w = as_pair(input_hw, "input_hw")
    ks, st = as_pair(kernel_size, "kernel_size"), as_pair(strides, "strides")
    dl = as_pair(dilation, "dilation")
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
    return tuple((int(p), int(p)) if isinstance(p, int) else as_pair(p, "padding") for p in items)


def transpose_padding(padding, kernel_size, strides=1, dilation=1):
    """Explicit ``((top, bottom), (left, right))`` padding of the conv a transposed conv runs on
    its stride-dilated input (``lax.conv_transpose``'s, as ``nn.ConvTranspose`` calls it).

    Args:
      padding: ``"SAME"``, ``"VALID"`` (per dim: ``lax.conv_transpose``'s rule for the dilated
        kernel), an int, or one ``(low, high)`` pair (or int) per spatial dim (used as given).
      kernel_size, strides, dilation: ints or pairs.
    """
    ks, st = as_pair(kernel_size, "kernel_size"), as_pair(strides, "strides")
    dl = as_pair(dilation, "dilation")
    if not isinstance(padding, str):
        return explicit_padding(padding, (1, 1), ks)
    mode = padding.upper()
    if mode not in ("SAME", "VALID"):
        raise ValueError(f"unsupported padding {padding!r} for a transposed conv")
    pads = []
    for k, s, d in zip(ks, st, dl, strict=True):
        k = (k - 1) * d + 1
        if mode == "SAME":
            total = k + s - 2
            low = k - 1 if s > k - 1 else -(-total // 2)
        else:
            total, low = k + s - 2 + max(k - s, 0), k - 1
        pads.append((low, total - low))
    return tuple(pads)


def output_size(input_hw, kernel_size, strides=1, padding="SAME", dilation=1) -> tuple[int, int]:
    """Output ``(H, W)`` of a 2-D conv (Flax ``nn.Conv`` semantics)."""
    pads = explicit_padding(padding, input_hw, kernel_size, strides, dilation)
    out = []
    for size, k, s, d, (lo, hi) in zip(as_pair(input_hw, "input_hw"), as_pair(kernel_size, "k"),
                                       as_pair(strides, "s"), as_pair(dilation, "d"), pads,
                                       strict=True):
        span = size + lo + hi - (k - 1) * d
        if span < 1:
            raise ValueError(f"input size {input_hw} is too small for kernel {kernel_size} "
                             f"with padding {padding!r} and dilation {dilation}")
        out.append((span - 1) // s + 1)
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def valid_taps(input_size: int, kernel: int, stride: int = 1, pad_low: int = 0, dilation: int = 1,
               output_size: int = 1, input_dilation: int = 1) -> int:
    """Kernel taps that land on the input, summed over one spatial dim's output positions.

    Output ``o``'s tap ``t`` reads position ``o * stride - pad_low + t * dilation`` of the input
    dilated by ``input_dilation`` (a transposed conv); it counts when that position holds an input
    element, not padding or a dilation hole. A conv's multiply-adds are the product of this over
    its spatial dims times the batch, ``C / groups`` and ``N``: XLA's count.
    """
    count = 0
    extent = (input_size - 1) * input_dilation + 1
    for o in range(output_size):
        start = o * stride - pad_low
        for t in range(kernel):
            x = start + t * dilation
            if 0 <= x < extent and x % input_dilation == 0:
                count += 1
    return count


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """Geometry of one 2-D conv layer (enough to count its cost).

    ``images``: how many inputs of ``input_hw`` the layer runs per example of the model (1 for
    a layer called on the model's batch; more for a layer called on windows or frames folded
    into the batch, or on a flattened ``(batch * tokens, C)`` input; less for one called on an
    unbatched input). Costs count all of them.

    ``view_taps``: for an N-D conv costed as a 2-D one (its leading dims as one column, its last
    as the width: :func:`lrjax.conv_views.conv_view`), the taps that land on its input summed
    over its outputs, along the leading dims (the product of :func:`valid_taps` over them) and
    along the last: ``taps_hw`` (its padding's taps are not counted, as XLA counts them).

    ``mid_macs``: for a 1x1 or dense geometry, what its pair costs beyond its products per
    element of its intermediate (the total rank at each output position), in multiply-adds
    (half of XLA's flops): 2 for a ``ragged_dot`` pair, whose second product XLA:CPU computes
    on its input masked by group, 4 flops an element (:mod:`lrjax.ragged`); 0 otherwise.

    ``runs``: the geometries of the layer's other calls where they differ from this one's
    (a detection head's convs shared by every level of a feature pyramid: 16x16, 8x8, ... ;
    their padding taps are not in proportion), each with its own ``images``; costs sum over
    this call and them."""

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
    transposed: bool = False
    images: float = 1
    view_taps: tuple[int, int] | None = None
    mid_macs: int = 0
    runs: tuple = ()

    def times(self, factor: float, divisor: int = 1) -> ConvShape:
        """This geometry with its ``images`` (and its runs') multiplied by ``factor`` and
        divided by ``divisor`` (whole counts kept integers)."""
        images = self.images * factor / divisor
        images = int(images) if float(images).is_integer() else images
        return dataclasses.replace(self, images=images,
                                   runs=tuple(r.times(factor, divisor) for r in self.runs))

    @property
    def calls(self) -> tuple[ConvShape, ...]:
        """This geometry and its ``runs``: what the layer's costs sum over."""
        return (self, *self.runs)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """HWIO kernel shape ``(kh, kw, C // groups, N)``."""
        return (*self.kernel_size, self.in_channels // self.groups, self.out_channels)

    @property
    def conv_padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Explicit padding of the conv computed (a transposed conv's on its dilated input)."""
        if self.transposed:
            return transpose_padding(self.padding, self.kernel_size, self.strides, self.dilation)
        return explicit_padding(self.padding, self.input_hw, self.kernel_size, self.strides,
                                self.dilation)

    @property
    def output_hw(self) -> tuple[int, int]:
        if not self.transposed:
            return output_size(self.input_hw, self.kernel_size, self.strides, self.padding,
                               self.dilation)
        dilated = tuple((n - 1) * s + 1 for n, s in zip(self.input_hw, self.strides, strict=True))
        return output_size(dilated, self.kernel_size, 1, self.conv_padding, self.dilation)

    @functools.cached_property
    def taps_hw(self) -> tuple[int, int]:
        """:func:`valid_taps` of the height and of the width: the full conv performs
        ``taps_hw[0] * taps_hw[1] * C / groups * N`` multiply-adds (a transposed conv's taps
        on its dilation holes are not counted)."""
        if self.view_taps is not None:
            return tuple(self.view_taps)
        strides, dilated = ((1, 1), self.strides) if self.transposed else (self.strides, (1, 1))
        # CIRCULAR / REFLECT: Flax pads the input with data, then runs a VALID conv
        data = isinstance(self.padding, str) and self.padding.upper() in ("CIRCULAR", "REFLECT")
        return tuple(valid_taps(size + (lo + hi if data else 0), k, s, 0 if data else lo, d, out, i)
                     for size, k, s, d, (lo, hi), out, i in zip(
                         self.input_hw, self.kernel_size, strides, self.dilation,
                         self.conv_padding, self.output_hw, dilated, strict=True))

    def _pair_terms(self) -> tuple[int, int]:
        """Multiply-adds per unit of rank of the pair's first and second conv, divided by
        ``C / groups`` and by ``N / groups``: the first conv (``kh x 1``, or the 1x1 taking the
        strides and padding) performs ``taps_h * W_in`` (``taps_h * taps_w`` for a 1x1) window
        positions; the second (``1 x kw`` without vertical padding, or a plain 1x1) ``H_out *
        taps_w`` (``H_out * W_out``). A transposed conv always splits into rows and columns."""
        th, tw = self.taps_hw
        ho, wo = self.output_hw
        if tuple(self.kernel_size) == (1, 1) and not self.transposed:
            return th * tw, ho * wo
        return th * self.input_hw[1], ho * tw


@dataclasses.dataclass(frozen=True)
class Cost:
    macs: int
    params: int


def conv_cost(layer: ConvShape) -> Cost:
    """Multiply-adds and parameters (bias included when ``use_bias``) of the full conv (over
    its ``runs`` too)."""
    kh, kw, cg, n = layer.kernel_shape
    macs = sum(_per_example(math.prod(call.taps_hw) * cg * n, call)
               for call in layer.calls)
    return Cost(macs=macs, params=kh * kw * cg * n + n * layer.use_bias)


def _per_example(macs: int, layer: ConvShape):
    return macs if layer.images == 1 else macs * layer.images


def lowrank_cost(layer: ConvShape, rank: int) -> Cost:
    """Multiply-adds and parameters of the rank-``rank`` vertical/horizontal pair."""
    check_rank(rank, layer.kernel_shape, groups=layer.groups, where=f"layer {layer.name!r}")
    kh, kw, cg, n = layer.kernel_shape
    kg = rank // layer.groups
    macs = 0
    for call in layer.calls:
        first, second = call._pair_terms()
        # (a 1x1 geometry's intermediate has `first` positions: mid_macs each)
        macs += _per_example((first * cg + layer.mid_macs * first) * rank + second * kg * n, call)
    params = kh * cg * rank + kw * kg * n + n * layer.use_bias
    return Cost(macs=macs, params=params)


def rank_cost_slope(layer: ConvShape) -> float:
    """Multiply-adds added by one more unit of total rank (the pair's cost is linear in K)."""
    _, _, cg, n = layer.kernel_shape
    return sum(_per_example(first * cg + second * n / layer.groups + layer.mid_macs * first, call)
               for call in layer.calls for first, second in [call._pair_terms()])


def breakeven_rank(layer: ConvShape) -> int:
    """Largest total rank (multiple of ``groups``) whose pair costs no more than the full conv."""
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
        """Multiply-adds before over after (1 for a layer that costs nothing: one whose work
        the model never uses, :data:`lrjax.site_runs.UNUSED`)."""
        return self.full.macs / self.lowrank.macs if self.lowrank.macs else 1.0


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
        """``full / low-rank`` multiply-adds (1.0 for a net with no layer)."""
        return self.full_macs / self.lowrank_macs if self.lowrank_macs else 1.0

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
