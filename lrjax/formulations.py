"""Backend-specific formulations of convolutions and pooling, behind one policy.

Every performance formulation of lrjax lives here; model definitions stay plain. The zoo's convs
pass :func:`conv_general_dilated` to ``nn.Conv`` and pool with :func:`max_pool`; what those compute
is decided when a function is traced, by the *policy*:

``"portable"``
  Plain XLA ops: ``lax.conv_general_dilated`` and ``nn.max_pool``, exactly what ``nn.Conv`` and
  Flax's pooling emit. No ``custom_vjp``/``custom_jvp``: forward-mode differentiation
  (``jax.jvp``, ``jax.jacfwd``) works. The default off CPU.
``"cpu"``
  Formulations XLA:CPU runs faster when a network is trained (values and gradients unchanged, up
  to float rounding; measured in BENCHMARKS.md, ``benchmarks/train_throughput.py --ablate``):

  * 1x1 convs as channel matmuls (:func:`conv1d_as_matmul`) whose kernel gradient transposes the
    thinner operand (:func:`channel_matmul`, a ``custom_vjp``);
  * ``k x 1`` / ``1 x k`` convs (the two halves of a low-rank pair) are XLA convolutions when
    evaluated and the matmul formulation when differentiated
    (:func:`conv1d_matmul_when_differentiated`, a ``custom_vjp``);
  * max pooling differentiates through running maxima of strided slices (a ``custom_jvp``) instead
    of XLA's ``select_and_scatter``.

  These are reverse-mode only where they are ``custom_vjp``: ``jax.jvp`` through a train step
  built under ``"cpu"`` raises; use ``"portable"`` for forward-mode work.
``"auto"`` (default)
  ``"cpu"`` when the computation is traced for the CPU backend (``jax.default_backend()``),
  ``"portable"`` otherwise.

The policy is part of ``jax.jit``'s cache key (a ``jax.make_user_context``), so a jitted function
is re-traced when it changes::

    from lrjax import formulations
    with formulations.policy("portable"):
        jvp = jax.jvp(f, primals, tangents)
    formulations.set_policy("portable")   # process-wide default
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "POLICIES", "policy", "set_policy", "get_policy", "active",
    "conv_general_dilated", "max_pool", "channel_matmul", "conv1d_as_matmul",
    "conv1d_matmul_when_differentiated",
]

POLICIES = ("auto", "cpu", "portable")

_POLICY = jax.make_user_context("auto")


def _check(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"formulation policy must be one of {POLICIES}; got {name!r}")
    return name


def set_policy(name: str) -> None:
    """Set the process-wide policy (``"auto"``, ``"cpu"`` or ``"portable"``)."""
    _POLICY.set_global(_check(name))


def policy(name: str):
    """A context manager that sets the policy for code traced inside it (thread-local)."""
    return _POLICY(_check(name))


def get_policy() -> str:
    """The policy as set (possibly ``"auto"``)."""
    return _POLICY.value


def active() -> str:
    """The policy in force for code being traced now: ``"cpu"`` or ``"portable"``."""
    name = get_policy()
    if name == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "portable"
    return name


# ---------------------------------------------------------------------------------------------
# Channel matmuls


def _einsum_matmul(x, w, precision=None):
    return jnp.einsum("...p,po->...o", x, w, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def channel_matmul(x, w, precision=None):
    """``x @ w`` over the last axis, ``(..., P) x (P, O) -> (..., O)``, with a backward pass that
    XLA:CPU runs on its fast GEMM.

    The kernel gradient contracts the long row axis of two row-major operands; left to itself
    XLA:CPU runs that product on a slow kernel or transposes the larger operand. Here the thinner
    operand is transposed explicitly. Values and gradients are those of ``jnp.einsum``. A
    ``custom_vjp``: reverse-mode differentiation only.
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


# ---------------------------------------------------------------------------------------------
# 1-D convs (k x 1, 1 x k, 1 x 1) as matmuls


