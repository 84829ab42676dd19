"""Every checkpoint read and write in lrjax goes through this module (Orbax, ``args=`` API).

Two kinds of files:

* **variable files** (:func:`save_variables` / :func:`load_variables`): a model's variable tree
  (``{"params": ..., "batch_stats": ...}``), as an Orbax directory or a flat ``.npz`` whose keys
  are ``/``-joined paths (``params/conv1_1/kernel``). Writes are atomic: nothing half-written is
  left behind on failure. A training run's checkpoint directory is accepted on reading.
* **training checkpoints** (:class:`TrainCheckpoints`): an Orbax ``CheckpointManager`` over a run's
  directory, keeping the last N steps plus the best by test accuracy.
* **decomposed models** (:func:`save_decomposed_folder` / :func:`load_decomposed_folder`, used by
  :mod:`lrjax.saved`): a folder holding ``lrjax_decomposed.json`` (the rank map and the API)
  and the variables as an Orbax checkpoint in ``variables/``, written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

__all__ = ["save_variables", "load_variables", "CheckpointError", "TrainCheckpoints",
           "OUTPUT_SUFFIXES", "variables_format", "is_lrjax_output", "check_output",
           "latest_train_variables", "write_json", "write_text", "atomic_write",
           "save_decomposed_folder", "load_decomposed_folder", "DECOMPOSED_MARKER"]


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


# the suffixes of each kind of file or folder lrjax writes ("": a folder name without a suffix)
OUTPUT_SUFFIXES = {"npz": (".npz",), "orbax": ("",), "onnx": (".onnx",),
                   "tflite": (".tflite",), "stablehlo": (".shlo", ".stablehlo"),
                   "json": (".json",), "decomposed": ("",)}
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")
DECOMPOSED_MARKER = "lrjax_decomposed.json"  # a decomposed model's folder: its rank map, its API


def variables_format(path: str) -> str:
    """``"npz"`` for a ``.npz`` path, ``"orbax"`` for a name without a suffix (a folder).

    Raises:
      CheckpointError: any other suffix, naming it (``out.onnx`` is not a variables checkpoint).
    """
    suffix = os.path.splitext(os.path.basename(os.path.normpath(path)))[1]
    if suffix == ".npz":
        return "npz"
    if not suffix:
        return "orbax"
    raise CheckpointError(f"{path!r} has the suffix {suffix!r}: a variables checkpoint is a "
                          ".npz file or an Orbax folder (a name without a suffix)")


def is_lrjax_output(path: str, kind: str) -> bool:
    """Whether ``path`` holds an output of ``kind`` (:data:`OUTPUT_SUFFIXES`) of the sort lrjax
    writes: a ``.npz`` archive of arrays, an Orbax checkpoint folder, an ONNX model, a TFLite
    flatbuffer, a serialized ``jax.export`` artifact. Read only as far as needed to tell."""
    if kind == "orbax":
        return os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, m)) for m in _ORBAX_MARKERS)
    if kind == "decomposed":
        return _decomposed_meta(path) is not None
    if not os.path.isfile(path):
        return False
    try:
        if kind == "npz":
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            return bool(names) and all(n.endswith(".npy") for n in names)
        if kind == "tflite":
            with open(path, "rb") as f:
                return f.read(8)[4:8] == b"TFL3"  # the flatbuffer file identifier
        if kind == "onnx":
            import onnx

            onnx.load_model(path, load_external_data=False)
            return True
        if kind == "json":
            with open(path) as f:
                json.load(f)
            return True
        if kind == "stablehlo":
            import jax

            with open(path, "rb") as f:
                jax.export.deserialize(bytearray(f.read()))
            return True
    except Exception:  # noqa: BLE001 - unreadable as that kind: not one lrjax wrote
        return False
    raise ValueError(f"unknown output kind {kind!r}; expected one of {sorted(OUTPUT_SUFFIXES)}")


def check_output(path: str, kind: str, *, overwrite: bool = False,
                 flag: str = "overwrite=True") -> str:
    """Check, before any work, that an output of ``kind`` may be written at ``path``.

    The name must carry one of the kind's suffixes (:data:`OUTPUT_SUFFIXES`), its folder must
    exist and be writable, and an existing ``path`` is replaced only with ``overwrite`` and only
    if it is an output of the same kind lrjax wrote (:func:`is_lrjax_output`): an ordinary folder
    or a foreign file is never replaced.

    Args:
      flag: how the caller spells "overwrite" in messages (``"--overwrite"`` on command lines).

    Returns:
      The absolute path.

    Raises:
      CheckpointError: naming the path and what is wrong; nothing has been written.
    """
    suffixes = OUTPUT_SUFFIXES[kind]
    path = os.path.abspath(path)
    suffix = os.path.splitext(os.path.basename(path))[1]
    if suffix not in suffixes:
        want = " or ".join(repr(x) if x else "no suffix (a folder)" for x in suffixes)
        raise CheckpointError(f"{path} has the suffix {suffix or 'none'!r}; a {kind} output "
                              f"needs {want}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write {path}: folder {parent} is not writable")
    if os.path.lexists(path):
        if not overwrite:
            raise CheckpointError(f"{path} exists; pass {flag} to replace it")
        if not is_lrjax_output(path, kind):
            what = "a folder" if os.path.isdir(path) else "a file"
            raise CheckpointError(f"refusing to replace {path}: it is {what} that is not a "
                                  f"{kind} output lrjax wrote ({flag} replaces only those)")
    return path


def _replace_folder(new: str, path: str) -> None:
    """Put folder ``new`` at ``path``: a folder already there is renamed aside first and removed
    only once ``new`` is in place, so a failure leaves one of the two whole."""
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".old-ckpt-")
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_variables(path: str, variables, *, overwrite: bool = False,
                   flag: str = "overwrite=True") -> str:
    """Write a variable tree to ``path``, atomically: a ``.npz`` file, or an Orbax folder for a
    name without a suffix (:func:`variables_format`). Missing parent folders are created; an
    existing ``path`` is replaced only with ``overwrite`` and only if it is a checkpoint of the
    same format (:func:`check_output`).

    Raises:
      CheckpointError: an unknown suffix, or an existing ``path`` that may not be replaced.
    """
    fmt = variables_format(path)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    check_output(path, fmt, overwrite=overwrite, flag=flag)
    variables = _to_numpy_tree(dict(variables))
    if fmt == "npz":
        flat = traverse_util.flatten_dict(variables, sep="/")
        return atomic_write(path, lambda f: np.savez(f, **flat), binary=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-ckpt-")
    try:
        target = os.path.join(tmp, "variables")
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(target, args=ocp.args.StandardSave(variables))
        _replace_folder(target, path)
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
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            why = "it holds pickled objects, not arrays" if "allow_pickle" in str(e) \
                else str(e).split("\n")[0]
            raise CheckpointError(f"{path!r} is not a readable .npz checkpoint ({why})") from None
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


def _decomposed_meta(path: str) -> dict | None:
    """The marker of a decomposed model's folder, or None where ``path`` is not one."""
    try:
        with open(os.path.join(path, DECOMPOSED_MARKER)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == DECOMPOSED_MARKER else None


def save_decomposed_folder(path: str, meta: dict, variables, *, overwrite: bool = False,
                           flag: str = "overwrite=True") -> str:
    """Write a decomposed model's folder at ``path`` (a name without a suffix), atomically:
    ``meta`` (JSON-serializable: the rank map, the API) as :data:`DECOMPOSED_MARKER` and the
    ``variables`` tree as an Orbax checkpoint in ``variables/``. An existing ``path`` is replaced
    only with ``overwrite`` and only if it is such a folder (:func:`check_output`).

    Raises:
      CheckpointError: a suffix, a missing parent folder, an existing ``path`` that may not be
        replaced; nothing has been written.
    """
    path = check_output(path, "decomposed", overwrite=overwrite, flag=flag)
    variables = _to_numpy_tree(dict(variables))
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-decomposed-")
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(os.path.join(tmp, "variables"), args=ocp.args.StandardSave(variables))
        with open(os.path.join(tmp, DECOMPOSED_MARKER), "w") as f:
            json.dump({"format": DECOMPOSED_MARKER, **meta}, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700, as a folder made by hand would be
        _replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_decomposed_folder(path: str) -> tuple[dict, dict]:
    """``(meta, variables)`` of a folder :func:`save_decomposed_folder` wrote (JAX arrays).

    Raises:
      CheckpointError: ``path`` missing, or not such a folder (naming what it lacks).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path!r} does not exist")
    meta = _decomposed_meta(path)
    if meta is None:
        raise CheckpointError(f"{path!r} is not a decomposed model lrjax saved (no readable "
                              f"{DECOMPOSED_MARKER} in it)")
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            variables = ckptr.restore(os.path.abspath(os.path.join(path, "variables")),
                                      args=ocp.args.StandardRestore())
    except Exception as e:  # Orbax raises many types for a damaged checkpoint
        raise CheckpointError(f"{path!r}: its variables cannot be read: {e}") from None
    # as device arrays (Orbax gives NumPy ones: a model indexing its parameter by a traced
    # index, a mixture of experts' per-expert scale, could not run on them)
    return meta, jax.device_put(variables)


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
