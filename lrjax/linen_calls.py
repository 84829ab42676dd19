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

A call given what a product computes (open_clip's attention: ``x @ in_proj_weight.T``, then
its ``out_proj`` layer; any call after it, its dropout, its norm) is *live*
(:func:`live_calls`): the replay makes it on the layer's output (:class:`Live`). Its run as
written must not make it too (its dropout would draw twice, its batch statistics move twice,
its calibration statistics and captured outputs count twice), so that run answers it with
zeros instead (:func:`recorded`'s ``answer``): from the first call of a module so on, whose run
as written is put back (its scope's names and random counters, the model's mutable
collections) and made again (:class:`Written`).

Flax's interceptor stack is reached through ``flax.linen.module``'s private
``_global_interceptor_stack`` and ``_context.module_stack`` (Flax 0.12): a recorder must see a
call as its caller does, before any other interceptor, and a trace must be seen by none.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import module as flax_module
from jax.extend import core as jcore

from lrjax.linen_unbound import applied_at

TRACING: list = []  # the modules whose own code is being traced

__all__ = ["Call", "Unanswered", "TRACING", "recorded", "answered", "uncaptured", "opened",
           "results", "live_calls", "Written", "answers", "check_same", "Live", "attempt",
           "check_shape", "call_key", "scope_state", "rewind", "restore", "collections_state",
           "put_back"]

_ARRAY = object()  # an array's place among a call's arguments (:attr:`Call.template`)


@dataclasses.dataclass(frozen=True)
class Call:
    """One call a module's code made to another module: the callee's name and class, the
    method, the arrays it was given, and the leaves (and structure) of what it returned; the
    callee itself and the call's arguments (``template``: their leaves, arrays ``_ARRAY``, and
    structure), to make it again (:meth:`made`)."""

    name: str | None
    kind: type
    method: str
    args: tuple
    leaves: tuple
    treedef: object
    callee: nn.Module | None = None
    template: tuple = ()
    answered: bool = False  # (answered with zeros, not made: :func:`recorded`)

    def matches(self, module: nn.Module, method: str) -> bool:
        return (module.name, type(module), method) == (self.name, self.kind, self.method)

    def made(self, arrays) -> list:
        """The leaves of what the call returns made again, given ``arrays`` in place of the
        arrays it was given (its other arguments as they were)."""
        leaves, treedef = self.template
        given = iter(arrays)
        args, kwargs = jax.tree.unflatten(treedef, [next(given) if a is _ARRAY else a
                                                    for a in leaves])
        out = getattr(self.callee, self.method)(*args, **kwargs)
        flat, treedef = jax.tree.flatten(out)
        if treedef != self.treedef or [np.shape(a) for a in flat] != [
                np.shape(a) for a in self.leaves]:
            raise Unanswered(f"its call of {self.kind.__name__}.{self.method} returned "
                             f"{jax.tree.map(np.shape, out)} made again, not as written")
        return flat


class Unanswered(ValueError):
    """A traced call that was not made as written (another module, method, or one more)."""


def _caller() -> nn.Module | None:
    stack = flax_module._context.module_stack  # (the callee is on top while it is intercepted)
    return stack[-2] if len(stack) > 1 else None


def _of(module: nn.Module, context) -> bool:
    """Whether an intercepted call is one ``module``'s own code makes to another module (not
    its own methods, ``param`` included, nor those of its clone a lifted transform of its own
    code runs; not a callee's lazy ``setup``; not a layer it applies apart with parameters it
    computes, :func:`detached`: that is its own code)."""
    return context.module is not module and context.method_name != "setup" and \
        _caller() is module and not lifted_clone(context.module, module) and \
        not detached(context.module, module)


def detached(callee: nn.Module, module: nn.Module) -> bool:
    """Whether ``callee`` runs in an ``apply`` (or ``init``) of its own that ``module``'s code
    makes, with the parameters it gives (a weight-standardized conv's ``conv.apply({"params":
    {"kernel": standardized, ...}}, x)``), not as a module of the model (nor as an unbound
    copy of one, :mod:`lrjax.linen_unbound`)."""
    scope = callee.scope
    return scope is not None and scope.parent is None and not scope.path and \
        scope is not module.scope and applied_at(callee) is None


def lifted_clone(other: nn.Module, module: nn.Module) -> bool:
    """Whether ``other`` is ``module`` as a lifted transform of its own code runs it
    (``nn.remat(f)(self, x)``: a clone of it, of its class, bound to a lifted scope at its
    path), not another module. (Classes compared by name: lrjax may swap either's class for a
    subclass of the same name while it runs.)"""
    return other is not module and other.scope is not None and module.scope is not None and \
        tuple(other.scope.path) == tuple(module.scope.path) and all(
            getattr(type(other), a) == getattr(type(module), a) for a in ("__module__", "__qualname__"))


@contextlib.contextmanager
def recorded(module: nn.Module, answer: dict | None = None):
    """Within it, each call ``module``'s code makes to another module is appended to the list
    it yields (:class:`Call`), as its caller sees it: the recorder is the outermost
    interceptor. ``answer``: ``{i: the structure and shapes of what the i-th call returns}``
    of the calls not made here but answered with zeros (a replay makes them: :class:`Live`)."""
    calls: list[Call] = []
    answer = answer or {}

    def record(next_fun, args, kwargs, context):
        if not _of(module, context):
            return next_fun(*args, **kwargs)
        i, callee = len(calls), context.module
        answering = i in answer and answer[i][0] == (callee.name, type(callee),
                                                     context.method_name)
        if answering:
            treedef, shapes = answer[i][1:]
            out = jax.tree.unflatten(treedef, [jnp.zeros(a.shape, a.dtype) for a in shapes])
            zeroed.add((id(callee), context.method_name))  # (its zeros: not captured)
        else:
            out = next_fun(*args, **kwargs)
        leaves, treedef = jax.tree.flatten(out)
        given, structure = jax.tree.flatten((args, kwargs))
        template = ([_ARRAY if _is_array(a) else a for a in given], structure)
        calls.append(Call(callee.name, type(callee), context.method_name,
                          tuple(_arrays((args, kwargs))), tuple(leaves), treedef, callee,
                          template, answering))
        return out

    zeroed: set = set()  # the calls answered, whose output Flax is yet to capture
    captures = flax_module._context.capture_stack
    own = captures[-1] if captures and callable(captures[-1]) else None

    def capture(callee, method):  # (Flax asks once the call returns, past the interceptors)
        if (id(callee), method) in zeroed:
            zeroed.discard((id(callee), method))
            return False
        return own(callee, method)

    storage = flax_module._global_interceptor_stack._storage
    storage.insert(0, record)
    if own is not None and answer:
        captures[-1] = capture
    try:
        yield calls
    finally:
        storage.remove(record)
        if own is not None and answer:
            captures[-1] = own


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
    try:
        with uncaptured():  # (captured as written, not again)
            yield given
    finally:
        stack._storage[:] = saved
    if len(given) != len(calls):
        raise Unanswered(f"its code made {len(calls)} calls to other modules as written, "
                         f"{len(given)} traced")


@contextlib.contextmanager
def uncaptured():
    """Within it, no module call's output is captured (``capture_intermediates``): a written
    product's layer, bound to its module's scope, is part of the module's call, captured as
    written."""
    flax_module._context.capture_stack.append(None)
    try:
        yield
    finally:
        flax_module._context.capture_stack.pop()


def _is_array(a) -> bool:
    return isinstance(a, (jax.Array, np.ndarray))


def _arrays(tree) -> list:
    return [a for a in jax.tree.leaves(tree) if _is_array(a)]


def opened(closed):
    """A trace's jaxpr with its constants its first inputs."""
    from jax._src.interpreters import partial_eval as pe

    return pe.convert_constvars_jaxpr(closed.jaxpr)


def _spans(calls: list[Call], start: int, what: str) -> list[slice]:
    spans = []
    for c in calls:
        spans.append(slice(start, start + len(getattr(c, what))))
        start = spans[-1].stop
    return spans


def _variables(flat, count: int, calls: list[Call], start: int):
    """Per call, the trace's variables of the arrays it was given (outputs from ``count``
    on) and of what it returned (inputs from ``start`` on)."""
    return ([flat.outvars[s] for s in _spans(calls, count, "args")],
            [flat.invars[s] for s in _spans(calls, start, "leaves")])


def live_calls(flat, count: int, calls: list[Call], start: int, sources) -> set[int]:
    """The calls (indices) that a trace made under :func:`answered` (``flat``: :func:`opened`,
    whose inputs from ``start`` on are what each call returned, whose outputs are the module's
    ``count`` results then the arrays each call was given) gives arrays that the variables
    ``sources`` compute, or that such a call's results compute: made again from a replay."""
    given, returned = _variables(flat, count, calls, start)
    live: set[int] = set()
    while True:
        tainted = set(sources) | {v for i in live for v in returned[i]}
        for e in flat.eqns:
            if any(v in tainted for v in e.invars if not isinstance(v, jcore.Literal)):
                tainted.update(e.outvars)
        now = {i for i, vs in enumerate(given)
               if any(v in tainted for v in vs if not isinstance(v, jcore.Literal))}
        if now == live:
            return live
        live = now


def results(flat, count: int, calls: list[Call], live=frozenset()):
    """``(the trace of the module's results, then the arrays the ``live`` calls are given,
    the inputs (indices) that compute what the other calls were given, {variable: value} of
    those as given as written)`` of ``flat`` (:func:`live_calls`)."""
    from jax._src.interpreters import partial_eval as pe

    spans = _spans(calls, count, "args")
    other = [False] * len(flat.outvars)
    kept = [True] * count + [False] * (len(flat.outvars) - count)
    for i, span in enumerate(spans):
        for j in range(span.start, span.stop):
            (kept if i in live else other)[j] = True
    _, used = pe.dce_jaxpr(flat, other)
    seeds = {v: a for i, (span, c) in enumerate(zip(spans, calls, strict=True)) if i not in live
             for v, a in zip(flat.outvars[span], c.args, strict=True)
             if not isinstance(v, jcore.Literal)}
    jaxpr, _ = pe.dce_jaxpr(flat, kept, True)
    return jcore.ClosedJaxpr(jaxpr, ()), {i for i, u in enumerate(used) if u}, seeds


class Written:
    """``module``'s call as written (``next_fun`` on ``args``, ``kwargs``), within ``hooked()``,
    its calls to other modules recorded (those in ``answer`` answered with zeros:
    :func:`recorded`): ``(out, calls)``; ``again``: its scope and collections first put back
    as they were when this was made (:attr:`scope`: its scope then, :func:`scope_state`)."""

    def __init__(self, module: nn.Module, next_fun, args, kwargs,
                 hooked=contextlib.nullcontext):
        self.module, self.call, self.hooked = module, (next_fun, args, kwargs), hooked
        self.scope, self.collections = scope_state(module), collections_state(module)

    def __call__(self, answer: dict | None = None, again: bool = False):
        if again:
            rewind(self.module, self.scope)
            put_back(self.module, self.collections)
        next_fun, args, kwargs = self.call
        with self.hooked(), recorded(self.module, answer) as calls:
            return next_fun(*args, **kwargs), calls


def answers(calls: list[Call], live) -> dict:
    """:func:`recorded`'s ``answer`` for the ``live`` calls among ``calls``."""
    return {i: ((calls[i].name, calls[i].kind, calls[i].method), calls[i].treedef,
                [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in calls[i].leaves])
            for i in live}


def check_same(calls: list[Call], again: list[Call]) -> None:
    """:class:`Unanswered` unless the calls made ``again`` are ``calls`` (the same modules,
    methods, and shapes returned)."""
    def made(c):
        return c.name, c.kind, c.method, c.treedef, [np.shape(a) for a in c.leaves]

    if [made(c) for c in calls] != [made(c) for c in again]:
        raise Unanswered("its code made other calls to other modules when run again")


class Live:
    """The ``live`` calls of a trace (:func:`live_calls`) made from its replay, each when what
    it returned is first read (:meth:`env`), on the arrays the replay computed for it."""

    def __init__(self, flat, count: int, calls: list[Call], start: int, live):
        given, returned = _variables(flat, count, calls, start)
        self.calls = calls
        self.given = {i: given[i] for i in live}
        self.owner = {v: i for i in live for v in returned[i]}
        self.returned = {i: returned[i] for i in live}

    def waits(self, jaxpr) -> dict:
        """``{id of an equation: variables}``: each equation reading what a live call returns
        after the arrays that call is given (:func:`lrjax.replay.waiting`)."""
        waits: dict = {}
        for e in jaxpr.eqns:
            for v in e.invars:
                if not isinstance(v, jcore.Literal) and v in self.owner:
                    waits.setdefault(id(e), []).extend(
                        a for a in self.given[self.owner[v]] if not isinstance(a, jcore.Literal))
        return waits

    def env(self) -> dict:
        """A replay's environment (:func:`lrjax.replay.run`'s ``env``) making a live call when
        what it returned is first read."""
        live = self

        class Env(dict):
            def __missing__(self, v):
                if v not in live.owner:
                    raise KeyError(v)
                live.make(self, live.owner[v])
                return self[v]

        return Env()

    def make(self, env: dict, i: int) -> None:
        arrays = [a.val if isinstance(a, jcore.Literal) else env[a] for a in self.given[i]]
        env.update(zip(self.returned[i], self.calls[i].made(arrays), strict=True))

    def finish(self, env: dict) -> None:
        """The live calls whose results nothing read, made (what they sow, they sowed)."""
        for i, returned in self.returned.items():
            if returned and returned[0] not in env:
                self.make(env, i)


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
    that leaves its scope and the model's mutable collections as it found them when it fails
    (its call then runs as written), or always for a ``probe``: no name reserved, no random
    stream drawn, no submodule named, nothing sown (a layer it calls, traced, sows what the
    trace computes: calibration's statistics would hold that trace's values)."""
    before, collections = scope_state(module), collections_state(module)
    TRACING.append(module)
    try:
        yield
    except BaseException:
        rewind(module, before)
        put_back(module, collections)
        raise
    else:
        if probe:
            rewind(module, before)
            put_back(module, collections)
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


def collections_state(module: nn.Module) -> dict:
    """The model's mutable collections other than ``params`` as they are now (their nested
    dicts copied, not their arrays): :func:`put_back`."""
    root = module.scope.root
    return {c: _copied(v) for c, v in root._variables.items()
            if c != "params" and root.is_mutable_collection(c)}


def put_back(module: nn.Module, saved: dict) -> None:
    """The model's mutable collections other than ``params`` back to ``saved``
    (:func:`collections_state`), in place: the dicts a scope holds stay (emptied), and a
    variable sown since under ``module`` is no longer reserved in its scope (sown again, as
    Flax's ``sow`` makes it: a setup module's scope is not rewound between its calls)."""
    root, removed = module.scope.root, []
    for c, v in root._variables.items():
        if c != "params" and root.is_mutable_collection(c) and isinstance(v, dict):
            restore(v, saved.get(c, {}), lambda made: {}, removed, (c,))
    here = tuple(module.scope.path)
    for c, *path, name in removed:
        owner = module if tuple(path[:len(here)]) == here else None
        for step in path[len(here):]:
            owner = owner._state.children.get(step) if owner is not None else None
        if isinstance(owner, nn.Module) and owner.scope is not None:
            owner.scope.reservations.get(name, set()).discard(c)
            if not owner.scope.reservations.get(name, True):
                del owner.scope.reservations[name]
            if owner._state.children.get(name) == c:
                del owner._state.children[name]


def _copied(tree):
    return {k: _copied(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def scope_state(module: nn.Module):
    """What a call of ``module`` changes in its scope, as it is now: the names reserved and
    made, the random counters (:func:`rewind` puts it back)."""
    state = module._state
    return ({n: set(c) for n, c in module.scope.reservations.items()},
            _copied(module.scope.rng_counters), dict(state.autoname_cursor),
            dict(state.children))


def rewind(module: nn.Module, saved) -> None:
    """``module``'s scope back to ``saved`` (:func:`scope_state`)."""
    reserved, counters, cursor, children = saved
    module.scope.reservations.clear()
    module.scope.reservations.update({n: set(c) for n, c in reserved.items()})
    restore(module.scope.rng_counters, counters)
    module._state.autoname_cursor, module._state.children = dict(cursor), dict(children)


def restore(current: dict, saved: dict, fresh=None, removed=None, path=()) -> None:
    """``current`` (nested dicts, shared with child scopes: random counters, or collections)
    back to ``saved``, in place; a nested dict made since stays (its scope holds it; a scope
    pushed again under its name takes it), as ``fresh(it)`` (by default: its counters back to
    zeros). ``removed``: a list the paths of the values taken out are appended to."""
    fresh = fresh or (lambda made: {c: 0 for c, v in made.items() if not isinstance(v, dict)})
    for k in [k for k in current if k not in saved]:
        if isinstance(current[k], dict):
            restore(current[k], fresh(current[k]), fresh, removed, (*path, k))
        else:
            del current[k]
            if removed is not None:
                removed.append((*path, k))
    for k, v in saved.items():
        if isinstance(v, dict) and isinstance(current.get(k), dict):
            restore(current[k], v, fresh, removed, (*path, k))
        else:
            current[k] = v