def _ungrouped_undilated(lhs_dilation, feature_group_count) -> bool:
    return feature_group_count == 1 and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
    """Whether ``dimension_numbers`` (lax's forms) mean NHWC input / HWIO kernel for 2-D convs.

    Like lax, ``None`` means NCHW/OIHW, so only explicit NHWC/HWIO (what ``nn.Conv`` passes)
    qualifies.
    """
    if dimension_numbers is None or lhs.ndim != 4 or rhs.ndim != 4:
        return False

    def numbers(spec):
        return jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, spec)

    return numbers(dimension_numbers) == numbers(("NHWC", "HWIO", "NHWC"))


def _check_conv1d(rhs, lhs_dilation, feature_group_count):
    if not _ungrouped_undilated(lhs_dilation, feature_group_count):
        raise ValueError(f"conv1d_as_matmul supports feature_group_count=1 and no input "
                         f"dilation; got feature_group_count={feature_group_count}, "
                         f"lhs_dilation={lhs_dilation}")
    if rhs.ndim != 4 or (rhs.shape[0] != 1 and rhs.shape[1] != 1):
        raise ValueError(f"conv1d_as_matmul needs a k x 1 or 1 x k HWIO kernel; got {rhs.shape}")


def conv1d_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` on NHWC/HWIO for a ``k x 1``, ``1 x k`` or ``1 x 1`` kernel,
    written as matrix products over the channel axis plus shifted slices.

    Two orders compute the same thing; the one that shifts the narrower tensor is used: if
    ``K < C`` the channels are contracted first (``x @ [W_0 .. W_{k-1}]``) and the ``k`` shifted
    slices summed; otherwise the ``k`` shifted slices of ``x`` are concatenated and contracted
    once. The products are :func:`channel_matmul` (reverse-mode only). Groups and input dilation
    are not supported.
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
    # the axes with kernel size 1 (both for a 1x1 kernel): only their padding and stride apply.
    # The input rows that reach the output are taken before the product, so that it runs on
    # those only; the output rows that see only padding are zeros, added after it
    out_pads = [(0, 0)] * 4
    for other in (1, 2) if taps == 1 else (3 - axis,):
        if padding[other - 1] != (0, 0) or tuple(window_strides)[other - 1] != 1:
            lhs, out_pads[other] = _rows_reached(lhs, other, padding[other - 1],
                                                 tuple(window_strides)[other - 1])
    if taps == 1:
        return _zero_rows(channel_matmul(lhs, rhs.reshape(c, k_out), precision), out_pads)
    pads = [(0, 0)] * 4
    pads[axis] = padding[axis - 1]
    n_out = (lhs.shape[axis] + sum(pads[axis]) - (taps - 1) * dil - 1) // stride + 1
    w = rhs.reshape(taps, c, k_out)

    def shifted(t, i):
        start = i * dil
        return jax.lax.slice_in_dim(t, start, start + (n_out - 1) * stride + 1, stride, axis=axis)

    if k_out < c:
        y = channel_matmul(lhs, jnp.transpose(w, (1, 0, 2)).reshape(c, taps * k_out), precision)
        y = _zero_rows(y, pads)
        return _zero_rows(sum(shifted(y[..., i * k_out:(i + 1) * k_out], i)
                              for i in range(taps)), out_pads)
    xp = _zero_rows(lhs, pads)
    cols = [shifted(xp, i) for i in range(taps)]
    cols = cols[0] if taps == 1 else jnp.concatenate(cols, axis=-1)
    return _zero_rows(channel_matmul(cols, w.reshape(taps * c, k_out), precision), out_pads)


def _rows_reached(x, axis: int, pad: tuple, stride: int):
    """The input rows along ``axis`` (kernel size 1 there) that output rows read, and the
    ``(before, after)`` counts of output rows that read only padding. Output row ``o`` reads
    input row ``o * stride - pad[0]`` when it lies inside the input (padding may be negative:
    a crop)."""
    size = x.shape[axis]
    n_out = (size + pad[0] + pad[1] - 1) // stride + 1
    first = max(0, -(-pad[0] // stride))  # the first output row inside the input
    last = min(n_out, (size - 1 + pad[0]) // stride + 1)  # one past the last
    if last <= first:  # every output row reads padding
        return jax.lax.slice_in_dim(x, 0, 0, axis=axis), (n_out, 0)
    start = first * stride - pad[0]
    rows = jax.lax.slice_in_dim(x, start, start + (last - first - 1) * stride + 1, stride,
                                axis=axis)
    return rows, (first, n_out - last)


def _zero_rows(y, pads):
    """``y`` with ``pads[axis]`` rows of zeros before / after along each axis (negative: rows
    cropped, as ``lax.conv_general_dilated``'s padding may; by a slice, not a negative
    ``lax.pad``, which XLA's simplifier may fold wrongly into a following window op:
    openxla/xla#48715)."""
    for axis, (lo, hi) in enumerate(pads):
        if lo < 0 or hi < 0:
            y = jax.lax.slice_in_dim(y, max(-lo, 0), y.shape[axis] - max(-hi, 0), axis=axis)
    pads = [(max(int(lo), 0), max(int(hi), 0), 0) for lo, hi in pads]
    if all(p == (0, 0, 0) for p in pads):
        return y
    return jax.lax.pad(y, jnp.zeros((), y.dtype), pads)


def conv1d_matmul_when_differentiated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                      rhs_dilation=None, dimension_numbers=None,
                                      feature_group_count=1, precision=None):
    """XLA's convolution for a value alone; :func:`conv1d_as_matmul` under differentiation.

    A ``custom_vjp`` whose plain evaluation is ``lax.conv_general_dilated`` (the faster forward
    pass for inference on CPU) and whose forward and backward passes, when gradients are taken,
    are those of the matmul formulation (faster train steps on CPU). Same arguments and limits as
    :func:`conv1d_as_matmul`. Reverse-mode differentiation only.
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


def _zero_padding(padding) -> bool:
    if isinstance(padding, str):
        return padding.upper() in ("SAME", "VALID", "SAME_LOWER")
    return True  # explicit (lo, hi) pairs are zero padding


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         preferred_element_type=None, **lax_kwargs):
    """A drop-in for ``lax.conv_general_dilated`` (pass it to ``nn.Conv(conv_general_dilated=)``)
    that computes the formulation the policy picks (see the module docstring).

    Under ``"portable"``, and for any conv the ``"cpu"`` formulations do not cover (groups, input
    dilation, kernels wider than 1 in both axes, layouts other than NHWC/HWIO, a preferred element
    type or an output sharding, as ``nnx.Conv`` may pass), it is ``lax.conv_general_dilated``
    itself.
    """
    lhs, padding = _negative_padding_cropped(lhs, rhs, padding, lhs_dilation, dimension_numbers)
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                  precision=precision)
    lax_kwargs = {k: v for k, v in lax_kwargs.items() if v is not None}
    plain = (active() == "portable" or preferred_element_type is not None or lax_kwargs
             or not _is_nhwc(lhs, rhs, dimension_numbers)
             or not _ungrouped_undilated(lhs_dilation, feature_group_count)
             or not _zero_padding(padding) or min(rhs.shape[:2]) != 1)
    if plain:
        if preferred_element_type is not None:
            kwargs["preferred_element_type"] = preferred_element_type
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs,
                                            **lax_kwargs)
    if rhs.shape[:2] == (1, 1):
        return _pointwise(lhs, rhs, window_strides, padding, **kwargs)
    return _pair_half(lhs, rhs, window_strides, padding, **kwargs)


def _negative_padding_cropped(lhs, rhs, padding, lhs_dilation, dimension_numbers):
    """``(lhs, padding)`` with negative padding (a crop) taken off the input by a slice: XLA:CPU
    computes some convs with negative padding wrong (a 3x1 kernel, padding ((-1, 1), (0, 0)),
    JAX 0.10.2: inf and garbage from outside the input, openxla/xla#48713; the same conv on the
    cropped input is right). Padding as it is when it is a string, non-negative, or the input is dilated."""
    if isinstance(padding, str) or all(lo >= 0 and hi >= 0 for lo, hi in padding) or (
            lhs_dilation is not None and any(d != 1 for d in lhs_dilation)):
        return lhs, padding
    spec = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers).lhs_spec
    for axis, (lo, hi) in zip(spec[2:], padding, strict=True):
        lhs = jax.lax.slice_in_dim(lhs, max(-lo, 0), lhs.shape[axis] - max(-hi, 0), axis=axis)
    return lhs, [(max(lo, 0), max(hi, 0)) for lo, hi in padding]


# What conv_general_dilated runs under "cpu" for 1x1 convs and for the halves of a pair (module
# names, so that benchmarks/train_throughput.py --ablate can swap each for the XLA op).
_pointwise = conv1d_as_matmul
_pair_half = conv1d_matmul_when_differentiated


# ---------------------------------------------------------------------------------------------
# Max pooling


def _pool_padding(x, window_shape, strides, padding):
    n = len(window_shape)
    if len(strides) != n or x.ndim < n + 1:
        raise ValueError(f"max_pool: window {window_shape} and strides {strides} need as many "
                         f"spatial axes, before a channel axis; got input shape {x.shape}")
    spatial = x.shape[x.ndim - 1 - n:-1]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(spatial, window_shape, strides, padding)
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    if len(padding) != n:
        raise ValueError(f"max_pool: padding {padding} must give (lo, hi) for {n} spatial axes")
    for k, s, size, (lo, hi) in zip(window_shape, strides, spatial, padding, strict=True):
        if not 1 <= k <= size + lo + hi or s < 1:
            raise ValueError(f"max_pool: window {window_shape} / strides {strides} do not fit "
                             f"input shape {x.shape} with padding {padding}")
    return padding


def _slice_maxima(x, window_shape, strides, padding):
    n = len(window_shape)
    if any(any(p) for p in padding):
        low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1 - n) + list(padding) + [(0, 0)],
                    constant_values=low)
    for i, (k, s) in enumerate(zip(window_shape, strides, strict=True)):
        axis = x.ndim - 1 - n + i
        count = (x.shape[axis] - k) // s + 1
        taps = [jax.lax.slice_in_dim(x, j, j + (count - 1) * s + 1, s, axis=axis)
                for j in range(k)]
        x = functools.reduce(jnp.maximum, taps)
    return x


def max_pool(x, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding="VALID"):
    """Max pooling over the spatial axes of ``(..., *spatial, C)``: ``nn.max_pool``'s values.

    Under ``"portable"`` it is ``nn.max_pool``. Under ``"cpu"`` a plain evaluation is still
    ``nn.max_pool`` (XLA's reduce-window, which XLA:CPU fuses well for inference), while
    differentiation (a ``custom_jvp``: forward and reverse mode both work) goes through running
    maxima of strided slices, one spatial axis at a time, whose gradient is made of elementwise
    selects; XLA:CPU expands the ``select_and_scatter`` gradient of a reduce-window into an
    index-tracking reduce-window plus a scatter. Where inputs of a window tie for the maximum, that
    gradient is shared among them (``nn.max_pool`` gives it to the first); both are subgradients.

    Args:
      x: ``(..., *spatial, C)`` with ``len(window_shape)`` spatial axes.
      window_shape: window size per spatial axis.
      strides: stride per spatial axis (default 1).
      padding: ``"VALID"``, ``"SAME"`` or ``((lo, hi), ...)`` per spatial axis; padded cells are
        ``-inf`` so they never win.
    """
    window_shape = tuple(window_shape)
    strides = (1,) * len(window_shape) if strides is None else tuple(strides)
    pads = _pool_padding(x, window_shape, strides, padding)
    if active() == "portable":
        return nn.max_pool(x, window_shape, strides, pads)

    @jax.custom_jvp
    def pool(x):
        return nn.max_pool(x, window_shape, strides, pads)

    @pool.defjvp
    def pool_jvp(primals, tangents):  # forward and reverse mode both go through the slices
        return jax.jvp(lambda x: _slice_maxima(x, window_shape, strides, pads), primals, tangents)

    return pool(x)
