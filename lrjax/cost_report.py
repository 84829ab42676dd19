"""Cost reports derived from a model's module tree.

Every ``nn.Conv`` and :class:`~lrjax.layers.LowRankConv` call is intercepted while the model is
traced with ``jax.eval_shape`` (no compute, no memory), which records each conv's input size,
kernel, stride, padding, dilation, groups and (for a pair) rank. Works for any Flax model whose
convs are ``nn.Conv`` or ``LowRankConv``, not only the zoo's.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax import costs
from lrjax.layers import LowRankConv

__all__ = ["ConvLayer", "conv_layers", "cost_report", "zoo_cost_report"]


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One conv of a model: its path in the variable tree, geometry and rank (None: full)."""

    path: tuple[str, ...]
    shape: costs.ConvShape
    rank: int | None


def _pair(v):
    if v is None:
        return (1, 1)
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_layers(model: nn.Module, input_shape, *, train: bool = False) -> list[ConvLayer]:
    """All 2-D convs of ``model`` in call order, for an input of ``input_shape`` (NHWC).

    A ``LowRankConv`` is one layer (with its rank); its inner convs are not listed.
    """
    found: list[ConvLayer] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Conv, LowRankConv)):
            return next_fun(*args, **kwargs)
        if isinstance(module.parent, LowRankConv):
            return next_fun(*args, **kwargs)
        x = args[0]
        if x.ndim != 4:
            raise ValueError(f"conv {module.name!r} got input of shape {x.shape}; "
                             "cost reports cover 2-D convs on NHWC batches")
        name = module.name
        path = tuple(module.scope.path)
        shape = costs.ConvShape(
            name=name, input_hw=tuple(x.shape[1:3]), in_channels=x.shape[-1],
            out_channels=module.features, kernel_size=_pair(module.kernel_size),
            strides=_pair(module.strides), padding=module.padding,
            dilation=_pair(module.kernel_dilation), groups=module.feature_group_count,
            use_bias=module.use_bias)
        found.append(ConvLayer(path, shape, getattr(module, "rank", None)))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)

    def trace(x):
        with nn.intercept_methods(interceptor):
            variables = model.init(jax.random.key(0), x, train=train)
        return variables

    found.clear()
    jax.eval_shape(trace, x)
    names = [layer.shape.name for layer in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # nested models: fall back to full paths as names
        found[:] = [dataclasses.replace(layer, shape=dataclasses.replace(
            layer.shape, name="/".join(layer.path))) for layer in found]
    return list(found)


def cost_report(model: nn.Module, input_shape, ranks=None) -> costs.NetCost:
    """Per-layer and whole-net multiply-adds, parameters and theoretical speedup.

    Args:
      model: any Flax model built from ``nn.Conv`` / ``LowRankConv``.
      input_shape: NHWC input shape; batch 1 gives per-image counts.
      ranks: optional ``{layer: rank}`` to cost a full-rank model as if decomposed; by default the
        ranks are those of the model's own ``LowRankConv`` layers.
    """
    layers = conv_layers(model, input_shape)
    if ranks is None:
        ranks = {layer.shape.name: layer.rank for layer in layers if layer.rank is not None}
    return costs.net_cost([layer.shape for layer in layers], ranks)


def zoo_cost_report(name: str, **model_kwargs) -> costs.NetCost:
    """:func:`cost_report` of a zoo model at its native input size, per image."""
    from lrjax import models

    spec = models.model_spec(name)
    model = models.get_model(name, **model_kwargs)
    return cost_report(model, (1, spec.image_size, spec.image_size, 3))
