"""The 2-D view of a conv that lrjax costs, calibrates and factors (:class:`lrjax.sites.ConvSite`
holds it as a :class:`lrjax.costs.ConvShape`): a 2-D conv is itself, a 1-D conv the ``(k, 1)``
conv of its ``(..., L, 1, C)`` view, a pointwise N-D conv a 1x1 conv over its last two spatial
dims, and any other N-D conv the ``(V, 1)`` conv over a column of its output positions (its taps
on its input counted as XLA counts them), calibrated on its own patches (:func:`nd_patches`);
an N-D transposed conv likewise, on its input dilated by its strides (:func:`transposed_view`).
"""

from __future__ import annotations

import math

import jax

from lrjax import costs

__all__ = ["spatial_dims", "per_dim", "conv_view", "nd_geometry", "vertical_geometry",
           "nd_patches", "transposed_pads", "transposed_view"]


def spatial_dims(kernel_size) -> int:
    """A conv's number of spatial dims from its ``kernel_size`` (an int: 1-D, as Flax reads it)."""
    return 1 if isinstance(kernel_size, int) else len(tuple(kernel_size))


def per_dim(value, n: int) -> tuple:
    """A conv's stride or dilation (an int, ``None`` for 1, or one value per spatial dim) as one
    value for each of its ``n`` spatial dims."""
    value = value or 1
    return (value,) * n if isinstance(value, int) else tuple(value)


def conv_view(kernel_size, strides, padding, dilation, input_shape) -> dict | str:
    """A conv's geometry as the 2-D conv lrjax costs, calibrates and factors: keyword arguments
    of :class:`lrjax.costs.ConvShape` (``input_hw``, ``kernel_size``, ``strides``, ``padding``,
    ``dilation``, ``images``), or why the conv is not split.

    A 2-D conv is itself. A 1-D conv on ``(..., L, C)`` is the ``(k, 1)`` conv on ``(..., L, 1,
    C)`` (``CAUSAL`` padding: a ``VALID`` conv on the input padded by ``(k - 1) * dilation``
    before, as Flax runs it): the paper's closed form at that
    window is a ``k``-wide conv ``C -> K`` then a pointwise one ``K -> N``. A pointwise N-D conv
    (every window and stride 1: a 3-D video net's ``1x1x1``) is a 1x1 conv on its last two spatial
    dims, the others folded into ``images``. Any other N-D conv (a video net's ``3x3x3``, a
    tubelet embedding) splits as the paper splits a 2-D one: a vertical conv over its leading
    dims (``3x3x1``) then a horizontal one over its last (``1x1x3``). It is costed as the 2-D
    conv of window ``(V', k_last)`` (``V'`` the leading window's volume) on a column of its
    ``P'`` leading output positions by its last dim, its taps those that land on its input
    (``view_taps``, as XLA counts the conv), and factored as that 2-D kernel; not split with
    ``CIRCULAR`` padding (the conv runs on a wrapped copy of its input).
    """
    kernel = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    n = len(kernel)
    strides, dilation = per_dim(strides, n), per_dim(dilation, n)
    if n == 2:
        return dict(input_hw=tuple(int(d) for d in input_shape[-3:-1]), kernel_size=kernel,
                    strides=strides, padding=padding, dilation=dilation,
                    images=math.prod(input_shape[:-3]))
    if n == 1:
        length = int(input_shape[-2])
        if isinstance(padding, str):
            if padding.upper() == "CAUSAL":  # Flax pads the input itself, then runs VALID
                length, padding = length + (kernel[0] - 1) * dilation[0], "VALID"
        else:
            pads = [padding] if isinstance(padding, int) else list(padding)
            rows = pads[0] if len(pads) == 1 else tuple(pads)
            padding = (((rows, rows) if isinstance(rows, int) else tuple(rows)), (0, 0))
        return dict(input_hw=(length, 1), kernel_size=(kernel[0], 1),
                    strides=(strides[0], 1), padding=padding, dilation=(dilation[0], 1),
                    images=math.prod(input_shape[:-2]))
    zero = isinstance(padding, str) or all(
        (p == 0) if isinstance(p, int) else tuple(p) == (0, 0)
        for p in ([padding] * n if isinstance(padding, int) else padding))
    if set(kernel) != {1} or set(strides) != {1} or not zero:
        return _windowed_view(kernel, strides, padding, dilation, input_shape)
    return dict(input_hw=tuple(int(d) for d in input_shape[-3:-1]), kernel_size=(1, 1),
                strides=(1, 1), padding="VALID", dilation=(1, 1),
                images=math.prod(input_shape[:-3]))


def nd_geometry(kernel_size, strides, padding, dilation) -> tuple | None:
    """``(window, strides, padding, dilation)`` of an N-D conv (3 or more spatial dims) with a
    window, a stride or padding (padding an int, a string or one pair per dim), as tuples;
    ``None`` for 1-D and 2-D convs and pointwise N-D ones."""
    kernel = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    n = len(kernel)
    if n < 3:
        return None
    strides, dilation = per_dim(strides, n), per_dim(dilation, n)
    if not isinstance(padding, str):
        items = [padding] * n if isinstance(padding, int) else list(padding)
        padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in items)
    zero = isinstance(padding, str) or all(p == (0, 0) for p in padding)
    if set(kernel) == {1} and set(strides) == {1} and zero:
        return None
    return kernel, strides, padding, dilation


