"""Flax (linen) layers: the vertical/horizontal low-rank conv pair and the conv factory.

Models in :mod:`lrjax.models` create every conv through a *conv factory*
(``conv(features, kernel_size, name=..., **nn.Conv kwargs)``), the way Flax's ImageNet example
passes ``conv``; the full-rank and low-rank nets are the same definition with a different factory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax.decompose import max_rank

__all__ = [
    "LowRankConv", "ConvFactory", "full_rank", "low_rank", "split_padding", "conv1d_as_matmul",
    "conv_gemm_weight_grad", "thin_conv_general_dilated", "channel_matmul",
    "conv1d_matmul_when_differentiated",
]

IMPLEMENTATIONS = ("auto", "conv", "matmul")


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


def _einsum_matmul(x, w, precision=None):
    return jnp.einsum("...p,po->...o", x, w, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def channel_matmul(x, w, precision=None):
    """``x @ w`` over the last axis: ``(..., P) x (P, O) -> (..., O)``, with a backward pass that
    XLA:CPU runs on its fast GEMM.

    The kernel gradient contracts the long row axis of two row-major operands. Left to itself,
    XLA:CPU either runs that product on a slow kernel or transposes the larger operand; here the
    thinner operand is transposed explicitly (measured on 2 cores, batch 128: the low-rank NIN
    train step ~16% faster). Values and gradients are those of ``jnp.einsum``. A ``custom_vjp``:
    reverse-mode differentiation only (``jax.jvp`` through it raises).
    """
    return _einsum_matmul(x, w, precision)


def _channel_matmul_fwd(x, w, precision):
    return channel_matmul(x, w, precision), (x, w)


def _channel_matmul_bwd(precision, residuals, g):
    x, w = residuals
    g_x = jnp.einsum("...o,po->...p", g, w, precision=precision)
    rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if rows_x.shape[1] <= rows_g.shape[1]:
        g_w = jnp.dot(jnp.transpose(rows_x), rows_g, precision=precision)
    else:
        g_w = jnp.transpose(jnp.dot(jnp.transpose(rows_g), rows_x, precision=precision))
    return g_x.astype(x.dtype), g_w.astype(w.dtype)


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _on_cpu() -> bool:
    """Whether code being traced now targets XLA:CPU (the CPU formulations are chosen by this)."""
    return jax.default_backend() == "cpu"


def _ungrouped_undilated(lhs_dilation, feature_group_count) -> bool:
    return feature_group_count == 1 and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))


def _check_ungrouped_undilated(what, lhs_dilation, feature_group_count):
    if not _ungrouped_undilated(lhs_dilation, feature_group_count):
        raise ValueError(f"{what} supports feature_group_count=1 and no input dilation; "
                         f"got feature_group_count={feature_group_count}, "
                         f"lhs_dilation={lhs_dilation}")


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
    """Whether ``dimension_numbers`` (lax's forms) mean NHWC input / HWIO kernel for 2-D convs."""
    def numbers(spec):
        return jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, spec)
    return lhs.ndim == 4 and numbers(dimension_numbers) == numbers(("NHWC", "HWIO", "NHWC"))


def _check_conv1d(rhs, lhs_dilation, feature_group_count):
    _check_ungrouped_undilated("conv1d_as_matmul", lhs_dilation, feature_group_count)
    if rhs.ndim != 4 or (rhs.shape[0] != 1 and rhs.shape[1] != 1):
        raise ValueError(f"conv1d_as_matmul needs a k x 1 or 1 x k HWIO kernel; got {rhs.shape}")


def conv1d_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, precision=None):
    """A drop-in for ``lax.conv_general_dilated`` on NHWC/HWIO with a ``k x 1`` or ``1 x k`` kernel,
    written as matrix products over the channel axis plus shifted slices.

    Two orders compute the same thing; the one that shifts the narrower tensor is used: if
    ``K < C`` the channels are contracted first (``x @ [W_0 .. W_{k-1}]``, ``k K`` channels) and the
    ``k`` shifted slices summed; otherwise the ``k`` shifted slices of ``x`` are concatenated
    (``k C`` channels) and contracted once. XLA runs these large matrix products faster than its
    convolution kernel for thin channel counts on CPU. Groups and input dilation are not supported.
    On CPU the products are :func:`channel_matmul` (a ``custom_vjp``: reverse-mode only, so
    ``jax.jvp`` through it raises); elsewhere plain ``jnp.einsum``.
    """
    _check_conv1d(rhs, lhs_dilation, feature_group_count)
    kh, kw, c, k_out = rhs.shape
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
    matmul = channel_matmul if _on_cpu() else _einsum_matmul

    def shifted(t, i):
        start = i * dil
        return jax.lax.slice_in_dim(t, start, start + (n_out - 1) * stride + 1, stride, axis=axis)

    if k_out < c:
        y = matmul(lhs, jnp.transpose(w, (1, 0, 2)).reshape(c, taps * k_out), precision)
        y = jnp.pad(y, pads)
        return sum(shifted(y[..., i * k_out:(i + 1) * k_out], i) for i in range(taps))
    xp = jnp.pad(lhs, pads)
    cols = jnp.concatenate([shifted(xp, i) for i in range(taps)], axis=-1)
    return matmul(cols, w.reshape(taps * c, k_out), precision)


