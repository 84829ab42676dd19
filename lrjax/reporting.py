"""Reporting of training runs: the result record, the progress bar, TensorBoard scalars and the
``results.json`` / ``results.md`` / ``curves.png`` files (each written atomically)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax

from lrjax import checkpoint

__all__ = ["RunResult", "progress_bar", "SummaryWriter", "write_results"]

log = logging.getLogger("lrjax.train")


@dataclasses.dataclass
class RunResult:
    """What :func:`train_and_evaluate` returns and writes to ``results.json``."""

    model: str
    params: int
    macs: int
    full_macs: int
    theoretical_speedup: float
    best_test_top1: float
    final_test_top1: float
    train_seconds: float
    history: list
    status: str  # "completed" or "preempted"
    state: Any = dataclasses.field(default=None, repr=False)

    def as_dict(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "state"}


def progress_bar(config, label: str, start_epoch: int, position: int, steps_per_epoch: int):
    """A tqdm bar counting images (or a stand-in that logs, when ``config.progress`` is off)."""
    from tqdm import tqdm

    total = config.num_epochs * steps_per_epoch
    done = start_epoch * steps_per_epoch + position
    if not config.progress:
        return _NoProgress()
    # rate in images/s: one step is batch_size images
    return tqdm(total=total * config.batch_size, initial=done * config.batch_size, unit="img",
                unit_scale=True, dynamic_ncols=True, desc=label, smoothing=0.1)


class _NoProgress:
    """The bar's stand-in: epoch lines go to the log."""

    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def write(self, s):
        log.info(s)

    def close(self):
        pass


class SummaryWriter:
    """TensorBoard event files through ``tf.summary`` (TensorFlow is already a dependency)."""

    def __init__(self, logdir):
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(logdir) if jax.process_index() == 0 else None

    def scalars(self, step, values):
        if self._writer is None:
            return
        with self._writer.as_default():
            for k, v in values.items():
                self._tf.summary.scalar(k, v, step=step)

    def close(self):
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def write_results(workdir: str, results: list[RunResult]) -> None:
    """``results.json``, ``results.md`` (paper-style table) and ``curves.png`` in ``workdir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoint.write_json(os.path.join(workdir, "results.json"), [r.as_dict() for r in results])
    base = results[0].full_macs
    lines = ["| model | parameters | multiply-adds | theoretical speedup | best test top-1 (%) | "
             "final test top-1 (%) | training time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.model} | {r.params:,} | {r.macs / 1e6:.1f} M | {base / r.macs:.2f}x | "
                     f"{100 * r.best_test_top1:.2f} | {100 * r.final_test_top1:.2f} | "
                     f"{r.train_seconds:.0f} |")
    checkpoint.write_text(os.path.join(workdir, "results.md"), "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = [h["epoch"] for h in r.history]
        axes[0].plot(epochs, [h.get("train_loss") for h in r.history], label=f"{r.model} train")
        axes[0].plot(epochs, [h["test_loss"] for h in r.history], "--", label=f"{r.model} test")
        axes[1].plot(epochs, [100 * h["test_top1"] for h in r.history], label=r.model)
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    checkpoint.atomic_write(os.path.join(workdir, "curves.png"),
                            lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)

