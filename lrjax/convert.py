"""Convert a full-rank checkpoint to a low-rank one (the authors' ``lowrank_approx.py``).

    python -m lrjax.convert --model vgg16 --checkpoint vgg16.npz --ranks vgg16 \\
        --output lowrank_vgg16.npz

Reads an ``.npz`` or Orbax variables checkpoint of a zoo model, resolves the rank rule, decomposes
in closed form, writes the low-rank model's variables (same format as the output path's suffix)
and prints the per-layer table. Any mismatch stops with a message before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from lrjax import checkpoint, models, surgery


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrjax.convert", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help=f"full-rank zoo model: {', '.join(n for n in models.MODELS if 'lowrank' not in n)}")
    p.add_argument("--checkpoint", required=True, help="input variables (.npz or Orbax directory)")
    p.add_argument("--ranks", required=True, help=surgery.RULE_HELP)
    p.add_argument("--output", required=True, help="output variables (.npz or Orbax directory)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    p.add_argument("--multiple", type=int, default=None, help="round ranks to multiples of this")
    p.add_argument("--fold-bn", default=None,
                   help="fold batch norms into convs: 'conv1:bn1,conv3:bn3'")
    p.add_argument("--json", default=None, help="also write the per-layer report as JSON here")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
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
    name = args.model
    if name.startswith("lowrank_"):
        raise ValueError(f"--model takes the full-rank model; did you mean {name[8:]!r}?")
    spec = models.model_spec(name)
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    size = args.image_size or spec.image_size
    input_shape = (1, size, size, 3)
    full = models.get_model(name, **kwargs)
    variables = checkpoint.load_variables(args.checkpoint)
    surgery.check_variables(full, variables, input_shape)
    ranks = surgery.select_ranks(args.ranks, full, variables, input_shape, multiple=args.multiple)
    fold = None
    if args.fold_bn:
        try:
            fold = dict(item.split(":") for item in args.fold_bn.split(","))
        except ValueError:
            raise ValueError(
                f"--fold-bn must look like 'conv1:bn1,conv2:bn2'; got {args.fold_bn!r}") from None
    lowrank = models.get_model(name, ranks=ranks, **kwargs)
    if fold:
        import dataclasses

        lowrank = dataclasses.replace(lowrank, norm=None)
    new_variables, report = surgery.to_lowrank(variables, lowrank, input_shape, fold_bn=fold)
    checkpoint.save_variables(args.output, new_variables, overwrite=args.overwrite)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "ranks": ranks, **report.as_dict()}, f, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(main())
