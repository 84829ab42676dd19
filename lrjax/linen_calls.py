"""The calls a linen module's own code makes to other modules, apart from its own work: recorded
while it runs as written, then answered with what they returned while its own code is traced
alone.

A compact module that declares a parameter and also calls other modules (NesT's attention:
query and key-value ``nn.DenseGeneral`` layers, then its own ``proj_kernel`` in an einsum), or a
``setup`` module holding layers beside a parameter of its own (CLIP's vision tower and its
``proj``), is no layer, but its own product is one. :mod:`lrjax.linen_products` runs such a
call as written with :func:`recorded` on (each call of another module made directly by its
code: which module, which method, what it returned), then traces the module's own code with
:func:`answered` on: those calls are not made again (no interceptor sees them: calibration, the
layer finder), each returns what it returned as written, as an input of the trace, and the
arrays each was given come out of the trace (:func:`results`: which of the module's parameters
computed them). The replay of that trace with the product as a Flax layer computes what the
module computed; the run as written is left unused but for the calls (``jax.jit`` drops the
rest: :func:`lrjax.macs.live`).

Flax's interceptor stack is reached through ``flax.linen.module``'s private
``_global_interceptor_stack`` and ``_context.module_stack`` (Flax 0.12): a recorder must see a
call as its caller does, before any other interceptor, and a trace must be seen by none.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import flax
import flax.linen as nn
import jax
import numpy as np
from flax.linen import module as flax_module
from jax.extend import core as jcore

TRACING: list = []  # the modules whose own code is being traced

__all__ = ["Call", "Unanswered", "TRACING", "recorded", "answered", "results", "attempt",
           "check_shape", "call_key", "scope_state", "rewind", "restore"]


@dataclasses.dataclass(frozen=True)
class Call:
    """One call a module's code made to another module: the callee's name and class, the
    method, the arrays it was given, and the leaves (and structure) of what it returned."""

    name: str | None
    kind: type
    method: str
    args: tuple
    leaves: tuple
    treedef: object

    def matches(self, module: nn.Module, method: str) -> bool:
        return (module.name, type(module), method) == (self.name, self.kind, self.method)


class Unanswered(ValueError):
    """A traced call that was not made as written (another module, method, or one more)."""


def _caller() -> nn.Module | None:
    stack = flax_module._context.module_stack  # (the callee is on top while it is intercepted)
    return stack[-2] if len(stack) > 1 else None


def _of(module: nn.Module, context) -> bool:
    """Whether an intercepted call is one ``module``'s own code makes to another module (not
    its own methods, ``param`` included; not a callee's lazy ``setup``)."""
    return context.module is not module and context.method_name != "setup" and \
        _caller() is module


@contextlib.contextmanager
def recorded(module: nn.Module):
    """Within it, each call ``module``'s code makes to another module is appended to the list
    it yields (:class:`Call`), as its caller sees it: the recorder is the outermost
    interceptor."""
    calls: list[Call] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if _of(module, context):
            leaves, treedef = jax.tree.flatten(out)
            calls.append(Call(context.module.name, type(context.module), context.method_name,
                              tuple(_arrays((args, kwargs))), tuple(leaves), treedef))
        return out

    storage = flax_module._global_interceptor_stack._storage
    storage.insert(0, record)
    try:
        yield calls
    finally:
        storage.remove(record)


@contextlib.contextmanager
def answered(module: nn.Module, calls: list[Call], outs: list):
    """Within it, no interceptor runs, no intermediate is captured, and the calls ``module``'s
    code makes to other modules are not made: the ``i``-th returns ``outs[i]`` (the leaves of
    what ``calls[i]`` returned) when it is the same module and method (else
    :class:`Unanswered`). Yields the list of the array leaves each call was given, in order."""
    given: list = []

    def answer(next_fun, args, kwargs, context):
        if not _of(module, context):
            return next_fun(*args, **kwargs)
        i = len(given)
        if i >= len(calls) or not calls[i].matches(context.module, context.method_name):
            raise Unanswered(f"its code calls {type(context.module).__name__}"
                             f".{context.method_name} where it did not as written")
        given.append(_arrays((args, kwargs)))
        return jax.tree.unflatten(calls[i].treedef, outs[i])

    stack = flax_module._global_interceptor_stack
    saved = list(stack._storage)
    stack._storage[:] = [answer]
    flax_module._context.capture_stack.append(None)  # (captured as written, not again)
    try:
        yield given
    finally:
        stack._storage[:] = saved
        flax_module._context.capture_stack.pop()
    if len(given) != len(calls):
        raise Unanswered(f"its code made {len(calls)} calls to other modules as written, "
                         f"{len(given)} traced")