def _windowed_view(kernel, strides, padding, dilation, input_shape) -> dict | str:
    """An N-D conv with a window or stride as the 2-D conv lrjax costs (:func:`conv_view`): its
    leading spatial dims as one column of ``P'`` output positions under a ``V'`` window (``V'``
    the leading window's volume), its last dim as the width; ``view_taps`` the taps that land on
    the input along each; or why it is not split."""
    n = len(kernel)
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        return (f"a {n}-D conv with {padding!r} padding (kernel_size {tuple(kernel)}): it runs "
                f"on a padded copy of its input; SAME, VALID and explicit padding are split")
    spatial = [int(d) for d in input_shape[-n - 1:-1]]
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(spatial, extent, strides, padding.upper())
    else:
        pads = nd_geometry(kernel, strides, padding, dilation)[2]
    out = [max((d + lo + hi - e) // s + 1, 0) for d, (lo, hi), e, s in zip(
        spatial, pads, extent, strides, strict=True)]
    taps = [costs.valid_taps(d, k, s, lo, dl, o) for d, k, s, (lo, _), dl, o in zip(
        spatial, kernel, strides, pads, dilation, out, strict=True)]
    positions, volume = max(math.prod(out[:-1]), 1), math.prod(kernel[:-1])
    return dict(input_hw=(positions + volume - 1, spatial[-1]), kernel_size=(volume, kernel[-1]),
                strides=(1, strides[-1]), padding=((0, 0), tuple(pads[-1])),
                dilation=(1, dilation[-1]), images=math.prod(input_shape[:-n - 1]),
                view_taps=(math.prod(taps[:-1]), taps[-1]))


def vertical_geometry(geometry) -> tuple:
    """The ``(window, strides, padding, dilation)`` of the first conv of an N-D conv's pair
    (``geometry``: :func:`nd_geometry`'s): the leading dims' window, strides, padding and
    dilation, the last dim untouched; a pointwise conv's whole (its first conv takes all)."""
    window, strides, padding, dilation = geometry
    if set(window) == {1}:
        return geometry
    rows = padding if isinstance(padding, str) else (*padding[:-1], (0, 0))  # SAME: 0 at 1
    return (*window[:-1], 1), (*strides[:-1], 1), rows, (*dilation[:-1], 1)


def nd_patches(x: jax.Array, window, strides, padding, dilation) -> jax.Array:
    """The input patches of an N-D conv on ``x`` ``(..., *spatial, C)`` as ``(M, 1, 1, C V)``,
    each patch's entries ``(c, window position)``, as :func:`lrjax.moments.patch_moments` orders a
    ``(V, 1)`` conv's (the rows of :func:`lrjax.decompose.kernel_to_matrices`)."""
    n, c = len(window), x.shape[-1]
    x = x.reshape((-1, *x.shape[-n - 1:]))
    channels_last = (0, n + 1, *range(1, n + 1))
    numbers = jax.lax.ConvDimensionNumbers(channels_last, (0, 1, *range(2, n + 2)),
                                           channels_last)
    patches = jax.lax.conv_general_dilated_patches(  # features ordered (C, *window)
        x, window, strides, padding, rhs_dilation=dilation, dimension_numbers=numbers)
    return patches.reshape(-1, 1, 1, c * math.prod(window))


def transposed_pads(window, strides, padding, dilation) -> tuple:
    """Explicit ``(low, high)`` padding, per spatial dim, of the conv an N-D transposed conv runs
    on its input dilated by its strides (``lax.conv_transpose``'s rule for ``SAME`` / ``VALID``,
    per dim: :func:`lrjax.costs.transpose_padding`; explicit pairs as given)."""
    if not isinstance(padding, str):
        items = [padding] * len(window) if isinstance(padding, int) else list(padding)
        return tuple((p, p) if isinstance(p, int) else tuple(int(v) for v in p) for p in items)
    return tuple(costs.transpose_padding(padding, (k, k), (s, s), (d, d))[0]
                 for k, s, d in zip(window, strides, dilation, strict=True))


def transposed_view(kernel_size, strides, padding, dilation, input_shape) -> dict:
    """An N-D transposed conv (3 or more spatial dims: a volumetric U-Net's upsampler) as the 2-D
    transposed conv lrjax costs: keyword arguments of :class:`lrjax.costs.ConvShape` with
    ``transposed=True``. Its pair is a vertical transposed conv over the leading dims (their
    strides, padding and dilation) then a horizontal one over the last (input dilation is
    separable), so it is costed as :func:`conv_view` costs an N-D conv: a column of its ``P'``
    leading output positions under a ``V'`` window by the last dim, the vertical conv at the
    input's width, ``view_taps`` the taps landing on input entries (not on padding or dilation
    holes), as XLA counts them."""
    n = len(kernel_size)
    strides, dilation = per_dim(strides, n), per_dim(dilation, n)
    pads = transposed_pads(kernel_size, strides, padding, dilation)
    spatial = [int(d) for d in input_shape[-n - 1:-1]]
    out = [(d - 1) * s + lo + hi - (k - 1) * dl + 1 for d, s, (lo, hi), k, dl in zip(
        spatial, strides, pads, kernel_size, dilation, strict=True)]
    taps = [costs.valid_taps(d, k, 1, lo, dl, o, s) for d, k, (lo, _), dl, o, s in zip(
        spatial, kernel_size, pads, dilation, out, strides, strict=True)]
    positions, volume = max(math.prod(out[:-1]), 1), math.prod(kernel_size[:-1])
    return dict(input_hw=(positions + volume - 1, spatial[-1]),
                kernel_size=(volume, kernel_size[-1]), strides=(1, strides[-1]),
                padding=((0, 0), tuple(pads[-1])), dilation=(1, dilation[-1]),
                images=math.prod(input_shape[:-n - 1]), transposed=True,
                view_taps=(math.prod(taps[:-1]), taps[-1]))
