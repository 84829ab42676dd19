"""Convert a zoo model's full-rank variables to low-rank ones (the authors' ``lowrank_approx.py``).

:func:`decompose_checkpoint` checks a zoo model's variables, optionally folds batch norms into
their convs, and decomposes it with a rank rule (:func:`lrjax.decompose_linen`). The command line
(``python -m lrjax.convert``) is :mod:`lrjax.cli.convert`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax import models, surgery
from lrjax.report import Decomposition

__all__ = ["decompose_checkpoint"]


def decompose_checkpoint(family: str, variables, rule, *, bn: bool = False,
                         image_size: int | None = None, multiple: int | None = None,
                         fold_bn: dict[str, str] | None = None, calibration=None,
                         measure_batch: int = 1,
                         **model_kwargs) -> tuple[nn.Module, Decomposition]:
    """Check a zoo model's variables and decompose them with a rank rule.

    Shared by ``python -m lrjax.convert`` and the ImageNet workflow.

    Args:
      family: the zoo family (``vgg16``, ``caffenet``, ...).
      variables: the full-rank model's variables.
      rule: a rank rule (:data:`lrjax.rules.RULE_HELP`, or a parsed
        :class:`lrjax.rules.RankRule`).
      bn: the checkpoint is of the BN variant.
      image_size: input size (default: the family's).
      multiple: round ranks to multiples of this.
      fold_bn: ``{conv: bn}`` norms to fold into their convs first (the result is then the
        ``bn=False`` model's).
      calibration: optional calibration batches (see :func:`lrjax.decompose_linen`).
      measure_batch: batch of ``+measured`` timings.
      **model_kwargs: module fields (``num_classes``, ``widths``, ...).

    Returns:
      ``(full_model, Decomposition)``; the full model is the one the variables were checked
      against (after folding).
    """
    spec = models.model_spec(family)
    size = image_size or spec.image_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    full = models.get_model(family, bn=bn, **model_kwargs)
    surgery.check_variables(full, variables, x, train=False)
    if fold_bn:
        if not bn:
            raise ValueError("folding batch norms needs the BN variant's variables (bn=True, --bn)")
        variables = surgery.fold_batch_norms(variables, fold_bn)
        full = models.get_model(family, bn=False, **model_kwargs)
    result = surgery.decompose_linen(full, variables, x, rule=rule, multiple=multiple,
                                     calibration=calibration, measure_batch=measure_batch,
                                     train=False)
    return full, result