def conv1d_matmul_when_differentiated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                      rhs_dilation=None, dimension_numbers=None,
                                      feature_group_count=1, precision=None):
    """XLA's convolution for a value alone; :func:`conv1d_as_matmul` under differentiation.

    A ``custom_vjp`` whose plain evaluation is ``lax.conv_general_dilated`` (the faster forward
    pass for inference on CPU) and whose forward and backward passes, when gradients are taken,
    are those of the matmul formulation (the faster train step on CPU: NIN's pairs, see
    BENCHMARKS.md). Same arguments and limits as :func:`conv1d_as_matmul`. Reverse-mode
    differentiation only (``jax.jvp`` through it raises); ``LowRankConv(implementation="conv")``
    is the choice for forward-mode work on CPU.
    """
    _check_conv1d(rhs, lhs_dilation, feature_group_count)
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                  precision=precision)

    def as_matmul(x, w):
        return conv1d_as_matmul(x, w, window_strides, padding, **kwargs)

    @jax.custom_vjp
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, window_strides, padding, **kwargs)

    def conv_fwd(x, w):
        return jax.vjp(as_matmul, x, w)  # (value, vjp function: a pytree of residuals)

    def conv_bwd(vjp, g):
        return vjp(g)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv(lhs, rhs)


# Largest patch (kh * kw * C) whose conv gets its weight gradient as a GEMM on CPU. Measured on 2
# cores (BENCHMARKS.md): NIN's conv1 (5x5x3 = 75) trains 15% faster with it; conv3 (3x3x192) and
# conv2 (5x5x96) slower, as their im2col copies are 9-25x their input.
GEMM_WEIGHT_GRAD_MAX_PATCH = 128


def _explicit_pads(lhs_shape, rhs_shape, strides, padding, dilation):
    if isinstance(padding, str):
        span = [(k - 1) * d + 1 for k, d in zip(rhs_shape[:2], dilation, strict=True)]
        padding = jax.lax.padtype_to_pads(lhs_shape[1:3], span, strides, padding)
    return tuple(tuple(int(v) for v in p) for p in padding)


def _nhwc_conv(lhs, rhs, strides, pads, dilation, precision):
    return jax.lax.conv_general_dilated(lhs, rhs, strides, pads, rhs_dilation=dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


def _im2col(lhs, kernel_hw, strides, pads, dilation, out_hw):
    """``(N, Ho, Wo, kh * kw * C)`` patches, ordered like an HWIO kernel reshaped to 2-D."""
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0))) if any(map(any, pads)) else lhs
    n, c = x.shape[0], x.shape[-1]
    cols = []
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            h0, w0 = i * dilation[0], j * dilation[1]
            limit = (n, h0 + (out_hw[0] - 1) * strides[0] + 1, w0 + (out_hw[1] - 1) * strides[1] + 1, c)
            cols.append(jax.lax.slice(x, (0, h0, w0, 0), limit, (1, *strides, 1)))
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _gemm_grad_conv(lhs, rhs, strides, pads, dilation, precision):
    return _nhwc_conv(lhs, rhs, strides, pads, dilation, precision)


def _gemm_grad_conv_fwd(lhs, rhs, strides, pads, dilation, precision):
    return _nhwc_conv(lhs, rhs, strides, pads, dilation, precision), (lhs, rhs)


