"""``python -m lrjax.export``: a zoo model, decomposed on the way if asked, to ONNX, LiteRT or
StableHLO, checked against JAX before it is written (:mod:`lrjax.export`).

    python -m lrjax.export --model vgg16 --ranks vgg16 --format onnx --output lowrank_vgg16.onnx
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import numpy as np

from lrjax import checkpoint, models, rules, surgery
from lrjax.cli import parse_fold_bn, run_cli
from lrjax.convert import decompose_checkpoint
from lrjax.export import EXPORTERS, FORMATS, ExportError, ExportResult
from lrjax.report import Decomposition
from lrjax.runtimes import release_memory

__all__ = ["build_parser", "export_zoo", "main", "DEFAULT_MULTIPLE", "MEASURED_RUNTIME"]

# ONNX Runtime's NCHWc conv kernels pad channels to blocks of 8 (AVX2) or 16 (AVX-512); ranks
# rounded to 8 measured as fast as the unrounded ones in every runtime, at a lower error and
# without extra MACs on AVX2 (BENCHMARKS.md, "ranks that suit the runtime").
DEFAULT_MULTIPLE = 8
# where a '+measured' rank rule times the layers, per export format
MEASURED_RUNTIME = {"onnx": "onnxruntime", "tflite": "litert", "stablehlo": "jax"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrjax.export",
                                description=__doc__.split("\n")[0].strip('`" '))
    p.add_argument("--model", required=True, help=f"zoo family: {', '.join(models.MODELS)}")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (ONNX Runtime), tflite (LiteRT) or stablehlo (jax.export)")
    p.add_argument("--output", required=True,
                   help="the file to write: .onnx, .tflite, or .shlo / .stablehlo for "
                        "--format stablehlo; its folder must exist")
    p.add_argument("--checkpoint", default=None,
                   help="full-rank variables (.npz / Orbax); default: random weights")
    p.add_argument("--ranks", default=None,
                   help="decompose on the way with this rank rule: " + rules.RULE_HELP)
    p.add_argument("--multiple", type=int, default=DEFAULT_MULTIPLE,
                   help="round ranks to multiples of this, for the runtimes' blocked conv "
                        f"kernels (default {DEFAULT_MULTIPLE}; 1: no rounding)")
    p.add_argument("--bn", action="store_true", help="the checkpoint is of the BN variant")
    p.add_argument("--fold-bn", default=None, help="fold batch norms first: 'conv1:bn1,...'")
    p.add_argument("--batch", type=int, default=1, help="batch of the check (and of a TFLite "
                                                       "model; ONNX/StableHLO batches are free)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input height and width (default: the model's own)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the classifier (default: the model's own)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output, only if it is an export of the same "
                        "format (never a folder or a foreign file); the replacement is atomic")
    return p


def _rounding_line(result: Decomposition, rule: rules.RankRule) -> str:
    """What rounding the ranks to ``rule.multiple`` costs over the layers the rule split: mean
    kernel error and whole-net theoretical speedup against the same rule unrounded and ungated,
    read off the decomposition's cached spectra (no second decomposition)."""
    problem = result.problem
    split = set(result.ranks)
    unrounded = rules.select_ranks(rule.base(), dataclasses.replace(problem, multiple=None))
    errors = [problem.spectral_error(p, unrounded[p]) for p in split]
    speedup = problem.full_macs / problem.macs_after({p: unrounded[p] for p in split})
    rounded_error = np.mean([result.report.errors[p] for p in split])
    return (f"ranks rounded to multiples of {rule.multiple}: mean relative kernel error "
            f"{rounded_error:.4f} (unrounded {np.mean(errors):.4f}); theoretical speedup "
            f"{result.report.speedup:.2f}x (unrounded {speedup:.2f}x)")


def export_zoo(args) -> tuple[ExportResult, str]:
    """Run the export described by parsed command-line ``args``; returns the result and a report
    of what was decomposed (empty without ``--ranks``)."""
    spec = models.model_spec(args.model)
    size = args.image_size or spec.image_size
    if args.batch < 1:
        raise ExportError(f"--batch must be positive; got {args.batch}")
    path = checkpoint.check_output(args.output, args.format, overwrite=args.overwrite,
                                   flag="--overwrite")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise checkpoint.CheckpointError(f"checkpoint {args.checkpoint!r} does not exist")
    fold = parse_fold_bn(args.fold_bn)
    rule = None
    if args.ranks:  # '+measured' times the layers where the export will run
        rule = rules.parse_rule(args.ranks, multiple=args.multiple)
        rule = rule.with_runtime(MEASURED_RUNTIME[args.format])
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    full = models.get_model(args.model, bn=args.bn, **kwargs)
    variables = (checkpoint.load_variables(args.checkpoint) if args.checkpoint
                 else models.init_variables(full, size))
    module, report = full, ""
    if rule is not None:
        _, result = decompose_checkpoint(args.model, variables, rule, bn=args.bn,
                                         image_size=size, fold_bn=fold,
                                         measure_batch=args.batch, **kwargs)
        report = result.report.table()
        if rule.multiple and result.ranks:  # a gate may have kept every layer full
            report += "\n" + _rounding_line(result, rule)
        module, variables = result.module, result.variables
        del result  # its rank problem holds the full-rank weights: free them before exporting
        release_memory()
    else:
        surgery.check_variables(full, variables, jax.ShapeDtypeStruct((1, size, size, 3),
                                                                      np.float32), train=False)
        if fold:
            variables = surgery.fold_batch_norms(variables, fold)
            module = models.get_model(args.model, bn=False, **kwargs)
    x = np.zeros((args.batch, size, size, 3), np.float32)
    return EXPORTERS[args.format](module, variables, x, path, train=False), report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        result, report = export_zoo(args)
        if report:
            print(report)
        print(f"wrote {result.path} ({result.format}, {result.size_bytes:,} bytes); checked on "
              f"batches {list(result.checked_batches)}: max |difference| "
              f"{result.max_abs_error:.2e} (outputs up to {result.scale:.2e})")
        return 0

    return run_cli(run)