def _arrays(tree) -> list:
    return [a for a in jax.tree.leaves(tree) if isinstance(a, (jax.Array, np.ndarray))]


def results(closed, count: int, calls: list[Call]):
    """A trace made under :func:`answered`, whose outputs are the module's ``count`` results
    then the arrays each of ``calls`` was given: ``(the trace of its results alone, its
    constants its first inputs, the inputs (indices) that compute what the calls were given,
    {variable: value} of those the calls were given as written)``."""
    from jax._src.interpreters import partial_eval as pe

    flat = pe.convert_constvars_jaxpr(closed.jaxpr)  # (its constants its first inputs)
    outs = len(flat.outvars)
    _, used = pe.dce_jaxpr(flat, [False] * count + [True] * (outs - count))
    seeds = {v: a for v, a in zip(flat.outvars[count:], [a for c in calls for a in c.args],
                                  strict=True) if not isinstance(v, jcore.Literal)}
    jaxpr, _ = pe.dce_jaxpr(flat, [True] * count + [False] * (outs - count), True)
    return jcore.ClosedJaxpr(jaxpr, ()), {i for i, u in enumerate(used) if u}, seeds


def check_shape(module: nn.Module, name: str, value, init_fn, init_args, init_kwargs) -> None:
    """Flax's ``ScopeParamShapeError`` where ``module``'s parameter ``name`` holds ``value`` of
    another shape than ``init_fn`` makes (a parameter shaped by the batch, run at another)."""
    shaped = nn.meta.unbox(jax.eval_shape(lambda: init_fn(jax.random.key(0), *init_args,
                                                            **init_kwargs)))
    if np.shape(nn.meta.unbox(value)) != tuple(shaped.shape):
        raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, shaped.shape,
                                               np.shape(nn.meta.unbox(value)))


@contextlib.contextmanager
def attempt(module: nn.Module, probe: bool = False):
    """A trace of ``module``'s own code, ended by the call of another module in its scope (a
    module running others is no layer; ``nn.share_scope`` hides them from its variables),
    that leaves its scope as it found it when it fails (its call then runs as written), or
    always for a ``probe``: no name reserved, no random stream drawn, no submodule named."""
    before = scope_state(module)
    TRACING.append(module)
    try:
        yield
    except BaseException:
        rewind(module, before)
        raise
    else:
        if probe:
            rewind(module, before)
    finally:
        TRACING.pop()


def call_key(module: nn.Module, args, kwargs):
    """What a compact call's trace depends on: the module's class and configuration, its
    arguments' shapes and dtypes and its static arguments (``None``: not hashable)."""
    try:
        leaves, treedef = jax.tree.flatten((args, kwargs))
        key = (type(module), repr(module.clone(parent=None)), str(treedef), tuple(
            (tuple(a.shape), str(a.dtype)) if isinstance(a, (jax.Array, np.ndarray)) else a
            for a in leaves))
        hash(key)
        return key
    except Exception:  # noqa: BLE001 - traced every time
        return None


def scope_state(module: nn.Module):
    """What a call of ``module`` changes in its scope, as it is now: the names reserved and
    made, the random counters (:func:`rewind` puts it back)."""
    state = module._state
    return ({n: set(c) for n, c in module.scope.reservations.items()},
            copy.deepcopy(module.scope.rng_counters), dict(state.autoname_cursor),
            dict(state.children))


def rewind(module: nn.Module, saved) -> None:
    """``module``'s scope back to ``saved`` (:func:`scope_state`)."""
    reserved, counters, cursor, children = saved
    module.scope.reservations.clear()
    module.scope.reservations.update({n: set(c) for n, c in reserved.items()})
    restore(module.scope.rng_counters, counters)
    module._state.autoname_cursor, module._state.children = dict(cursor), dict(children)


def restore(current: dict, saved: dict) -> None:
    """``current`` (nested dicts of counters, shared with child scopes) back to ``saved``, in
    place."""
    for k in [k for k in current if k not in saved]:
        del current[k]
    for k, v in saved.items():
        if isinstance(v, dict) and isinstance(current.get(k), dict):
            restore(current[k], v)
        else:
            current[k] = v