def _gemm_grad_conv_bwd(strides, pads, dilation, precision, residuals, g):
    lhs, rhs = residuals
    _, lhs_vjp = jax.vjp(lambda x: _nhwc_conv(x, rhs, strides, pads, dilation, precision), lhs)
    (g_lhs,) = lhs_vjp(g)  # XLA drops this where the input needs no gradient
    cols = _im2col(lhs, rhs.shape[:2], strides, pads, dilation, g.shape[1:3])
    rows = math.prod(g.shape[:-1])
    # A few row blocks summed: XLA:CPU runs the blocked product ~1.4x faster than one long
    # contraction over all rows (2 cores, 131072 x 192 x 160).
    blocks = math.gcd(rows, 4)
    g_rhs = jnp.einsum("bmp,bmo->po", cols.reshape(blocks, rows // blocks, -1),
                       g.reshape(blocks, rows // blocks, -1), precision=precision)
    return g_lhs, g_rhs.reshape(rhs.shape).astype(rhs.dtype)


_gemm_grad_conv.defvjp(_gemm_grad_conv_fwd, _gemm_grad_conv_bwd)


def conv_gemm_weight_grad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None):
    """A drop-in for ``lax.conv_general_dilated`` (NHWC/HWIO) whose kernel gradient is a GEMM.

    The forward pass and the input gradient are XLA's convolutions; the kernel gradient is
    ``im2col(x)^T @ dy`` over shifted strided slices of ``x``. XLA:CPU computes the kernel
    gradient of convs with few input channels (an RGB first layer) several times slower than
    that product; the price is an ``(N, Ho, Wo, kh*kw*C)`` copy of the input in the backward
    pass, so use it for thin patches only (see :func:`thin_conv_general_dilated`). Values and
    gradients equal ``lax.conv_general_dilated``'s up to float rounding. Groups and input
    dilation are not supported. A ``custom_vjp``: reverse-mode differentiation only.
    """
    _check_ungrouped_undilated("conv_gemm_weight_grad", lhs_dilation, feature_group_count)
    if lhs.ndim != 4 or rhs.ndim != 4:
        raise ValueError(f"conv_gemm_weight_grad needs NHWC input and HWIO kernel; got shapes "
                         f"{lhs.shape} and {rhs.shape}")
    if dimension_numbers is not None and not _is_nhwc(lhs, rhs, dimension_numbers):
        raise ValueError(f"conv_gemm_weight_grad needs NHWC/HWIO; got {dimension_numbers}")
    strides = tuple(int(s) for s in window_strides)
    dilation = (1, 1) if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
    pads = _explicit_pads(lhs.shape, rhs.shape, strides, padding, dilation)
    return _gemm_grad_conv(lhs, rhs, strides, pads, dilation, precision)


def thin_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                              precision=None):
    """``lax.conv_general_dilated``, except on CPU for thin-patch convs (``kh * kw * C <=``
    ``GEMM_WEIGHT_GRAD_MAX_PATCH``, no groups, NHWC/HWIO as ``nn.Conv`` passes them), which get
    :func:`conv_gemm_weight_grad`. The choice is made when the function is traced, from
    ``jax.default_backend()``.
    """
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                  precision=precision)
    # like lax, no dimension_numbers means NCHW/OIHW: only explicit NHWC/HWIO (nn.Conv's) qualifies
    thin = (_on_cpu() and dimension_numbers is not None and _is_nhwc(lhs, rhs, dimension_numbers)
            and _ungrouped_undilated(lhs_dilation, feature_group_count)
            and math.prod(rhs.shape[:3]) <= GEMM_WEIGHT_GRAD_MAX_PATCH)
    conv = conv_gemm_weight_grad if thin else jax.lax.conv_general_dilated
    return conv(lhs, rhs, window_strides, padding, **kwargs)


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
      implementation: ``"conv"`` (two ``lax`` convolutions), ``"matmul"``
        (:func:`conv1d_as_matmul`, faster for thin channel counts on CPU; no groups), or
        ``"auto"``: on CPU, without groups and with zero padding,
        :func:`conv1d_matmul_when_differentiated` (lax convolutions for inference, the matmul
        formulation when training), else ``"conv"``. Same variables and outputs in every case.
      conv_general_dilated: the convolution of the ``"conv"`` implementation, as in ``nn.Conv``.
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
    implementation: str = "auto"
    conv_general_dilated: Callable = jax.lax.conv_general_dilated

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
        wraps = isinstance(self.padding, str) and self.padding.upper() in ("CIRCULAR", "REFLECT")
        if self.implementation == "matmul":
            if wraps:
                raise ValueError(f"{self.name}: implementation='matmul' supports zero padding only")
            common["conv_general_dilated"] = conv1d_as_matmul
        elif self.implementation == "auto" and _on_cpu() and groups == 1 and not wraps:
            common["conv_general_dilated"] = conv1d_matmul_when_differentiated
        else:
            common["conv_general_dilated"] = self.conv_general_dilated
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

    On CPU the defaults pick formulations with custom VJPs (fast train steps, reverse-mode only).
    For forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) on CPU, build the factory with
    ``pointwise_as_matmul=False, thin_gemm_weight_grad=False`` and ``"conv"`` implementations.
    """

    ranks: tuple[tuple[str, int], ...] = ()
    mid_norm: Callable[..., nn.Module] | None = None
    implementations: tuple[tuple[str, str], ...] = ()  # per-layer LowRankConv.implementation

    pointwise_as_matmul: bool = True  # 1x1 convs as channel matmuls (much faster on CPU)
    thin_gemm_weight_grad: bool = True  # see thin_conv_general_dilated (CPU only)

    def __call__(self, features: int, kernel_size, *, name: str, **kwargs) -> nn.Module:
        rank = dict(self.ranks).get(name)
        if rank is None:
            pointwise = (tuple(_pair(kernel_size, "kernel_size")) == (1, 1)
                         and kwargs.get("feature_group_count", 1) == 1
                         and kwargs.get("padding", "SAME") in ("SAME", "VALID", 0))
            if self.pointwise_as_matmul and pointwise:
                kwargs = {"conv_general_dilated": conv1d_as_matmul, **kwargs}
            elif self.thin_gemm_weight_grad:
                kwargs = {"conv_general_dilated": thin_conv_general_dilated, **kwargs}
            return nn.Conv(features, kernel_size, name=name, **kwargs)
        impl = dict(self.implementations).get(name, "auto")
        if self.thin_gemm_weight_grad:
            kwargs = {"conv_general_dilated": thin_conv_general_dilated, **kwargs}
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
