"""Convs and dense products written by hand in linen modules, run as Flax layers so that they
can be split. Two ways of writing them are seen in others' models:

* parameters declared in ``setup`` (AlgoPerf's Conformer and DeepSpeech subsample with
  ``self.kernel = self.param("kernel", ...)``, then ``lax.conv_general_dilated(inputs,
  self.kernel, ...)`` among other work in ``__call__``: a ReLU, a mask, a second output;
  google-deepmind/recurrentgemma's ``Einsum``: ``w`` and ``b``, ``jnp.einsum(eqn, x, w) + b``);
* a compact ``__call__`` declaring its parameters under any names and computing with them
  (flaxmodels' StyleGAN2 layers: ``w = self.param("weight", ...)`` scaled by a constant, the
  equalized learning rate, then a conv or ``jnp.matmul``, a bias, an activation; score_sde's
  ``NIN``: ``W``, ``b`` and an einsum; t5x's and MaxText's ``DenseGeneral``: a kernel of
  several input or output axes in ``lax.dot_general``; google-deepmind/gemma's ``Einsum``,
  called with its equation, two of them sharing their parent's scope in its feed-forward).

Inside :func:`lrjax.linen_cells.as_sublayers` (every stage of the linen surgery and every call of
a :class:`lrjax.layers.LowRankModel`), for a module that is not Flax's or lrjax's:

* its parameters are recorded: a ``setup`` module's as declared (a ``kernel`` read or, in an
  init, made without reserving its name, as the layer reads it under that name; one holding
  submodules runs as a compact one calling others does: CLIP's tower and its ``proj``), a
  compact module's (its own variables in other collections are fine: t5x's sown ``params_axes``,
  which its run as written sows in an init; a replayed call sows nothing; one that calls other
  modules runs as written first, those calls recorded and answered in its trace, those given
  what a product computes made from its replay, :mod:`lrjax.linen_calls`) read or made and
  stored as Flax's ``param`` makes them, from the same random stream, without reserving their
  names;
* its ``__call__`` is traced (``jax.make_jaxpr``, calls inlined; a call that cannot be, e.g.
  one drawing randomness, runs as written, its scope as it was) and, when one parameter's one
  use is a product that a Flax layer computes (:mod:`lrjax.written_products`: a conv in
  any layout, a PyTorch port's ``NCHW`` / ``OIHW`` run channels last around the layer, a
  ``dot_general`` of some of the data's axes with some of the kernel's,
  through scales, casts, transposes and reshapes), the traced program is replayed with that
  product computed by an ``nn.Conv`` (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``)
  without bias bound to the module's own scope, reading the module's parameter (under its
  own name, scaled as the code scales it: a re-parametrization the closed form factors as it
  factors BiT's standardized kernels). lrjax finds, costs, calibrates and splits it as that
  layer, named by the module's path, its pair's variables ``vertical/kernel`` and
  ``horizontal/kernel`` in the module's scope next to the module's other variables (its bias
  stays its own); in a scope shared with others (``nn.share_scope``), or when several of the
  module's parameters are products so (a hand-written attention's ``wq``, ``wk``, ...), each
  layer is named by its kernel (``{path}/{name}``) and its pair takes that variable's place;
  a parameter whose slices are products of the same data (big_vision's Gemma gating,
  ``jnp.dot(x, w[0])``, ``jnp.dot(x, w[1])``) is one layer of the whole parameter, and so is
  one whose one-index slices each multiply other data alike (a loop over experts, ``x_i @
  w[i]``: an ``nn.Einsum`` of their data stacked, computed at the first slice once every
  slice's data is, :func:`lrjax.replay.waiting`). The rest of the module's code runs as
  written, on the layers' outputs (a lifted transform of its own code, ``nn.remat(f)(self, x)``,
  included). A call found to hold no such product (a norm's, a layer scale's) runs as written
  at once the next times it is made alike. Its class may be one Flax's lifted transforms made.

A kernel used in any other way (multiplied by data, in two products other than such slices,
per head) stays in its own code's products, a fixed cost (:mod:`lrjax.own_code`); a decomposed
module that can no longer be traced so is a ``ValueError`` naming it. In an init under lrjax a
module's variables are the ones its own code would make (same values, same names).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np
from jax.extend import core as jcore

from lrjax import linen_calls, replay
from lrjax.linen_placeholders import (
    PAIR,
    compact_param,
    has_pair,
    placeholders,
    setup_param,
    written_pair,
)
from lrjax.reparametrized import companions
from lrjax.written_products import NotALayer as _Ineligible
from lrjax.written_products import (
    is_pair,
    is_written_layer,
    kernel_name,
    layer_for,
    piece_of,
    product_of,
    run_in_layout,
    set_aside,
    stored_kernel,
)

__all__ = ["as_layer", "runs_as_layer", "is_written_layer", "kernel_name", "companions",
           "drop_applied_apart"]

_STATE = "_lrjax_setup_params"  # {name: (value, is a placeholder)} its setup declared
_PARAMS = "_lrjax_written_params"  # (made, given) while a compact module's call is hooked
_CHILD = "_lrjax_written_layers"  # {parameter: the Flax layer its product runs as}
_HOOKED: dict[type, type] = {}
_RUNNING: set[int] = set()  # the modules whose setup or call this interceptor is running
_AS_WRITTEN: set = set()  # the compact calls (class, configuration, arguments) holding no product
_HOLDERS: set = set()  # the compact calls making submodules, whose split pairs are theirs
_HOLDS = object()  # what _split_kernel finds for such a call
_FED: dict = {}  # {a holder's call: its calls given a product's output, made from the replay}
_MAKERS: set = set()  # the calls of setup modules whose compact call makes submodules
_SHARED = "_lrjax_shared_params"  # a lifted clone's: the traced module's _STATE
_CHECK_SCOPE = getattr(nn.module, "TestScope", ())  # Flax's scope for a lifted setup's check


def _compact(cls: type) -> bool:
    """A module without ``setup``: its parameters, if any, are declared in its calls (by
    ``self.param``, or a helper of its codebase: t5x's ``param_with_axes``)."""
    return cls.setup is nn.Module.setup


@functools.cache
def _eligible_class(cls: type) -> bool:
    """A module class of the user's own, not derived from a Flax layer (a subclass of
    ``nn.Conv`` is split or kept as one: :func:`lrjax.layers.delegated_base`), or one Flax's
    lifted transforms made of it (``nn.jit(Linear)``: the instance held runs its ``setup``)."""
    return not [k for k in cls.__mro__ if k.__module__.partition(".")[0] in ("flax", "lrjax")
                and k not in nn.Module.__mro__ and k.__module__ != nn.transforms.__name__]


def _eligible(module: nn.Module) -> bool:
    """An eligible class bound to a scope of the model (not Flax's check of a setup)."""
    return _eligible_class(type(module)) and not isinstance(module.scope, _CHECK_SCOPE)


def runs_as_layer(module: nn.Module) -> bool:
    """Whether ``module``'s own call may run with its product as a Flax layer bound to its
    scope: the layer, not the module, is the one named by its path (costed, calibrated and
    split)."""
    return (_STATE in module.__dict__ and not _holds_submodules(module)) or (
        _eligible(module) and _compact(type(module)))


def _holds_submodules(module: nn.Module) -> bool:
    """Whether a ``setup`` module holds other modules (declared in its ``setup`` or given as
    fields): its call runs them, so its own code is no layer (a trace of it would hold theirs,
    and set them up inside it: HF BART's top module declares a bias and runs the model)."""
    return any(isinstance(c, nn.Module) for c in module._state.children.values())


def _shares_scope(module: nn.Module) -> bool:
    """Whether ``module`` computes in its parent's scope (``nn.share_scope``: Gemma's
    feed-forward shares its own with its two products), the parent a module of the user's."""
    parent = module.parent
    return isinstance(parent, nn.Module) and parent.scope is not None and \
        _eligible(parent) and tuple(module.scope.path) == tuple(parent.scope.path)


def _hooked(cls: type) -> type:
    """``cls`` with a ``param`` that reserves no name: a ``setup`` module's ``kernel``
    (:func:`_kernel`), or, while a compact module's call is hooked (``_PARAMS``), every
    parameter: the traced one given, else read or made and recorded."""
    if cls not in _HOOKED:
        def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
            if name in self.__dict__.get(_SHARED, {}):  # (a lifted clone's: as the traced one)
                return self.__dict__[_SHARED][name][0]
            hook = self.__dict__.get(_PARAMS)
            if hook is not None:
                return compact_param(self, hook, name, init_fn, init_args, init_kwargs, unbox)
            def flax_param():
                return super(hooked, self).param(name, init_fn, *init_args, unbox=unbox,
                                                 **init_kwargs)

            made = setup_param(self, name, init_fn, init_args, init_kwargs, flax_param)
            if made is None:
                return flax_param()
            value = made[0]  # (a NumPy one, from a loaded tree, as the array a trace keeps)
            value = jax.device_put(value) if isinstance(value, np.ndarray) else value
            self.__dict__.setdefault(_STATE, {})[name] = (value, made[1])
            return value

        def sow(self, *args, **kwargs):  # traced: what its run as written sows, it sowed
            hook = self.__dict__.get(_PARAMS)
            if hook is not None and hook[1] is not None:
                return False
            return super(hooked, self).sow(*args, **kwargs)

        hooked = type(cls.__name__, (cls,), {"param": param, "sow": sow,
                                             "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__})
        _HOOKED[cls] = hooked
    return _HOOKED[cls]


@contextlib.contextmanager
def _swapped(module: nn.Module, hook=None):
    """``module`` of its hooked class (:func:`_hooked`), with ``hook`` for a compact call."""
    own = type(module)
    object.__setattr__(module, "__class__", _hooked(own))
    if hook is not None:
        object.__setattr__(module, _PARAMS, hook)
    try:
        yield
    finally:
        object.__setattr__(module, "__class__", own)
        module.__dict__.pop(_PARAMS, None)


def as_layer(next_fun, args, kwargs, context):
    """A method interceptor: an eligible module's ``setup`` with the hooked ``param``, its
    ``__call__`` with its product as a Flax layer (the module's docstring)."""
    module, method = context.module, context.method_name
    tracing = linen_calls.TRACING
    if tracing and linen_calls.lifted_clone(module, tracing[-1]):  # (its own code's: its setup
        object.__setattr__(module, _SHARED, tracing[-1].__dict__.get(_STATE, {}))  # reads what
        with _swapped(module) if method == "setup" else contextlib.nullcontext():  # the traced
            return next_fun(*args, **kwargs)  # module read)
    if tracing and module is not tracing[-1] and module.scope is not None and \
            tuple(module.scope.path) == tuple(tracing[-1].scope.path):
        raise _RunsOthers(f"its call runs {type(module).__name__} in its scope "
                          "(nn.share_scope)")
    if method == "param" or id(module) in _RUNNING or \
            not _eligible(module):  # (nested: the interceptor is entered once per stage)
        return next_fun(*args, **kwargs)
    _RUNNING.add(id(module))
    try:
        if method == "setup":
            with _swapped(module):
                return next_fun(*args, **kwargs)
        state = module.__dict__.get(_STATE)
        if state is None:
            if method == "__call__" and _compact(type(module)):
                return _compact_call(module, next_fun, args, kwargs)
            return next_fun(*args, **kwargs)
        if method == "__call__":
            if not _holds_submodules(module):
                return _replayed(module, next_fun, args, kwargs)
            return _holder_call(module, next_fun, args, kwargs, state)
        if any(placeholder for _, placeholder in state.values()):
            raise ValueError(f"layer {'/'.join(module.scope.path)!r} was split as the product "
                             f"of its kernel that its __call__ computes; its method {method!r} "
                             "would need the kernel it no longer has: call it as it was "
                             "decomposed")
        _stored(module, _values(state))  # another method, or a module running others, as written
        return next_fun(*args, **kwargs)
    finally:
        _RUNNING.discard(id(module))


def _stored(module: nn.Module, made: dict) -> None:
    """In an init, parameters stored as the module's own ``param`` would have stored them
    (``made``: ``{name: value}``; a setup module's ``kernel`` alone was not stored yet)."""
    if module.is_initializing():
        for name, value in made.items():
            if not module.scope.has_variable("params", name):
                module.scope.put_variable("params", name, value)


def _values(state: dict) -> dict:
    """``{name: value}`` of a setup module's recorded ``{name: (value, placeholder)}``."""
    return {name: value for name, (value, _) in state.items()}


def _replayed(module: nn.Module, next_fun, args, kwargs):
    """A ``setup`` module's call with the product of one of its parameters as a Flax layer (or
    as written, at once when the same call was found to hold none); a holder's
    (:func:`_holder_call`) when its compact call makes submodules (a ViT's input layer: a class
    token declared in ``setup``, its patch ``nn.Conv`` made in its call)."""
    state = module.__dict__[_STATE]
    split = any(placeholder for _, placeholder in state.values())
    _stored(module, _values(state))  # (in an init: the layer, or its own code, reads it)
    key = linen_calls.call_key(module, args, kwargs)
    if not split and key is not None and key in _AS_WRITTEN:
        return next_fun(*args, **kwargs)
    if key is not None and key in _MAKERS:
        return _holder_call(module, next_fun, args, kwargs, state)
    arrays, call = replay.array_call(next_fun, args, kwargs)
    uses: dict = {}
    children = set(module._state.children)
    try:
        with linen_calls.attempt(module):  # (no product found: its scope as it was)
            closed, shapes = replay.traced_inlined(call, *arrays, calls=True)
            if set(module._state.children) - children:  # (their calls traced: not made)
                raise _MakesSubmodules
            named = {id(value): name for name, (value, _) in state.items()}
            for var, const in zip(closed.jaxpr.constvars, closed.consts, strict=True):
                if id(const) in named:
                    uses.setdefault(named[id(const)], []).append(var)
            once = [(n, vs[0]) for n, vs in uses.items() if len(vs) == 1]  # (twice: none)
            products = _products(closed, once, closed.jaxpr.invars)
    except _MakesSubmodules:
        if key is not None:
            _MAKERS.add(key)
        return _holder_call(module, next_fun, args, kwargs, state)
    except Exception as e:  # noqa: BLE001 - its own code runs as written (a fixed cost)
        if split:
            raise _no_longer(module, e) from None
        if key is not None and len(uses) == len(state):  # (each parameter seen in the trace)
            _AS_WRITTEN.add(key)
        return next_fun(*args, **kwargs)
    return _run_as_layer(module, closed, shapes, arrays, products, _values(state))


def _no_longer(module, e) -> ValueError:
    return ValueError(f"layer {'/'.join(module.scope.path)!r} was split as the product of its "
                      f"kernel that its code computes, but its call no longer traces so: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _own_params(module: nn.Module) -> dict | None:
    """A compact module's stored parameters ``{name: value}`` (a split one's pair included),
    or ``None`` when it holds a submodule's variables (its own in other collections are
    fine: t5x's ``params_axes``, which its ``param_with_axes`` sows)."""
    held = module.variables
    params = dict(held.get("params", {}))
    if any(hasattr(v, "items") for c, vs in held.items() if c != "params" for v in vs.values()):
        return None
    nested = {n for n, v in params.items() if hasattr(v, "items")}
    return params if not nested or nested == set(PAIR) or all(  # (pairs in its parameters'
        written_pair(params[n]) for n in nested) else None  # places, not a submodule's)


def _compact_call(module: nn.Module, next_fun, args, kwargs):
    """A compact module's call with its product as a Flax layer (or as written, at once when
    the same call was found to hold none: a norm's, a layer scale's)."""
    initializing = module.is_initializing()
    own = None if initializing else _own_params(module)
    if not initializing and own is None:  # a submodule's variables: it calls others
        return _holder_call(module, next_fun, args, kwargs)
    if not initializing and not own:  # no parameter
        return next_fun(*args, **kwargs)
    arrays, call = replay.array_call(next_fun, args, kwargs)
    given = {} if initializing else {n: nn.meta.unbox(v) for n, v in own.items()
                                     if n not in PAIR and not is_pair(v)}
    key = linen_calls.call_key(module, args, kwargs)
    if key is not None and key in _HOLDERS:
        return next_fun(*args, **kwargs)
    split = None if initializing or not has_pair(module) else \
        _split_kernel(module, call, arrays, given)
    if split is _HOLDS:  # (the pairs are its submodules')
        if key is not None:
            _HOLDERS.add(key)
        return next_fun(*args, **kwargs)
    if key is not None and key in _AS_WRITTEN and not split:
        return next_fun(*args, **kwargs)
    made, out = {}, None
    if initializing:  # as written, its parameters made, stored, not reserved
        as_written = linen_calls.Written(module, next_fun, args, kwargs,
                                         functools.partial(_swapped, module, (made, None)))
        out, calls = as_written(_FED.get(key))
        if made and calls:  # it calls other modules too
            return _held(module, call, arrays, (out, calls, as_written), (made, set()), key)
        if not made or _own_params(module) is None:  # nothing declared, or a submodule
            return out
        given = {n: nn.meta.unbox(v) for n, v in made.items()}
    given.update(split or {})
    names = list(given)

    def body(values, *arrays):
        with _swapped(module, (None, dict(zip(names, values, strict=True)))):
            return call(*arrays)

    try:
        with linen_calls.attempt(module):  # (no product found: its scope as it was)
            closed, shapes = replay.traced_inlined(body, [given[n] for n in names], *arrays,
                                                     calls=True)
            products = _products(closed, zip(names, closed.jaxpr.invars, strict=False),
                                 closed.jaxpr.invars[len(names):])
    except Exception as e:  # noqa: BLE001 - its own code runs as written (a fixed cost)
        if split:
            raise _no_longer(module, e) from None
        if key is not None:
            _AS_WRITTEN.add(key)
        return out if out is not None else next_fun(*args, **kwargs)
    return _run_as_layer(module, closed, shapes, [given[n] for n in names] + list(arrays),
                         products, {**given, **made})


def _holder_call(module: nn.Module, next_fun, args, kwargs, state=None):
    """A module's call that calls other modules too (NesT's attention: ``nn.DenseGeneral``
    layers, then its own ``proj_kernel`` in an einsum; or a ``setup`` module's, its parameters
    in ``state``: CLIP's vision tower and its ``proj``): run as written, those calls recorded
    (a split kernel read as zeros), then its own products run as layers (:func:`_held`)."""
    if state is None and not any(not hasattr(v, "items") or written_pair(v)
                                 for v in module.variables.get("params", {}).values()):
        return next_fun(*args, **kwargs)  # (no parameter of its own)
    made, split = {}, set()
    if state is not None:  # (its parameters read or made in its setup)
        _stored(module, _values(state))
        made.update(_values(state))
        split.update(n for n, (_, placeholder) in state.items() if placeholder)
    key = linen_calls.call_key(module, args, kwargs)
    as_written = linen_calls.Written(module, next_fun, args, kwargs, contextlib.nullcontext if
                                     state is not None else functools.partial(
                                         _swapped, module, (made, None, split)))
    out, calls = as_written(_FED.get(key))
    if not split and not any(c.answered for c in calls) and (  # (no call: its submodules
            not made or (key is not None and key in _AS_WRITTEN)):  # applied apart, say)
        return out
    arrays, call = replay.array_call(next_fun, args, kwargs)
    return _held(module, call, arrays, (out, calls, as_written), (made, split), key,
                 state is not None)


def _held(module: nn.Module, call, arrays, ran, run, key, declared=False):
    """A holder's output with its own products as layers, from its run as written (``ran``:
    its output, the calls it made, a function running it again; ``run``: the parameters it
    read or made, the names of those split): its own code traced alone, each call answered
    with what it returned (:mod:`lrjax.linen_calls`). A call given what a product computes
    (open_clip's attention: ``x @ in_proj_weight.T``, then its ``out_proj`` layer) is made
    from the replay, on the layer's output; its run as written makes it no more (run again so
    the first time: nothing is made twice). Nothing found: its output as written."""
    out, calls, as_written = ran
    made, split = run
    given = {n: nn.meta.unbox(v) for n, v in made.items()}
    names, outs = [] if declared else list(given), [list(c.leaves) for c in calls]

    def body(values, outs, *arrays):  # (a setup module's parameters: constants of the trace)
        with contextlib.nullcontext() if declared else _swapped(
                module, (None, dict(zip(names, values, strict=True)))), \
                linen_calls.answered(module, calls, outs) as fed:
            result = call(*arrays)
        return result, fed

    try:
        with linen_calls.attempt(module, probe=True):  # (its names and draws as they were)
            linen_calls.rewind(module, as_written.scope)
            closed, shapes = replay.traced_inlined(body, [given[n] for n in names], outs,
                                                     *arrays, calls=True)
        consts, count = list(closed.consts), len(jax.tree.leaves(shapes[0]))
        flat = linen_calls.opened(closed)
        ids = {id(v): n for n, v in given.items()}
        at = {ids[id(c)]: i for i, c in enumerate(consts) if id(c) in ids} if declared else \
            {n: len(consts) + i for i, n in enumerate(names)}
        start = len(consts) + len(names)
        found = _products(jcore.ClosedJaxpr(flat, ()), [(n, flat.invars[i]) for n, i in at.items()],
                          flat.invars[start:])
        live = linen_calls.live_calls(flat, count, calls, start, [
            v for _, p in found for e, *_ in p.slices or ((p.eqn,),) for v in e.outvars])
        if live != {i for i, c in enumerate(calls) if c.answered}:  # (made as written)
            answer = linen_calls.answers(calls, live)
            previous, (out, calls) = calls, as_written(answer, again=True)
            linen_calls.check_same(previous, calls)  # (else: as written, once more)
            outs = [list(c.leaves) for c in calls]
            if key is not None:
                _FED[key] = answer
        closed, fed, seeds = linen_calls.results(flat, count, calls, live)
        products = _products(closed, [(n, flat.invars[i]) for n, i in at.items() if i not in fed],
                             flat.invars[start:])
        if split - {n for n, p in products} - {c for _, p in products for c in companions(p.steps)}:
            raise _Ineligible(f"its kernels {sorted(split)} are no longer products of a layer")
    except Exception as e:  # noqa: BLE001 - as written (a fixed cost)
        if split:
            raise _no_longer(module, e) from None
        if key is not None:
            _AS_WRITTEN.add(key)
            _FED.pop(key, None)
        return as_written(again=True)[0] if any(c.answered for c in calls) else out
    inputs = consts + [given[n] for n in names] + [a for o in outs for a in o] + list(arrays)
    return _run_as_layer(module, closed, shapes[0], inputs, products, given, nested=True,
                         seeds=seeds, live=linen_calls.Live(flat, count, calls, start, live))


def _split_kernel(module: nn.Module, call, arrays, given):
    """``{name: zeros}`` in place of the kernels that pairs in ``module``'s scope replaced,
    their names and shapes from a trace reading the parameters ``given``; ``{}`` when the
    module reads none that is missing (another module sharing its scope was split);
    :data:`_HOLDS` when its call makes submodules (the pairs are theirs)."""
    missing, children, made = {}, module._state.children, []
    before = set(children)
    try:
        with _swapped(module, (missing, given)), linen_calls.attempt(module, probe=True):
            try:
                jax.make_jaxpr(call)(*arrays)
            finally:
                made.append(bool(set(children) - before))
    except _RunsOthers:
        return {}
    except Exception as e:  # noqa: BLE001
        if made and made[0]:
            return _HOLDS
        raise _no_longer(module, e) from None
    if made[0]:
        return _HOLDS
    return placeholders(module, missing)


class _RunsOthers(_Ineligible):
    pass


class _MakesSubmodules(_Ineligible):
    pass


def _products(closed, candidates, inputs) -> list:
    """``[(name, product), ...]`` (:func:`lrjax.written_products.product_of`, their data
    computed from ``inputs``) of the parameters among ``candidates`` (``(name, var)`` of
    ``closed``) whose one use is a product as a Flax layer computes it (at least one)."""
    found, candidates = [], list(candidates)
    for name, var in candidates:
        try:  # (a kernel normalized by its statistics may read the others: a gain)
            product = product_of(closed, var, inputs, experts=True,
                                 companions={v: n for n, v in candidates if v is not var})
        except _Ineligible:
            continue
        if product.eqn.primitive.name != "ragged_dot_general":  # (no linen layer computes it)
            found.append((name, product))
    if not found:
        raise _Ineligible("no parameter used in one product")
    return found


def _run_as_layer(module, closed, shapes, inputs, products, kernels, nested=False, seeds=None,
                  live=None):
    """``closed`` replayed on ``inputs`` with each of ``products`` (``(name, Product)``)
    computed by a layer of the module's (``kernels``: ``{name: value}``, for their dtypes);
    the steps to a kernel are its layer's (skipped here: a split kernel's zeros are never
    computed with). One product: its layer is named by the module's path; several (a
    hand-written attention's ``wq``, ``wk``, ...), or in a shared scope: each is named by its
    kernel, ``{path}/{name}``. A sliced parameter's layer runs once, each slice's product
    taken from its output. ``seeds``: ``{variable: value}`` computed already (a holder's
    arguments to its calls, as written), not again; ``live``: the calls made from the replay
    (:class:`lrjax.linen_calls.Live`; what they return is no input)."""
    nested = nested or _shares_scope(module) or len(products) > 1
    layers = module.__dict__.setdefault(_CHILD, {})
    replaced, skipped = {}, {}
    for name, product in products:
        if name not in layers:
            layers[name] = layer_for(product, kernels[name], module.scope, name,
                                     named_by_kernel=nested)
        for eqn, *span in product.slices or ((product.eqn, None, None),):
            replaced[id(eqn)] = (layers[name], product, span)
        skipped.update({id(e): position for e, position in product.chain})
    computed, env = {}, {}

    def rule(e, ins, here):
        if seeds and e.outvars and all(v in seeds for v in e.outvars):
            return [seeds[v] for v in e.outvars]  # (a holder's: computed as written)
        if id(e) not in replaced:  # (a step to a kernel: passed on, never computed with)
            return [ins[skipped[id(e)]]] * len(e.outvars) if id(e) in skipped else \
                replay.statistic_call(e, ins)
        layer, product, span = replaced[id(e)]
        typed = e.outvars[0].aval.dtype  # (the product's own: a layer computing in its
        if product.sliced is None:  # parameters' dtype where the code cast both down)
            with linen_calls.uncaptured():  # (the module's call is, as written)
                return [run_in_layout(layer, product, ins[product.data]).astype(typed)]
        if id(layer) not in computed:  # (every piece's data is the same, or stacked: experts)
            data = jax.numpy.stack([env[eqn.invars[product.data]] for eqn, *_ in
                                    product.slices]) if product.stacked else ins[product.data]
            with linen_calls.uncaptured():  # (a live call it reads, made before: captured)
                computed[id(layer)] = layer(data)
        return [piece_of(product, computed[id(layer)], *span).astype(typed)]

    params = module.scope._mutable_collection("params") if module.is_initializing() else None
    if nested and params is not None:  # (a pair may take a kernel's name: the kernel held
        for name, _ in products:  # by its layer meanwhile)
            if not is_pair(params.get(name)):
                set_aside(layers[name], params.pop(name, None))
    waits = {k: v for _, product in products for k, v in product.waits.items()}
    jaxpr = closed.jaxpr
    if live is not None and live.owner:
        for k, v in live.waits(jaxpr).items():
            waits[k] = [*waits.get(k, ()), *v]
        env = live.env()
        inputs = [a for v, a in zip(jaxpr.invars, inputs, strict=True) if v not in live.owner]
        jaxpr = jaxpr.replace(invars=[v for v in jaxpr.invars if v not in live.owner])
    outs = replay.run(replay.waiting(jaxpr, waits), closed.consts, inputs, rule, env=env)
    if live is not None:
        live.finish(env)
    if nested and params is not None:
        for name, product in products:
            if name not in params:  # (no pair took its place)
                params[name] = stored_kernel(layers[name])
            set_aside(layers[name], None)
            for other in companions(product.steps) if is_pair(params[name]) else ():
                params.pop(other, None)  # (a gain its kernel's normalization read: the pair's)
    elif params is not None and has_pair(module):  # a decomposed model's init: the pair
        params.pop(products[0][0], None)  # (Flax deletes nothing)
        for name in companions(products[0][1].steps):  # (a gain its normalization read)
            params.pop(name, None)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs[:len(jax.tree.leaves(shapes))])


def drop_applied_apart(found: dict, owners: dict, reason: str) -> None:
    """Drop from ``found`` (``{path: site}``) the layers listed as applied apart (``reason``)
    by a module (``owners``: ``{path: that module's path}``) whose own code is a layer now: the
    kernel it gives them is its product's (a weight-normalized conv's ``self.conv.apply``)."""
    written = {s.path.rsplit("/", 1)[0] if s.named_by_kernel else s.path
               for s in found.values() if s.written and s.candidate}
    for path in [p for p, s in found.items() if s.skip == reason and owners.get(p) in written]:
        del found[path]
