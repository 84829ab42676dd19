"""Flax's weight re-parametrizing wrappers, folded into the weights they compute with.

``nn.WeightNorm(layer)`` and ``nn.SpectralNorm(layer)`` run ``layer`` on a function of its
stored variables (``nn.map_variables``): each kernel l2-normalized per output feature and
scaled by the wrapper's ``scale`` parameter, or divided by its largest singular value (its
``n_steps`` power-iteration steps from the ``u`` vector in the wrapper's ``batch_stats``, as
every call of it makes). The kernel a layer computes with is that function's value, not the
stored one, so it is the one the closed form factors. The wrapper's work, done at every call,
is whole-net work a split saves (:attr:`Folding.flops`, :func:`with_wrapper_flops`).

:func:`folded` evaluates each wrapper's function on the given variables by running the
wrapper's own code (with ``update_stats=False``) on a stand-in for its layer that returns the
variables it is given: the stored variables of the wrapped layer (a whole submodule's, every
collection the wrapper maps) are replaced by what the layer computes with, and the wrapper's
own variables (``scale``; ``u`` and ``sigma``) are dropped. Under :func:`unwrapped` the
wrappers at those paths call their layer directly, so the model with the folded variables
computes what it computed (to float32 rounding), with plain layers lrjax splits as any other.
A decomposed model keeps a wrapper folded only around a layer it split
(:class:`lrjax.layers.LowRankModel`'s ``unwrapped``): its pair holds factors of the kernel
the layer computed with, trained as a pair from then on (no longer as a direction and a
scale); a wrapper around layers all kept full stays as it was. A wrapper that is not
:func:`foldable` (its variables stacked by ``nn.scan`` / ``nn.vmap``) stays as it is, its layers
listed with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
from flax import traverse_util

from lrjax.linen_unbound import scope_path
from lrjax.sites import path_of

__all__ = ["WRAPPERS", "Folding", "checked", "foldable", "recorded", "folded", "unwrapped",
           "restored", "folded_note", "with_wrapper_flops"]

WRAPPERS = (nn.WeightNorm, nn.SpectralNorm)


@dataclasses.dataclass(frozen=True)
class Folding:
    """The wrappers :func:`folded` folded: ``layers`` ``{wrapper path: wrapped module's path}``
    (relative to the model), ``variables``, the model's with those wrappers' variables folded
    into their layers', and ``flops``, XLA's count of each wrapper's work per call (its
    re-parametrization, done at every call of its layer), by its layer's path."""
    layers: Mapping[str, str]
    variables: dict
    flops: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def kept(self, split) -> tuple[str, ...]:
        """The wrappers around a layer among ``split`` (paths): those a result keeps folded."""
        return tuple(w for w, layer in self.layers.items() if any(_under(p, layer) for p in split))

    def notes(self, kept: tuple[str, ...]) -> list[str]:
        """The report's line for the wrappers in ``kept`` (folded in the result)."""
        return folded_note({w: self.layers[w] for w in kept})


def folded_note(layers: Mapping[str, str]) -> list[str]:
    """One report line naming the folded wrappers (``{wrapper path: its layer's path}``), or
    none."""
    if not layers:
        return []
    named = ", ".join(f"{w} into {layer}" for w, layer in list(layers.items())[:4])
    more = f" and {len(layers) - 4} more" if len(layers) > 4 else ""
    return [f"{len(layers)} weight re-parametrizing wrapper{'s' * (len(layers) > 1)} "
            f"(WeightNorm / SpectralNorm) folded into the weights their layers computed with, "
            f"no longer run: {named}{more}"]


class _Echo(nn.Module):
    """Stands for a wrapped layer: returns the variables its wrapper gives it."""

    @nn.compact
    def __call__(self, *args, **kwargs):
        return self.variables


def _relative(module: nn.Module, root: tuple) -> tuple:
    return tuple(scope_path(module)[len(root):])


_SAME_SHAPES = ("remat", "checkpoint", "jit")  # lifted transforms keeping variables as they are


def foldable(wrapper: nn.Module) -> bool:
    """Whether a bound wrapper can be folded: its variables as stored (not stacked by an
    ``nn.scan`` / ``nn.vmap``, nor mapped by ``nn.map_variables``), its layer its sibling or
    its child."""
    layer = wrapper.layer_instance
    if not isinstance(layer, nn.Module) or layer.scope is None or any(
            "(" in str(p) and str(p).split("(")[0] not in _SAME_SHAPES
            for p in getattr(wrapper.scope, "debug_path", ())):
        return False
    wrapper_path, layer_path = _relative(wrapper, ()), _relative(layer, ())
    return wrapper_path[:-1] == layer_path[:-1] or wrapper_path == layer_path[:-1]


@contextlib.contextmanager
def recorded():
    """Within it, the wrappers the model's calls run are recorded in the dict it yields:
    ``{wrapper path: (unbound wrapper, wrapped module's path)}`` (from the model's root), those
    :func:`foldable` (the layer the wrapper's sibling, made by the same parent in a compact call,
    or its child, made in a ``setup``: Flax names it ``layer_instance``)."""
    found = {}

    def intercept(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, WRAPPERS) and \
                foldable(module):
            found.setdefault(path_of(_relative(module, ())), (
                module.clone(parent=None, layer_instance=None),
                path_of(_relative(module.layer_instance, ()))))
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(intercept):
        yield found


