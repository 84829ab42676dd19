"""Modules a linen model applies apart with their own variables: ``module, variables =
self.unbind()`` then ``module.apply(variables, ...)``, as code does to run a submodule inside a
plain ``jax.lax.scan`` or ``fori_loop`` (which a bound module cannot enter): Octo's diffusion
action head samples so, its score network applied at every denoising step.

Flax gives the unbound copy no path: its layers would be named from its own root
(``diffusion_model/...``) and not found under the model's (``heads_action/diffusion_model/...``).
Within :func:`marking_unbind` (entered by :func:`lrjax.linen_cells.as_sublayers`: every linen
trace lrjax makes and every call of a :class:`lrjax.layers.LowRankModel`), ``unbind()`` returns
its copy as a subclass recording where the module sits in the model (:func:`scope_path`), so its
layers keep the paths they have in the model: they are found, costed, calibrated and split as the
model's own, and the decomposed model's pairs, read from the unbound variables, run in the loop.
"""

from __future__ import annotations

import contextlib
import weakref

import flax.linen as nn
from flax.core.scope import Scope

__all__ = ["marking_unbind", "scope_path", "applied_at", "share_scope"]

_ORIGINAL_UNBIND = nn.Module.unbind
_MARKED: dict[tuple[type, tuple[str, ...]], type] = {}  # (class, path): its marked subclass
_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # root scope: path
_DEPTH = [0]


def applied_at(module: nn.Module) -> tuple[str, ...] | None:
    """The model path of the module an unbound copy was taken from, for the root of a separate
    ``apply`` of that copy (``None`` for any other module)."""
    return getattr(type(module), "_lrjax_unbound_at", None)


def scope_path(module: nn.Module) -> tuple[str, ...]:
    """A bound module's variable path in the model, as a tuple of names.

    Read from the scope's parent chain, not ``scope.path``: ``nn.share_scope`` (how
    :class:`lrjax.layers.LowRankModel` wraps a model) re-parents the scopes of modules held in
    fields (an ``nn.Sequential``'s layers) without updating their recorded ``path``; a lifted
    transform's scope (``nn.scan``, ``nn.remat``) has no parent, its recorded path is the
    variables'. A module inside a separate ``apply`` of an unbound copy (see the module
    docstring) has the copied module's path before its own."""
    scope, names = module.scope, []
    while scope.parent is not None:
        names.append(scope.name)
        scope = scope.parent
    at = _APPLIED.get(scope)  # (a layer bound to a scope, lrjax's written products, too)
    if at is None:
        root = module
        while isinstance(root.parent, nn.Module):
            root = root.parent
        at = applied_at(root)
    return (*(at or ()), *scope.path, *reversed(names))


def _marked(cls: type, at: tuple[str, ...]) -> type:
    base = getattr(cls, "_lrjax_unbound_base", cls)
    key = (base, at)
    if key not in _MARKED:
        def __post_init__(self):  # bound to an apply's root scope: that scope is at ``at``
            base.__post_init__(self)
            if isinstance(self.parent, Scope):
                _APPLIED[self.parent] = at

        _MARKED[key] = type(base.__name__, (base,), {
            "_lrjax_unbound_at": at, "_lrjax_unbound_base": base, "__post_init__": __post_init__,
            "__module__": base.__module__, "__qualname__": base.__qualname__})
    return _MARKED[key]


def _unbind(self):
    module, variables = _ORIGINAL_UNBIND(self)
    object.__setattr__(module, "__class__", _marked(type(module), scope_path(self)))
    return module, variables


@contextlib.contextmanager
def marking_unbind():
    """Within it, ``nn.Module.unbind()`` marks its copy with the module's path (see the module
    docstring); re-entrant."""
    _DEPTH[0] += 1
    nn.Module.unbind = _unbind
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        if not _DEPTH[0]:
            nn.Module.unbind = _ORIGINAL_UNBIND


def share_scope(module: nn.Module, other: nn.Module) -> None:
    """``nn.share_scope(module, other)``, with the recorded paths of the scopes it re-parents put
    right. Flax moves the scopes of ``other``'s submodules bound so far (the modules held in its
    fields) under the shared scope but leaves their ``path`` as it was (``("base", "network")``
    for what is now ``("network",)``), and a lifted transform under them (``nn.vmap``,
    ``nn.scan``, ``nn.remat``, ``nn.jit``), whose scope has no parent, takes its path from that
    stale one: the layers of an ``nn.vmap`` ensemble in a module held in a field (jaxrl2's
    critic), or of a remat'ed block in an ``nn.Sequential``, were not found under their own
    paths in a :class:`lrjax.layers.LowRankModel`. Scopes bound later are made under the shared
    scope, with the right paths."""
    nn.share_scope(module, other)
    _repath(other)


def _repath(module: nn.Module) -> None:
    for child in module._state.children.values():
        scope = getattr(child, "scope", None) if isinstance(child, nn.Module) else None
        if scope is None or scope.parent is None or not isinstance(scope.name, str):
            continue
        path = (*scope.parent.path, scope.name)
        if scope.path != path:
            if scope.debug_path == scope.path:
                scope.debug_path = path
            scope.path = path
        _repath(child)
