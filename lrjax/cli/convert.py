"""``python -m lrjax.convert``: a zoo model's full-rank checkpoint to a low-rank one (the authors'
``lowrank_approx.py``).

    python -m lrjax.convert --model vgg16 --checkpoint vgg16.npz --ranks vgg16 \\
        --output lowrank_vgg16.npz

Reads an ``.npz`` or Orbax variables checkpoint of a zoo model, resolves the rank rule, decomposes
in closed form (:func:`lrjax.convert.decompose_checkpoint`), writes the low-rank model's variables
(same format as the output path's suffix) and prints the per-layer table. Any mismatch stops with
a message before anything is written. The result loads into ``models.get_model(family,
lowrank=True, ranks=...)`` (the ranks are in the ``--json`` report).
"""

from __future__ import annotations

import argparse
import os

from lrjax import checkpoint, models, rules
from lrjax.cli import parse_fold_bn, run_cli
from lrjax.convert import decompose_checkpoint
from lrjax.report import SurgeryReport

__all__ = ["build_parser", "convert", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrjax.convert",
                                description=__doc__.split("\n")[0].strip('`" '))
    p.add_argument("--model", required=True, help=f"zoo family: {', '.join(models.MODELS)}")
    p.add_argument("--checkpoint", required=True, help="input variables (.npz or Orbax directory)")
    p.add_argument("--ranks", required=True, help=rules.RULE_HELP)
    p.add_argument("--output", required=True,
                   help="output variables: a .npz file, or an Orbax folder (a name without a "
                        "suffix); its folder must exist")
    p.add_argument("--bn", action="store_true", help="the checkpoint is of the BN variant")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the checkpoint's classifier (default: the model's own)")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    p.add_argument("--multiple", type=int, default=None, help="round ranks to multiples of this")
    p.add_argument("--fold-bn", default=None,
                   help="fold batch norms into convs first: 'conv1:bn1,conv3:bn3' (needs --bn)")
    p.add_argument("--json", default=None, help="also write the per-layer report as JSON here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output / --json, only if it is a checkpoint / "
                        "report of the same kind (never an ordinary folder or foreign file); "
                        "the replacement is atomic")
    return p


def convert(args) -> SurgeryReport:
    """Run the conversion described by parsed command-line ``args``; returns the report."""
    rule = rules.parse_rule(args.ranks, multiple=args.multiple)
    fold = parse_fold_bn(args.fold_bn)
    models.model_spec(args.model)
    checkpoint.check_output(args.output, checkpoint.variables_format(args.output),
                            overwrite=args.overwrite, flag="--overwrite")
    if args.json:
        checkpoint.check_output(args.json, "json", overwrite=args.overwrite, flag="--overwrite")
    if not (os.path.isfile(args.checkpoint) or os.path.isdir(args.checkpoint)):
        raise checkpoint.CheckpointError(f"checkpoint {args.checkpoint!r} does not exist")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    variables = checkpoint.load_variables(args.checkpoint)
    _, result = decompose_checkpoint(args.model, variables, rule, bn=args.bn,
                                     image_size=args.image_size, fold_bn=fold, **kwargs)
    checkpoint.save_variables(args.output, result.variables, overwrite=args.overwrite,
                              flag="--overwrite")
    if args.json:
        checkpoint.write_json(args.json, {"model": args.model, "bn": args.bn and not args.fold_bn,
                                          "ranks": result.ranks, **result.report.as_dict()})
    return result.report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        report = convert(args)
        print(report.table())
        print(f"\nwrote {args.output}")
        return 0

    return run_cli(run)
