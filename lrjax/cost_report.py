"""Cost reports derived from a model's own module tree.

The convs are found by :func:`lrjax.surgery.find_convs` (a trace under ``jax.eval_shape``: no
compute, no memory), so any linen model works, full rank, a :class:`lrjax.surgery.LowRankModel`,
or one built with :class:`lrjax.layers.LowRankConv`. Layer geometry is never restated by hand:
:func:`zoo_conv_shapes` reads a zoo model's convs off the model itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrjax import costs, models, surgery

__all__ = ["cost_report", "zoo_cost_report", "zoo_conv_shapes", "images"]


def images(batch: int, size: int, channels: int = 3, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    """An abstract NHWC image batch ``(batch, size, size, channels)`` for tracing."""
    return jax.ShapeDtypeStruct((batch, size, size, channels), dtype)


def cost_report(model, *example_args, ranks=None, dense: bool = False,
                **example_kwargs) -> costs.NetCost:
    """Per-layer and total multiply-adds, parameters and theoretical speedup of every 2-D conv
    (the papers' tables), and of every dense layer with ``dense=True``.

    Args:
      model: any linen model.
      *example_args, **example_kwargs: an example call (``images(1, 224), train=False``); batch
        1 gives per-example counts.
      ranks: optional ``{layer path: rank}`` to cost a full-rank model as if decomposed; by
        default the ranks of the model's own pairs.
      dense: count the dense layers too (:data:`lrjax.sites.KINDS`).
    """
    sites = [s for s in surgery.find_convs(model, *example_args, **example_kwargs)
             if dense or s.kind != "dense"]
    if ranks is None:
        ranks = {s.path: s.rank for s in sites if s.rank is not None}
    return costs.net_cost([s.shape for s in sites if s.shape is not None], ranks)


def zoo_cost_report(family: str, *, lowrank: bool = True, **model_kwargs) -> costs.NetCost:
    """:func:`cost_report` of a zoo model (low-rank by default) at its native input size."""
    spec = models.model_spec(family)
    model = models.get_model(family, lowrank=lowrank, **model_kwargs)
    return cost_report(model, images(1, spec.image_size), train=False)


def zoo_conv_shapes(family: str, image_size: int | None = None) -> list[costs.ConvShape]:
    """Geometry of every 2-D conv of a zoo model (``"vgg16"``, ``"caffenet"``, ...) at a square
    input size (default: the family's own), read off the model definition."""
    size = image_size or models.model_spec(family).image_size
    sites = surgery.find_convs(models.get_model(family), images(1, size), train=False)
    return [s.shape for s in sites if s.shape is not None and s.kind != "dense"]
