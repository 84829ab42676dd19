"""A decomposed model saved for a later process that has the model's code: its rank map and its
variables (as decomposed, or after fine-tuning) in one folder (:func:`save_decomposed`), and the
low-rank model rebuilt from the original model's definition with those variables
(:func:`load_decomposed`), linen and NNX, with no decomposition (no SVD, no calibration).

    result = lrjax.decompose_linen(model, variables, x, rule="speedup:2", calibration=batches)
    lrjax.save_decomposed("resnet50_lr", result)             # or result, fine_tuned_variables
    module, variables = lrjax.load_decomposed("resnet50_lr", ResNet50())   # elsewhere

An NNX model is rebuilt from a fresh instance of its class (any weights) and its example call,
which finds its layers: ``module = lrjax.load_decomposed("net_lr", Net(nnx.Rngs(0)), x)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
from flax import nnx

from lrjax import boxes, checkpoint, nnx_surgery, nnx_wrappers, surgery
from lrjax.layers import LowRankModel
from lrjax.nnx_layers import placeholder_factors
from lrjax.report import Decomposition

__all__ = ["save_decomposed", "load_decomposed"]

VERSION = 1


def _state(module: nnx.Module):
    """What an NNX model's folder holds: its state without its random streams (their keys are
    drawn afresh in the process that loads it)."""
    return nnx.state(module, nnx.Not(nnx.RngState))


def save_decomposed(path: str, result: Decomposition, trained=None, *,
                    overwrite: bool = False) -> str:
    """Write a decomposed model to the folder ``path`` (a name without a suffix), atomically:
    its rank map and its variables (Orbax), for :func:`load_decomposed`.

    Args:
      path: the folder to write; its parent must exist.
      result: what :func:`lrjax.decompose_linen` or :func:`lrjax.decompose_nnx` returned.
      trained: the variables to save instead of the result's: linen, a variable dict of the
        low-rank model (after fine-tuning, ``{"params": ..., "batch_stats": ...}``); NNX, the
        low-rank module itself (``result.module`` after fine-tuning). Default: the result's.
      overwrite: replace an existing ``path``, only if it is a folder this function wrote.

    Returns:
      The folder's absolute path.

    Raises:
      ValueError: ``trained`` of the other API than ``result``.
      lrjax.checkpoint.CheckpointError: a path that may not be written; nothing is written.
    """
    if not isinstance(result, Decomposition):
        raise ValueError("result must be what decompose_linen or decompose_nnx returned; got "
                         f"{type(result).__name__}")
    if result.variables is None:  # NNX: the module carries its state
        module = result.module if trained is None else trained
        if not isinstance(module, nnx.Module):
            raise ValueError("an NNX result's trained state is its module (result.module after "
                             f"fine-tuning); got {type(module).__name__}")
        meta = {"api": "nnx", "ranks": {p: int(r) for p, r in result.ranks.items()
                                        if r is not None}}
        variables = nnx.to_pure_dict(_state(module))
    else:
        variables = result.variables if trained is None else trained
        if not isinstance(variables, Mapping):
            raise ValueError("a linen result's trained state is a variable dict of the low-rank "
                             f"model; got {type(variables).__name__}")
        meta = {"api": "linen", "ranks": dict(result.module.ranks)}  # per call (a scan's too)
        if result.module.unwrapped:  # wrappers folded into their layers (linen_wrappers)
            meta["unwrapped"] = list(result.module.unwrapped)
        variables = boxes.unboxed(variables)
    return checkpoint.save_decomposed_folder(path, {"version": VERSION, **meta}, variables,
                                             overwrite=overwrite)


def load_decomposed(path: str, model, *example_args, **example_kwargs):
    """The decomposed model saved at ``path`` (:func:`save_decomposed`), rebuilt on ``model``,
    the original full-rank model (its code as when it was decomposed; its weights are not used).

    Args:
      path: the folder :func:`save_decomposed` wrote.
      model: linen, the full-rank module (``ResNet50()``); NNX, an instance of the full-rank
        model (``Net(nnx.Rngs(0))``, any weights: it is copied, not changed).
      *example_args, **example_kwargs: the model's example call (as given to the
        decomposition): needed for NNX, whose layers are found by running it; for linen,
        optional, the variables are then checked against the rebuilt model.

    Returns:
      linen: ``(module, variables)``, a :class:`lrjax.layers.LowRankModel` and its variables;
      NNX: a copy of ``model`` with the pairs swapped in and the saved state set.

    Raises:
      lrjax.checkpoint.CheckpointError: ``path`` is not such a folder.
      ValueError: the folder was saved from the other API, or from another model (a layer of
        its rank map is not in this one, or the variables do not fit), naming the difference.
    """
    if not isinstance(model, (nnx.Module, nn.Module)):
        raise ValueError(f"model must be a linen or NNX module; got {type(model).__name__}")
    meta, variables = checkpoint.load_decomposed_folder(path)
    api = "nnx" if isinstance(model, nnx.Module) else "linen"
    if meta.get("api") != api:
        raise ValueError(f"{path!r} holds a {meta.get('api')} model; this model is {api}")
    ranks = meta["ranks"]
    if api == "linen":
        module = LowRankModel.wrap(model, ranks, unwrapped=meta.get("unwrapped", ()))
        if example_args or example_kwargs:
            surgery.check_variables(module, variables, *example_args, **example_kwargs)
        return module, variables
    if not example_args and not example_kwargs:
        raise ValueError("an NNX model's layers are found by running it: give its example call "
                         "(load_decomposed(path, model, x))")
    model, wrappers, _ = nnx_wrappers.folded(model)  # as decompose_nnx folded them
    found = {s.path: s for s in nnx_surgery.find_convs_nnx(model, *example_args,
                                                            **example_kwargs) if s.candidate}
    missing = sorted(set(ranks) - set(found))
    if missing:
        raise ValueError(f"{path!r} was saved from another model: this one has no decomposable "
                         f"layer {missing[0]!r} (its layers: {sorted(found)[:6]}...)")
    module = nnx_surgery.with_pairs(model, found, {
        p: placeholder_factors(found[p], int(r)) for p, r in ranks.items()})
    module, _ = nnx_wrappers.restored(module, wrappers, ranks)
    state = _state(module)
    try:
        nnx.replace_by_pure_dict(state, variables)
    except Exception as e:  # noqa: BLE001 - Flax names the path it could not place
        raise ValueError(f"{path!r} was saved from another model: its variables do not fit "
                         f"this one's ({e})") from None
    nnx.update(module, state)
    return module
