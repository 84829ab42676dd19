"""Every checkpoint read and write in lrjax goes through this module (Orbax, ``args=`` API).

Two kinds of files:

* **variable files** (:func:`save_variables` / :func:`load_variables`): a model's variable tree
  (``{"params": ..., "batch_stats": ...}``), as an Orbax directory or a flat ``.npz`` whose keys
  are ``/``-joined paths (``params/conv1_1/kernel``). Writes are atomic: nothing half-written is
  left behind on failure. A training run's checkpoint directory is accepted on reading.
* **training checkpoints** (:class:`TrainCheckpoints`): an Orbax ``CheckpointManager`` over a run's
  directory, keeping the last N steps plus the best by test accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

__all__ = ["save_variables", "load_variables", "CheckpointError", "TrainCheckpoints",
           "latest_train_variables", "write_json", "write_text", "atomic_write"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match what it is loaded into."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write, *, binary: bool = False) -> str:
    """Create ``path`` through ``write(file)`` on a temporary file renamed into place: on any
    failure nothing (not even a partial file) is left. The file gets the usual 0666 & ~umask."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text))


def write_json(path: str, data) -> str:
    """Write ``data`` as indented JSON to ``path`` atomically (no half-written result file)."""
    return write_text(path, json.dumps(data, indent=1) + "\n")


def _to_numpy_tree(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def save_variables(path: str, variables, *, overwrite: bool = False) -> str:
    """Write a variable tree to ``path`` (``.npz`` file, else an Orbax directory), atomically."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    variables = _to_numpy_tree(dict(variables))
    if path.endswith(".npz"):
        flat = traverse_util.flatten_dict(variables, sep="/")
        return atomic_write(path, lambda f: np.savez(f, **flat), binary=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-ckpt-")
    try:
        target = os.path.join(tmp, "variables")
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(target, args=ocp.args.StandardSave(variables))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_variables(path: str):
    """Read a variable tree written by :func:`save_variables` (``.npz`` or Orbax directory).

    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as data:
                flat = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path!r} is not a readable .npz checkpoint: {e}") from None
        if not flat:
            raise CheckpointError(f"{path!r} holds no arrays")
        return traverse_util.unflatten_dict(flat, sep="/")
    try:
        found = latest_train_variables(path)
    except Exception:  # not a training run's directory
        found = None
    if found is not None:
        return found
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            return ckptr.restore(os.path.abspath(path), args=ocp.args.StandardRestore())
    except Exception as e:  # Orbax raises many types for a foreign directory
        raise CheckpointError(f"{path!r} is not an Orbax variables checkpoint: {e}") from None


class TrainCheckpoints:
    """Training checkpoints of one run: an Orbax ``CheckpointManager`` over ``directory``.

    Each step holds two items: ``state`` (the train-state pytree: params, batch stats, optimizer
    state, step, RNG) and ``meta`` (JSON: epoch position, the run's fingerprint, metrics). Keeps the
    last ``keep`` checkpoints plus the ``keep_best`` best by test accuracy. Saves are atomic (Orbax
    writes to a temporary directory and renames); an interrupted save leaves the previous
    checkpoints intact.

    Args:
      directory: where the step directories live (created if missing).
      fingerprint: JSON-able facts a resumed run must share (model, dataset, batch size, ...);
        restoring a checkpoint whose fingerprint differs raises :class:`CheckpointError`.
      keep: how many of the latest checkpoints to keep.
      keep_best: how many of the best (by ``test_accuracy``) to keep as well.
    """

    def __init__(self, directory: str, *, fingerprint: dict, keep: int = 2, keep_best: int = 1):
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}")
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["test_accuracy"], n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=False, create=True)
        self.directory = os.path.abspath(directory)
        self.fingerprint = fingerprint
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, *, test_accuracy: float | None = None) -> None:
        """Save ``state`` and ``meta`` (plus the fingerprint) at ``step`` and wait for it."""
        meta = {**meta, "fingerprint": self.fingerprint}
        metrics = None if test_accuracy is None else {"test_accuracy": float(test_accuracy)}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """Restore ``(state, meta)`` at ``step`` into the structure/shardings of ``abstract_state``.

        Raises:
          CheckpointError: different fingerprint, or arrays that do not fit ``abstract_state``.
        """
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        theirs = meta.get("fingerprint")
        if theirs != self.fingerprint:
            diff = sorted(k for k in set(self.fingerprint) | set(theirs or {})
                          if (theirs or {}).get(k) != self.fingerprint.get(k))
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was written by a different model or config "
                f"(differs in {diff}: checkpoint {[(theirs or {}).get(k) for k in diff]}, "
                f"this run {[self.fingerprint.get(k) for k in diff]}); use another workdir")
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:  # Orbax raises assorted errors for structure/shape mismatches
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this "
                                  f"model's train state: {e}") from None
        return state, meta

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def latest_train_variables(directory: str):
    """``{"params", "batch_stats"}`` of the latest step of a training run's checkpoint directory,
    or None if ``directory`` is not one."""
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_names=("state", "meta"))
    try:
        step = manager.latest_step()
        if step is None:
            return None
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return variables
