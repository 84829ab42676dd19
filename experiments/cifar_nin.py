"""CIFAR-10 NIN trained from scratch, full or low-rank: ``python -m experiments.cifar_nin``.

    python -m experiments.cifar_nin --workdir runs/lowrank_nin                  # the paper's run
    python -m experiments.cifar_nin --workdir runs/cmp --config.compare=true     # model + twin
    python -m experiments.cifar_nin --workdir runs/dig --config=experiments/configs/cifar_nin.py:local

See ``experiments/configs/cifar_nin.py`` for every field.
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lrjax import checkpoint, train
from lrjax.data import DataError

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "cifar_nin.py"),
    "Config file (optionally ':local'); override fields with --config.FIELD=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.",
                               required=True)


def twin(model: str) -> str:
    """The full-rank twin of a low-rank model, and vice versa."""
    return model[len("lowrank_"):] if model.startswith("lowrank_") else "lowrank_" + model


def run(config, workdir: str) -> list:
    if not config.compare:
        return [train.train_and_evaluate(config, workdir)]
    results = []
    for name in (twin(config.model), config.model) if config.model.startswith("lowrank_") \
            else (config.model, twin(config.model)):
        sub = config.copy_and_resolve_references()
        sub.model = name
        results.append(train.train_and_evaluate(sub, os.path.join(workdir, name)))
    if all(r.status == "completed" for r in results):
        train.write_results(workdir, results)
        print(open(os.path.join(workdir, "results.md")).read())
    return results


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    logging.getLogger("lrjax").setLevel(logging.INFO)
    try:
        results = run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, DataError, checkpoint.CheckpointError, train.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for r in results:
        print(f"{r.model}: {r.status}; best test top-1 {100 * r.best_test_top1:.2f}%, final "
              f"{100 * r.final_test_top1:.2f}% ({r.train_seconds:.0f} s)")


if __name__ == "__main__":
    app.run(main)
