"""CIFAR-10 NIN trained from scratch, full or low-rank: ``python -m experiments.cifar_nin``.

    python -m experiments.cifar_nin --workdir runs/lowrank_nin                  # the paper's run
    python -m experiments.cifar_nin --workdir runs/cmp --config.compare=true     # model + twin
    python -m experiments.cifar_nin --workdir runs/dig --config=experiments/configs/cifar_nin.py:local

See ``experiments/configs/cifar_nin.py`` for every field.
"""

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

from experiments import entry
from lrjax import xla_flags

# lrjax.train (and with it TensorFlow, Orbax) loads once the flags parse: a bad flag is one
# error line in about a second, not after five seconds of imports

_CONFIG = entry.define_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "cifar_nin.py"),
    "Config file (optionally ':local'); override fields with --config.FIELD=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.",
                               required=True)


def run(config, workdir: str) -> list:
    from lrjax import train

    if not config.compare:
        return [train.train_and_evaluate(config, workdir)]
    results = []
    for lowrank in (False, True):  # the full-rank twin first, as in the paper's tables
        sub = config.copy_and_resolve_references()
        sub.lowrank = lowrank
        results.append(train.train_and_evaluate(sub, os.path.join(workdir, train.run_label(sub))))
    if all(r.status == "completed" for r in results):
        train.write_results(workdir, results)
        print(open(os.path.join(workdir, "results.md")).read())
    return results


def main(argv):
    del argv
    xla_flags.use_recommended_flags()
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    logging.getLogger("lrjax").setLevel(logging.INFO)
    from lrjax import checkpoint, train
    from lrjax.data import DataError

    try:
        results = run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, DataError, checkpoint.CheckpointError, train.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for r in results:
        print(f"{r.model}: {r.status}; best test top-1 {100 * r.best_test_top1:.2f}%, final "
              f"{100 * r.final_test_top1:.2f}% ({r.train_seconds:.0f} s)")


if __name__ == "__main__":
    entry.run(main)
