"""ImageNet VGG-16: import pretrained weights, decompose, fine-tune, measure.

    python -m experiments.imagenet_vgg --workdir runs/vgg --config.weights=vgg16-397923af.pth
    python -m experiments.imagenet_vgg --workdir runs/vgg --config.stages=decompose,time
    python -m experiments.imagenet_vgg --workdir runs/cn \\
        --config=experiments/configs/imagenet_vgg.py:scratch

See ``experiments/configs/imagenet_vgg.py`` for every field and ``experiments/imagenet_workflow.py``
for the stages.
"""

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

from experiments import entry
from lrjax import xla_flags

# the workflow (and with it TensorFlow, Orbax) loads once the flags parse: a bad flag is one
# error line in about a second

_CONFIG = entry.define_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "imagenet_vgg.py"),
    "Config file (optionally ':scratch'); override fields with --config.FIELD=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all stage outputs.", required=True)


def main(argv):
    del argv
    xla_flags.use_recommended_flags()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("lrjax").setLevel(logging.INFO)
    from experiments import imagenet_workflow
    from lrjax import checkpoint, train
    from lrjax.data import DataError

    try:
        imagenet_workflow.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, DataError, checkpoint.CheckpointError, train.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    entry.run(main)
