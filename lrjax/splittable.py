"""Which Flax layers can be split into a pair, and why not (``conv_skip_reason``,
``transposed_skip_reason``, ``dense_skip_reason``: one line each, shown in the report); the sites
(:class:`lrjax.sites.ConvSite`) of transposed convs and of convs written with ``input_dilation``
(a transposed conv as a conv), whose geometry is the transposed conv's. Linen and NNX layers
share the attribute names read here. Re-exported by :mod:`lrjax.layers`."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from lrjax import sites
from lrjax.conv_views import conv_view, nd_geometry, per_dim, spatial_dims, transposed_pads, transposed_view
from lrjax.costs import ConvShape, as_pair, explicit_padding
from lrjax.sites import ConvSite, computes_as, subclass_reason

__all__ = ["conv_skip_reason", "transposed_skip_reason", "dense_skip_reason", "transposed_site",
           "dilated_conv_site", "input_dilated", "conv_shape", "linen_site"]


def transposed_skip_reason(conv, base_type=nn.ConvTranspose) -> str | None:
    """Why a transposed conv (``nn.ConvTranspose`` or ``nnx.ConvTranspose``) cannot be split
    into a pair, or None."""
    size = conv.kernel_size
    kernel = (size,) if isinstance(size, int) else tuple(size)
    if len(kernel) > 2 and set(kernel) == {1}:
        return f"a pointwise {len(kernel)}-D transposed conv (kernel_size {size})"
    if computes_as(conv, (base_type,)) is None:
        return subclass_reason(conv, base_type)
    if conv.mask is not None:
        return "masked kernel"
    if isinstance(conv.padding, str) and conv.padding.upper() not in ("SAME", "VALID"):
        return f"{conv.padding} padding of a transposed conv (wraps its output; not split)"
    if getattr(conv, "preferred_element_type", None) is not None:
        return "a preferred_element_type: its own computation is kept"
    return None


def transposed_site(path: str, conv, input_shape, base_type=nn.ConvTranspose) -> ConvSite:
    """The site of a transposed conv (``nn.ConvTranspose``, or ``nnx.ConvTranspose`` with
    ``base_type``) called on an input of ``input_shape`` ``(..., H, W, C)``: its geometry as
    ``ConvShape(transposed=True)`` with the layer's own strides and padding (explicit padding as
    ``((top, bottom), (left, right))``; ``CIRCULAR``: the ``VALID`` conv it runs, not split). A
    1-D one (an audio U-Net's or a vocoder's upsampler, on ``(..., L, C)``) is the ``(k, 1)``
    transposed conv of its input as ``(..., L, 1, C)`` (``conv_dims=1``); an N-D one (a
    volumetric U-Net's) the 2-D view of :func:`lrjax.conv_views.transposed_view` (``shape=None``
    when it is not split)."""
    reason = transposed_skip_reason(conv, base_type)
    size = conv.kernel_size
    kernel = (size,) if isinstance(size, int) else tuple(size)
    if len(kernel) > 2:  # a volumetric U-Net's upsampler: the 2-D view of conv_views
        return _volumetric_site(path, conv, input_shape, conv.strides, reason)
    if len(kernel) == 1:
        shape = _transposed_shape(path, conv, (*input_shape[:-1], 1, input_shape[-1]),
                                  _with_unit(conv.strides), (*kernel, 1))
        return ConvSite(path, shape, skip=reason, conv_dims=1,
                        transpose_kernel=bool(conv.transpose_kernel))
    shape = _transposed_shape(path, conv, input_shape, conv.strides)
    return ConvSite(path, shape, skip=reason, transpose_kernel=bool(conv.transpose_kernel))


def _volumetric_site(path: str, conv, input_shape, strides, reason) -> ConvSite:
    """The site of an N-D transposed conv (or an input-dilated N-D conv, ``strides`` its input
    dilation) on ``input_shape``: :func:`lrjax.conv_views.transposed_view`'s geometry."""
    kernel, n = tuple(conv.kernel_size), len(conv.kernel_size)
    if reason is not None:
        return ConvSite(path, None, skip=reason, conv_dims=n)
    strides, dilation = per_dim(strides, n), per_dim(conv.kernel_dilation, n)
    features = conv.out_features if hasattr(conv, "out_features") else conv.features
    shape = ConvShape(name=path, in_channels=int(input_shape[-1]), out_channels=int(features),
                      use_bias=bool(conv.use_bias), **transposed_view(
                          kernel, strides, conv.padding, dilation, input_shape))
    return ConvSite(path, shape, conv_dims=n, nd_geometry=(
        kernel, strides, transposed_pads(kernel, strides, conv.padding, dilation), dilation),
        transpose_kernel=bool(getattr(conv, "transpose_kernel", False)))