def _subtree(flat: Mapping, path: str) -> dict:
    """``{collection: the subtree at path}`` of a flat variable dict (tuple keys)."""
    out = {}
    for key, value in flat.items():
        if _under(path_of(key[1:]), path):
            out.setdefault(key[0], {})[key[1 + len(path.split("/")):]] = value
    return {c: traverse_util.unflatten_dict(tree) for c, tree in out.items()}


def _effective(wrapper: nn.Module, wrapper_path: str, layer_path: str, flat) -> dict:
    """``{collection: subtree}`` the wrapped layer computes with: the wrapper's own code run on
    the stored ones (an :class:`_Echo` in the layer's place, next to the wrapper or in it)."""
    wrapper_name, layer_name = wrapper_path.split("/")[-1], layer_path.split("/")[-1]
    inside = _under(layer_path, wrapper_path)
    held = {}
    for path, name in ((wrapper_path, wrapper_name),) + (() if inside else (
            (layer_path, layer_name),)):
        for collection, subtree in _subtree(flat, path).items():
            held.setdefault(collection, {})[name] = subtree
    keywords = {"update_stats": False} if isinstance(wrapper, nn.SpectralNorm) else {}

    class Holder(nn.Module):
        @nn.compact
        def __call__(self):
            echo = _Echo(parent=None) if inside else _Echo(name=layer_name)
            return wrapper.clone(parent=self, layer_instance=echo, name=wrapper_name)(
                **keywords)

    run = jax.jit(lambda v: dict(Holder().apply(v)))
    analysis = run.lower(held).cost_analysis() or {}
    return run(held), float(analysis.get("flops", 0.0))


def checked(check, model: nn.Module, variables, args, kwargs) -> Folding:
    """``check(model, variables, *args, **kwargs)`` (lrjax's check of the variables and the
    call, whose abstract run finds the wrappers: :func:`recorded`), then the wrappers it found
    folded (:func:`folded`)."""
    with recorded() as found:
        check(model, variables, *args, **kwargs)
    return folded(found, variables)


def folded(found: Mapping, variables) -> Folding:
    """The wrappers ``found`` (:func:`recorded`) folded into the variables of the layers they
    wrap (the module's docstring); ``variables`` as they are when there are none."""
    if not found:
        return Folding({}, variables)
    flat, flops = traverse_util.flatten_dict(dict(variables)), {}
    for wrapper_path, (wrapper, layer_path) in found.items():
        effective, flops[layer_path] = _effective(wrapper, wrapper_path, layer_path, flat)
        for key in [k for k in flat if _under(path_of(k[1:]), wrapper_path) or
                    _under(path_of(k[1:]), layer_path)]:
            del flat[key]
        for collection, subtree in effective.items():
            for key, value in traverse_util.flatten_dict(dict(subtree)).items():
                flat[(collection, *layer_path.split("/"), *key)] = value
    layers = {w: layer for w, (_, layer) in found.items()}
    return Folding(layers, traverse_util.unflatten_dict(flat), flops)


def with_wrapper_flops(found: list, flops: Mapping[str, float], batch: int) -> list:
    """The sites with each folded wrapper's work per example (``flops`` per call, by the path
    of the module it wraps) added to the ``parametrization_flops`` of the layers under it
    (shared), which splitting them saves."""
    out = list(found)
    for path, count in flops.items():
        under = [i for i, s in enumerate(out) if s.candidate and _under(s.path, path)]
        for i in under:
            out[i] = dataclasses.replace(out[i], parametrization_flops=(
                out[i].parametrization_flops + count / len(under) / batch))
    return out


def restored(folding: Folding, variables: Mapping, original: Mapping, keep) -> dict:
    """``variables`` (flat, tuple keys, as folded) with the wrappers not in ``keep`` given
    back: their layers' and their own stored variables as in ``original`` (flat)."""
    out = dict(variables)
    for wrapper, layer in folding.layers.items():
        if wrapper in keep:
            continue
        for key in [k for k in out if _under(path_of(k[1:]), layer)]:
            del out[key]
        out.update({k: v for k, v in original.items()
                    if _under(path_of(k[1:]), layer) or _under(path_of(k[1:]), wrapper)})
    return out


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


@contextlib.contextmanager
def unwrapped(paths, root: tuple = ()):
    """Within it, the wrappers at ``paths`` (relative to the scope path ``root``) call their
    layer directly, which then computes with its own (folded) variables."""
    paths = frozenset(paths)

    def intercept(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, WRAPPERS) or \
                path_of(_relative(module, root)) not in paths:
            return next_fun(*call_args, **call_kwargs)
        if isinstance(module, nn.SpectralNorm):
            call_kwargs = {k: v for k, v in call_kwargs.items() if k != "update_stats"}
        return module.layer_instance(*call_args, **call_kwargs)

    if not paths:
        yield
        return
    with nn.intercept_methods(intercept):
        yield
