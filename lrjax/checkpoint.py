"""Every checkpoint read and write in lrjax goes through this module (Orbax, ``args=`` API).

Two kinds of files:

* **variable files** (:func:`save_variables` / :func:`load_variables`): a model's variable tree
  (``{"params": ..., "batch_stats": ...}``), as an Orbax directory or a flat ``.npz`` whose keys
  are ``/``-joined paths (``params/conv1_1/kernel``). Writes are atomic: nothing half-written is
  left behind on failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

__all__ = ["save_variables", "load_variables", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match what it is loaded into."""


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
        fd, tmp = tempfile.mkstemp(dir=parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **flat)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path
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
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            return ckptr.restore(os.path.abspath(path), args=ocp.args.StandardRestore())
    except Exception as e:  # Orbax raises many types for a foreign directory
        raise CheckpointError(f"{path!r} is not an Orbax variables checkpoint: {e}") from None