def _with_unit(value):
    """A 1-D conv's stride (or dilation: an int, a 1-tuple, or None) with a unit second axis."""
    value = 1 if value is None else value
    return ((value,) if isinstance(value, int) else tuple(value)) + (1,)


def _transposed_shape(path: str, conv, input_shape, strides, kernel=None) -> ConvShape:
    """``ConvShape(transposed=True)`` of a 2-D conv on its input dilated by ``strides``
    (``kernel``: a 1-D conv's ``(k, 1)`` view)."""
    one_d = kernel is not None
    kernel = kernel or tuple(conv.kernel_size)
    padding = conv.padding
    if one_d and not isinstance(padding, str):  # an int, (p,) or ((lo, hi),): the rows'
        rows = padding if isinstance(padding, int) else tuple(padding)[0]
        padding = ((rows, rows) if isinstance(rows, int) else tuple(int(p) for p in rows),
                   (0, 0))
    elif not isinstance(padding, str):
        padding = explicit_padding(padding, (1, 1), kernel)
    if isinstance(padding, str) and padding.upper() == "CIRCULAR":
        padding = "VALID"  # the conv it runs (Flax wraps the VALID output; not split)
    features = conv.out_features if hasattr(conv, "out_features") else conv.features
    return ConvShape(
        name=path, input_hw=tuple(int(d) for d in input_shape[-3:-1]),
        in_channels=int(input_shape[-1]), out_channels=int(features), kernel_size=kernel,
        strides=as_pair(strides), padding=padding,
        dilation=_with_unit(conv.kernel_dilation) if one_d else as_pair(conv.kernel_dilation),
        use_bias=bool(conv.use_bias), transposed=True, images=math.prod(input_shape[:-3]))


def input_dilated(conv) -> bool:
    """Whether a conv (``nn.Conv`` / ``nnx.Conv``) runs on its input dilated by
    ``input_dilation``: a transposed conv written as a conv (JAX requires explicit padding for
    it). With stride 1 and one feature group it is ``nn.ConvTranspose(strides=input_dilation,
    padding=padding)`` with the same kernel, and is split as one (:func:`dilated_conv_site`)."""
    dilation = conv.input_dilation or 1
    return any(d != 1 for d in ((dilation,) if isinstance(dilation, int) else dilation))


def dilated_conv_site(path: str, conv, input_shape, base_type=nn.Conv) -> ConvSite:
    """The site of an input-dilated conv (:func:`input_dilated`) called on ``input_shape``
    ``(..., H, W, C)``: a transposed conv's (``kind == "transposed"``), strides the input
    dilation, padding the conv's explicit ``((top, bottom), (left, right))``."""
    if spatial_dims(conv.kernel_size) > 2:
        return _volumetric_site(path, conv, input_shape, conv.input_dilation,
                                conv_skip_reason(conv, base_type))
    if spatial_dims(conv.kernel_size) == 1:  # (a vocoder's upsampler written as a conv)
        shape = _transposed_shape(path, conv, (*input_shape[:-1], 1, input_shape[-1]),
                                  _with_unit(conv.input_dilation), (*per_dim(conv.kernel_size, 1), 1))
        return ConvSite(path, shape, skip=conv_skip_reason(conv, base_type), conv_dims=1)
    return ConvSite(path, _transposed_shape(path, conv, input_shape, conv.input_dilation),
                    skip=conv_skip_reason(conv, base_type))


def conv_skip_reason(conv, base_type=nn.Conv) -> str | None:
    """Why a conv (``nn.Conv`` or ``nnx.Conv``: same attribute names) cannot be split into a
    pair, or None. ``base_type``: the type decomposed (with its subclasses that compute as it
    does, :func:`computes_as`)."""
    size = conv.kernel_size
    kernel = (size,) if isinstance(size, int) else tuple(size)
    if len(kernel) > 2:
        view = conv_view(kernel, conv.strides, conv.padding, 1, (1,) * (len(kernel) + 2))
        if isinstance(view, str):
            return view
    if computes_as(conv, (base_type,)) is None:
        return subclass_reason(conv, base_type)
    if input_dilated(conv):
        if isinstance(conv.padding, str):
            return f"input dilation {conv.input_dilation} with {conv.padding!r} padding"
        if any(s != 1 for s in ((conv.strides,) if isinstance(conv.strides, int) else
                                conv.strides or (1,))):
            return f"input dilation {conv.input_dilation} with strides {conv.strides}"
        if conv.feature_group_count != 1:
            return (f"input dilation {conv.input_dilation} with "
                    f"feature_group_count={conv.feature_group_count}")
    if conv.mask is not None:
        return "masked kernel"
    if isinstance(conv.padding, str) and conv.padding.upper() == "CAUSAL" and len(kernel) != 1:
        return "causal padding"
    return None


