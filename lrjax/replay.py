"""Replaying a traced program with some of its equations rewritten.

:func:`run` evaluates a jaxpr equation by equation under the current trace, each equation under
its own source line and layer (name stack), so what traces the replay (ONNX's translator, the
TFLite converter) still names the user's layer; a ``rule`` may compute an equation another way.
Three rewrites use it: :func:`lrjax.runtimes.litert_primitives` (ops the TFLite converter cannot
legalize, written with ones it can), :func:`in_float32` here (a model computing in bfloat16 or
float16, exported to runtimes whose CPU kernels are float32) and
:func:`lrjax.complex_real.replayed` (complex values as real pairs); :func:`rebuilt` rebuilds a
loop or conditional around bodies replayed so.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend import source_info_util

from lrjax import macs

__all__ = ["run", "call_jaxpr", "bind", "rebuilt", "array_call", "traced_inlined", "plain_call",
           "call_as_is", "statistic_call", "in_float32",
           "waiting", "lowest_precision", "ReplayError", "LOW_PRECISION"]

# a rule: (equation, its input values, its source info) -> output values, or None for the
# default (a call inlined, anything else bound as it is)
Rule = Callable[[jcore.JaxprEqn, list, object], "list | None"]

LOW_PRECISION = (np.dtype(jax.numpy.bfloat16), np.dtype(np.float16))


class ReplayError(ValueError):
    """A program that cannot be replayed as asked (:func:`in_float32`), naming the op."""


def call_jaxpr(eqn) -> jcore.ClosedJaxpr | None:
    """The body of a call-like equation (``jit``, ``custom_jvp_call``, ``remat``, ...; the
    primitives :data:`lrjax.macs.CALL_PRIMITIVES` names) as a closed jaxpr, else ``None``."""
    if eqn.primitive.name not in macs.CALL_PRIMITIVES:
        return None
    sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    if sub is None:
        return None
    return sub if hasattr(sub, "consts") else jcore.ClosedJaxpr(sub, ())


def run(jaxpr, consts, args, rule: Rule | None = None, caller=None,
        env: dict | None = None) -> list:
    """``jaxpr``'s outputs on ``args`` (its ``consts`` given), evaluated equation by equation
    with ``rule`` tried first on each; calls are inlined (``caller``: the source info of the
    call being inlined, whose line its equations take when they have none of the user's).
    ``env``: the dict to hold the values of ``jaxpr``'s variables as they are computed (a rule
    may read values other than its equation's operands there)."""
    env = {} if env is None else env
    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins, info = [read(v) for v in eqn.invars], eqn.source_info
        # each equation keeps its source line and layer (converter errors name them); an
        # inlined call's equations have the call's line
        own = info.traceback is not None and source_info_util.summarize(info)
        traceback = info.traceback if own or caller is None else caller.traceback
        names = caller.name_stack + info.name_stack if caller else info.name_stack
        here = info.replace(traceback=traceback, name_stack=names)
        with source_info_util.user_context(traceback, name_stack=names):
            outs = rule(eqn, ins, here) if rule is not None else None
            if outs is None:
                sub = call_jaxpr(eqn)
                outs = run(sub.jaxpr, sub.consts, ins, rule, here) if sub is not None \
                    else bind(eqn, ins)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def waiting(jaxpr, waits: dict):
    """``jaxpr`` with its equations in an order where each equation named in ``waits`` (``{id of
    the equation: variables}``) also comes after the equations computing those variables: the
    earliest traced equation that can run, each time (Kahn's algorithm). A loop over experts'
    pieces is replayed so, each piece after every piece's data (:class:`lrjax.written_products.
    Product`'s ``stacked``).

    Raises:
      ValueError: the waits make a cycle (an equation waiting for what it computes)."""
    if not waits:
        return jaxpr
    eqns = jaxpr.eqns
    producer = {v: i for i, e in enumerate(eqns) for v in e.outvars}
    users: dict[int, list[int]] = {}
    count = []
    for i, eqn in enumerate(eqns):
        needed = [v for v in eqn.invars if not isinstance(v, jcore.Literal)]
        sources = {producer[v] for v in (*needed, *waits.get(id(eqn), ())) if v in producer}
        for j in sources:
            users.setdefault(j, []).append(i)
        count.append(len(sources))
    ready = [i for i, n in enumerate(count) if n == 0]
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(eqns[i])
        for user in users.get(i, ()):
            count[user] -= 1
            if count[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(eqns):
        raise ValueError("equations waiting for what they compute")
    return jaxpr.replace(eqns=order)


def bind(eqn, ins, params=None) -> list:
    """``eqn``'s primitive applied to ``ins`` (with ``params``: instead of its own), as a list;
    a call's body run on them (a ``custom_jvp_call``, ``nn.relu``'s, cannot be bound again from
    its equation: its rules are not among its parameters)."""
    sub = call_jaxpr(eqn) if params is None else None
    if sub is not None:
        return run(sub.jaxpr, sub.consts, ins)
    outs = eqn.primitive.bind(*ins, **(eqn.params if params is None else params))
    return list(outs) if eqn.primitive.multiple_results else [outs]


def array_call(fn: Callable, args, kwargs, is_leaf: Callable | None = None):
    """The arrays among a call's ``args`` and ``kwargs``, and ``fn`` as a function of them (its
    other arguments as given, and the subtrees ``is_leaf`` names), to be traced."""
    flat, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_leaf)
    dynamic = [i for i, a in enumerate(flat) if isinstance(a, (jax.Array, np.ndarray))]

    def call(*arrays):
        full = list(flat)
        for i, a in zip(dynamic, arrays, strict=True):
            full[i] = a
        call_args, call_kwargs = jax.tree.unflatten(treedef, full)
        return fn(*call_args, **call_kwargs)

    return [flat[i] for i in dynamic], call


def traced_inlined(fn: Callable, *args, keep: Callable | None = None, calls: bool = False):
    """``fn``'s closed jaxpr on ``args`` with its calls inlined (a ``jnp.matmul``'s product an
    equation of its own), but those ``keep(equation)`` names, and its output shapes.
    ``calls``: a jitted statistic computing no product (:func:`plain_call`: ``jnp.var``,
    ``jnp.linalg.norm``) stays a call, as XLA counts the flops of the code as written."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]

    def kept(eqn, ins, here):
        out = statistic_call(eqn, ins) if calls else None
        return out if out is not None or keep is None or not keep(eqn) else bind(eqn, ins)

    flat = jax.make_jaxpr(lambda *a: run(closed.jaxpr, closed.consts, a,
                                         None if keep is None and not calls else kept))(*avals)
    return flat, shapes


_PRODUCTS = ("dot_general", "conv_general_dilated", "ragged_dot_general", "random_bits",
             "random_seed", "random_wrap", "random_unwrap", "random_fold_in", "random_split")


def plain_call(eqn) -> bool:
    """Whether ``eqn`` calls a jitted statistic (a reduction in its body: ``jnp.var``,
    ``jnp.linalg.norm``) computing no product nor random bits: nothing a layer or a draw could
    be found in, replayed as a call (:func:`call_as_is`). Other jitted helpers are inlined:
    ``jnp.flip`` of a kernel is a step to its product."""
    if eqn.primitive.name not in ("jit", "pjit") or eqn.effects:
        return False
    body = [e for e, _ in macs.iter_eqns(call_jaxpr(eqn))]
    return not any(e.primitive.name in _PRODUCTS or e.effects for e in body) and any(
        e.primitive.name.startswith("reduce_") for e in body)


def call_as_is(eqn, ins) -> list:
    """A ``jit`` equation bound again on ``ins``: a call in the program traced (not inlined)."""
    return list(eqn.primitive.bind(*ins, **eqn.params))


def statistic_call(eqn, ins, here=None) -> list | None:
    """A rule for :func:`run`: a jitted statistic (:func:`plain_call`) bound as the call it
    is; ``None`` (inlined, or as the caller's rule says) otherwise."""
    return call_as_is(eqn, ins) if plain_call(eqn) else None


# ---------------------------------------------------------------------------------------------
# float32 compute


def in_float32(fn: Callable) -> Callable:
    """``fn`` computing in float32 wherever it computes in bfloat16 or float16: every value of
    those dtypes (casts in the model's code, a Flax layer's ``dtype=jnp.bfloat16``, constants)
    is float32 instead, and each op runs on float32 operands; other dtypes are untouched. The
    outputs are those a float32 copy of the model would give, not the bfloat16 model's rounded
    ones (they differ by its rounding: ~1e-2 relative for bfloat16). Constants the traced program
    holds in bfloat16 keep their rounding (a Python float the code multiplied a bfloat16 value
    by, e.g. an exact GELU's 1/sqrt(2) as 0.70703125).

    ``fn`` takes and returns pytrees of arrays; it is traced on each call's arguments (any
    trace: symbolic batch sizes included) and replayed with :func:`run`. Loops (``scan``,
    ``while``) and conditionals (``cond``) are rebuilt around their float32 bodies; calls are
    inlined.

    Raises:
      ReplayError: an op that reinterprets a bfloat16 or float16 value's bits
        (``lax.bitcast_convert_type``), or a higher-order primitive holding such values that is
        not a call, loop or conditional; naming it.
    """
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = run(closed.jaxpr, [_up(c) for c in closed.consts],
                   [_up(a) for a in jax.tree.leaves(args)], _float32_rule)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped


def lowest_precision(jaxpr) -> np.dtype | None:
    """The least precise of bfloat16 and float16 that ``jaxpr`` (a closed jaxpr, its calls,
    loops and conditionals included) computes a value in, or ``None``."""
    found = {np.dtype(v.aval.dtype) for eqn, _ in macs.iter_eqns(jaxpr) for v in eqn.outvars
             if _low(getattr(v.aval, "dtype", None))}
    return max(found, key=lambda d: float(jax.numpy.finfo(d).eps), default=None)


def _low(dtype) -> bool:
    try:
        return np.dtype(dtype) in LOW_PRECISION
    except TypeError:  # an extended dtype (a PRNG key's)
        return False


def _up(x):
    """``x`` as float32 if it is bfloat16 or float16, else as it is."""
    if not _low(getattr(x, "dtype", None)):
        return x
    if isinstance(x, jax.core.Tracer) or isinstance(x, jax.Array):
        return jax.lax.convert_element_type(x, np.float32)
    return np.asarray(x, np.float32)


def _retyped(value):
    """A parameter with bfloat16 / float16 dtypes as float32 (``new_dtype``,
    ``preferred_element_type``, ``iota``'s ``dtype``)."""
    if isinstance(value, (np.dtype, type)) and _low(value):
        return np.dtype(np.float32)
    return value


def _body(closed):
    """A closed jaxpr as a function of its inputs' values, in float32."""
    consts = [_up(c) for c in closed.consts]
    return lambda *xs: run(closed.jaxpr, consts, [_up(x) for x in xs], _float32_rule)


def _float32_rule(eqn, ins, here):
    ins = [_up(x) for x in ins]
    name, params = eqn.primitive.name, eqn.params
    if name == "bitcast_convert_type" and (
            _low(params["new_dtype"]) or any(_low(v.aval.dtype) for v in eqn.invars)):
        raise ReplayError(f"cannot compute in float32: lax.bitcast_convert_type reinterprets a "
                         f"{eqn.invars[0].aval.dtype} value's bits as {params['new_dtype']} "
                         f"(at {source_info_util.summarize(here)})")
    sub = call_jaxpr(eqn)
    if sub is not None:
        return run(sub.jaxpr, [_up(c) for c in sub.consts], ins, _float32_rule, here)
    outs = rebuilt(eqn, ins, _body)
    if outs is not None:
        return outs
    low = [a.dtype for s in jcore.jaxprs_in_params(params) for a in _avals(s) if _low(a.dtype)]
    if low:
        raise ReplayError(f"cannot compute {name!r} in float32: its body computes in {low[0]} "
                         f"(at {source_info_util.summarize(here)})")
    return bind(eqn, ins, {k: _retyped(v) for k, v in params.items()})


def rebuilt(eqn, ins, body: Callable) -> list | None:
    """A loop's or conditional's outputs on ``ins`` (``scan``, ``while``, ``cond``), the
    primitive rebuilt around ``body(closed jaxpr)``: a function of a body's input values
    returning its output values (each body replayed another way); ``None`` for another
    primitive. Carries, scanned inputs and branch outputs may be pytrees (a value held as two
    arrays) as long as each body keeps their structure."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        consts, init = ins[:n_consts], ins[n_consts:n_consts + n_carry]
        step_body = body(params["jaxpr"])

        def step(carry, x):
            out = step_body(*consts, *carry, *x)
            return list(out[:n_carry]), list(out[n_carry:])

        carry, ys = jax.lax.scan(step, list(init), list(ins[n_consts + n_carry:]),
                                 length=params["length"], reverse=params["reverse"],
                                 unroll=params["unroll"])
        return [*carry, *ys]
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        cond, step = body(params["cond_jaxpr"]), body(params["body_jaxpr"])
        cond_consts, body_consts = ins[:nc], ins[nc:nc + nb]
        return list(jax.lax.while_loop(lambda c: cond(*cond_consts, *c)[0],
                                       lambda c: tuple(step(*body_consts, *c)),
                                       tuple(ins[nc + nb:])))
    if name == "cond":
        branches = [body(b) for b in params["branches"]]
        return list(jax.lax.switch(ins[0], [lambda *xs, b=b: tuple(b(*xs)) for b in branches],
                                   *ins[1:]))
    return None


def _avals(jaxpr):
    """The abstract values of a jaxpr's variables that carry dtypes."""
    for v in (*jaxpr.invars, *jaxpr.constvars, *(o for e in jaxpr.eqns for o in e.outvars)):
        if hasattr(v.aval, "dtype"):
            yield v.aval
