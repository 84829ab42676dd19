"""NNX's weight re-parametrizing wrappers, folded into the weights they compute with.

``nnx.WeightNorm(layer)`` and ``nnx.SpectralNorm(layer)`` re-parametrize ``layer``'s
parameters in place at every call (each kernel l2-normalized per output feature and scaled by
the wrapper's ``scales``, or divided by its largest singular value from the wrapper's ``u``)
before running it; the kernel the layer computes with is that value, not the stored one.

:func:`folded` gives a copy of the model whose wrappers are each replaced by an
:class:`Unwrapped` holding a copy of the layer with those values (the wrapper's own code run
once, ``update_stats=False``, on the layer with its call stubbed out), under the same
attribute, so the layer keeps its path (``wrapped/layer_instance``) and its call the same
arguments; the wrapper's ``scales`` or ``batch_stats`` are dropped. lrjax then splits those
layers as any other; :func:`restored` puts back the original wrappers around layers all kept
full. A split layer's pair holds factors of the kernel the layer computed with, trained as a
pair from then on (no longer as a direction and a scale).
"""

from __future__ import annotations

import jax
from flax import nnx

from lrjax.linen_wrappers import folded_note
from lrjax.sites import path_of

__all__ = ["WRAPPERS", "Unwrapped", "foldable", "folded", "restored", "notes"]

WRAPPERS = (nnx.WeightNorm, nnx.SpectralNorm)


class Unwrapped(nnx.Module):
    """A folded wrapper: runs its layer, whose parameters hold what the wrapper made of them
    (``update_stats``, a spectral norm's call argument, is dropped)."""

    def __init__(self, layer_instance: nnx.Module, wrapper: str):
        self.layer_instance = layer_instance
        self.wrapper = wrapper  # the folded wrapper's class name

    def __call__(self, x, *args, update_stats=None, **kwargs):
        return self.layer_instance(x, *args, **kwargs)


def _stubbed(cls: type) -> type:
    return type(cls.__name__, (cls,), {"__call__": lambda self, *args, **kwargs: None})


def _unwrapped(wrapper: nnx.Module) -> tuple[Unwrapped, float]:
    """An :class:`Unwrapped` of a copy of ``wrapper``'s layer holding the values the wrapper
    computes with, and XLA's count of the wrapper's work (done at every call of its layer)."""
    copy = nnx.clone(wrapper)
    layer = copy.layer_instance
    own = type(layer)
    layer.__class__ = _stubbed(own)  # (the wrapper's call normalizes, then calls the layer)
    graphdef, state = nnx.split(copy)

    def normalized(state):
        module = nnx.merge(graphdef, state)
        module(None, update_stats=False) if isinstance(module, nnx.SpectralNorm) else module(None)
        return nnx.state(module)

    try:
        run = jax.jit(normalized)
        flops = float((run.lower(state).cost_analysis() or {}).get("flops", 0.0))
        nnx.update(copy, run(state))
    finally:
        layer.__class__ = own
    return Unwrapped(layer, type(wrapper).__name__), flops


def _stacked(wrapper: nnx.Module) -> bool:
    """Whether the wrapper's own variables have an axis more than one layer's need (a stack of
    layers made by ``nnx.vmap``, run by ``nnx.scan``: each iteration's to fold apart)."""
    if isinstance(wrapper, nnx.SpectralNorm):
        return any(path[-1] == "sigma" and jax.numpy.ndim(v) != 0
                   for path, v in nnx.to_flat_state(nnx.state(wrapper.batch_stats)))
    axes = wrapper.feature_axes
    return any(jax.numpy.ndim(v) != len(axes if isinstance(axes, (tuple, list)) else (axes,))
               for v in jax.tree.leaves(nnx.state(wrapper.scales or {})))


def foldable(wrapper: nnx.Module) -> bool:
    """Whether :func:`folded` folds this wrapper (its layer a module, not a stack of them)."""
    return isinstance(wrapper.layer_instance, nnx.Module) and not _stacked(wrapper)


def folded(model: nnx.Module) -> tuple[nnx.Module, dict, dict]:
    """``(copy of model with its wrappers folded, {path: original wrapper}, {layer path: XLA's
    flops of its wrapper's work per call})``; ``model`` itself and ``{}``, ``{}`` when it holds
    none."""
    originals, work = {}, {}

    def fold(path, node):
        if isinstance(node, WRAPPERS) and foldable(node):
            name = path_of(tuple(str(p) for p in path))
            originals[name] = node
            unwrapped, work[f"{name}/layer_instance"] = _unwrapped(node)
            return unwrapped
        return node

    if not any(isinstance(n, WRAPPERS) for _, n in nnx.iter_graph(model)):
        return model, {}, {}
    return nnx.recursive_map(fold, model), originals, work


def restored(model: nnx.Module, originals: dict, split) -> tuple[nnx.Module, tuple[str, ...]]:
    """``model`` with the original wrappers (copies) back where no layer under them was split
    (``split``: the split layers' paths), and the paths of the wrappers kept folded."""
    kept = tuple(p for p in originals if any(s.startswith(p + "/") for s in split))

    def back(path, node):
        name = path_of(tuple(str(p) for p in path))
        if isinstance(node, Unwrapped) and name in originals and name not in kept:
            return nnx.clone(originals[name])
        return node

    return (nnx.recursive_map(back, model) if len(kept) < len(originals) else model), kept


def notes(originals: dict, kept) -> list[str]:
    """The report's line for the wrappers kept folded."""
    return folded_note({p: f"{p}/layer_instance" for p in kept})