def dense_skip_reason(layer, base_types=(nn.Dense, nn.DenseGeneral, nn.Einsum)) -> str | None:
    """Why a dense layer (``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum``,
    ``nnx.Linear``/``nnx.LinearGeneral``) cannot be split into a pair, or None (an einsum's
    equation is checked by :func:`lrjax.sites.einsum_split`). ``base_types``: the types
    decomposed (with their subclasses that compute as they do, :func:`computes_as`; other
    subclasses and layers with their own matrix product, e.g. quantized ones, keep their
    computation)."""
    if computes_as(layer, base_types) is None:
        return subclass_reason(layer, next((b for b in base_types if isinstance(layer, b)),
                                           base_types[0]))
    if getattr(layer, "dot_general_cls", None) is not None or \
            getattr(layer, "dot_general", None) not in (None, jax.lax.dot_general):
        return "a custom dot_general (e.g. quantized): its own computation is kept"
    batch_dims = getattr(layer, "batch_dims", ())
    if batch_dims:  # (one is split as the einsum it is, lrjax.linen_cells, in a one-input call)
        return "more than one batch dim: one kernel per index of several axes" if \
            isinstance(batch_dims, (tuple, list)) and len(batch_dims) > 1 else \
            "a batch dim, in a call of more than its input: one kernel per batch index"
    if len(getattr(layer, "batch_axis", None) or ()) > 1:  # (one: split as its einsum)
        return "more than one batch axis (NNX): one kernel per index of several axes"
    return None


def conv_shape(path: str, module, x) -> ConvShape:
    """The 2-D view (:func:`lrjax.conv_views.conv_view`) of a linen conv called on ``x``."""
    view = conv_view(module.kernel_size, module.strides, module.padding,
                     module.kernel_dilation, x.shape)
    return ConvShape(name=path, in_channels=int(x.shape[-1]), out_channels=int(module.features),
                     groups=int(module.feature_group_count), use_bias=bool(module.use_bias),
                     **view)


def _einsum_site(path: str, module, x, equation) -> ConvSite:
    """The site of an ``nn.Einsum`` called on ``x``."""
    reason = dense_skip_reason(module)
    equation = equation or module.einsum_str
    split = sites.einsum_split(equation)
    if reason is not None or isinstance(split, str):
        return ConvSite(path, None, skip=reason or split)
    return sites.einsum_site(path, x.shape, split, module.shape, bool(module.use_bias),
                             equation=equation.replace(" ", ""))


def _dense_site(path: str, module, x) -> ConvSite:
    """The site of an ``nn.Dense`` / ``nn.DenseGeneral`` called on ``x``."""
    reason = dense_skip_reason(module)
    if reason is not None:
        return ConvSite(path, None, skip=reason)
    in_dims = tuple(int(x.shape[a]) for a in sites.contracted_axes(module))
    features = module.features
    out_dims = (int(features),) if isinstance(features, int) else tuple(int(f) for f in features)
    shape = sites.dense_shape(path, x.shape, in_dims, out_dims, bool(module.use_bias))
    return ConvSite(path, shape, dense_dims=(in_dims, out_dims))


def linen_site(path: str, module, x, equation=None) -> ConvSite:
    """The site of a linen ``nn.Conv`` / ``nn.ConvTranspose`` / ``nn.Dense`` /
    ``nn.DenseGeneral`` / ``nn.Einsum`` called on ``x`` (``equation``: an einsum's as called),
    with the reason when it cannot be split."""
    if isinstance(module, nn.Einsum):
        return _einsum_site(path, module, x, equation)
    if isinstance(module, nn.ConvTranspose):
        return transposed_site(path, module, x.shape, nn.ConvTranspose)
    if isinstance(module, (nn.Dense, nn.DenseGeneral)):
        return _dense_site(path, module, x)
    reason = conv_skip_reason(module)
    if reason is None and input_dilated(module):
        return dilated_conv_site(path, module, x.shape)
    dims = spatial_dims(module.kernel_size)
    shape = conv_shape(path, module, x) if reason is None or dims == 2 else None
    return ConvSite(path, shape, skip=reason, conv_dims=dims, nd_geometry=nd_geometry(
        module.kernel_size, module.strides, module.padding, module.kernel_dilation))
