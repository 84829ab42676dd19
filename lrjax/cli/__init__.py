"""Command lines: ``python -m lrjax.convert`` (:mod:`lrjax.cli.convert`) and ``python -m
lrjax.export`` (:mod:`lrjax.cli.export`), and what they share.

The library modules these drive never import them. Every CLI here: checks its inputs before any
work, reports a bad input as one ``error:`` line on stderr with exit status 2 (never a
traceback), and writes its outputs atomically.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lrjax import checkpoint

__all__ = ["parse_fold_bn", "run_cli"]


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


def run_cli(main: Callable[[], int]) -> int:
    """Run ``main`` under lrjax's recommended XLA flags; a bad input (``ValueError``,
    ``CheckpointError``) becomes one ``error:`` line and exit status 2."""
    from lrjax import xla_flags

    xla_flags.use_recommended_flags()
    try:
        return main()
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
