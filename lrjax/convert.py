"""Convert a zoo model's full-rank checkpoint to a low-rank one (the authors' ``lowrank_approx.py``).

    python -m lrjax.convert --model vgg16 --checkpoint vgg16.npz --ranks vgg16 \\
        --output lowrank_vgg16.npz

Reads an ``.npz`` or Orbax variables checkpoint of a zoo model, resolves the rank rule, decomposes
in closed form (:func:`lrjax.decompose_linen`), writes the low-rank model's variables (same format
as the output path's suffix) and prints the per-layer table. Any mismatch stops with a message
before anything is written. The result loads into ``models.get_model(family, lowrank=True,
ranks=...)`` (the ranks are in the ``--json`` report).
"""

from __future__ import annotations

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax import checkpoint, models, surgery

__all__ = ["decompose_checkpoint", "parse_fold_bn", "main"]


def parse_fold_bn(text: str | None) -> dict[str, str] | None:
    """``'conv1:bn1,conv3:bn3'`` -> ``{"conv1": "bn1", "conv3": "bn3"}``."""
    if not text:
        return None
    try:
        pairs = dict(item.split(":") for item in text.split(","))
    except ValueError:
        raise ValueError(f"--fold-bn must look like 'conv1:bn1,conv2:bn2'; got {text!r}") from None
    if any(not k or not v for k, v in pairs.items()):
        raise ValueError(f"--fold-bn must look like 'conv1:bn1,conv2:bn2'; got {text!r}")
    return pairs


def decompose_checkpoint(family: str, variables, rule, *, bn: bool = False,
                         image_size: int | None = None, multiple: int | None = None,
                         fold_bn: dict[str, str] | None = None, calibration=None,
                         measure_batch: int = 1,
                         **model_kwargs) -> tuple[nn.Module, surgery.Decomposition]:
    """Check a zoo model's variables and decompose them with a rank rule.

    Shared by ``python -m lrjax.convert`` and the ImageNet workflow.

    Args:
      family: the zoo family (``vgg16``, ``caffenet``, ...).
      variables: the full-rank model's variables.
      rule: a rank rule (:data:`lrjax.surgery.RULE_HELP`).
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
            raise ValueError("--fold-bn needs the BN variant's checkpoint (--bn)")
        variables = surgery.fold_batch_norms(variables, fold_bn)
        full = models.get_model(family, bn=False, **model_kwargs)
    result = surgery.decompose_linen(full, variables, x, rule=rule, multiple=multiple,
                                     calibration=calibration, measure_batch=measure_batch,
                                     train=False)
    return full, result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrjax.convert", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=f"zoo family: {', '.join(models.MODELS)}")
    p.add_argument("--checkpoint", required=True, help="input variables (.npz or Orbax directory)")
    p.add_argument("--ranks", required=True, help=surgery.RULE_HELP)
    p.add_argument("--output", required=True, help="output variables (.npz or Orbax directory)")
    p.add_argument("--bn", action="store_true", help="the checkpoint is of the BN variant")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    p.add_argument("--multiple", type=int, default=None, help="round ranks to multiples of this")
    p.add_argument("--fold-bn", default=None,
                   help="fold batch norms into convs first: 'conv1:bn1,conv3:bn3' (needs --bn)")
    p.add_argument("--json", default=None, help="also write the per-layer report as JSON here")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
    from lrjax import xla_flags

    xla_flags.use_recommended_flags()
    args = build_parser().parse_args(argv)
    try:
        report = convert(args)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"\nwrote {args.output}")
    return 0


def convert(args) -> surgery.SurgeryReport:
    """Run the conversion described by parsed command-line ``args``; returns the report."""
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    variables = checkpoint.load_variables(args.checkpoint)
    _, result = decompose_checkpoint(args.model, variables, args.ranks, bn=args.bn,
                                     image_size=args.image_size, multiple=args.multiple,
                                     fold_bn=parse_fold_bn(args.fold_bn), **kwargs)
    checkpoint.save_variables(args.output, result.variables, overwrite=args.overwrite)
    if args.json:
        checkpoint.write_json(args.json, {"model": args.model, "bn": args.bn and not args.fold_bn,
                                          "ranks": result.ranks, **result.report.as_dict()})
    return result.report


if __name__ == "__main__":
    sys.exit(main())
