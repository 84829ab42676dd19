"""The cost of a whole traced computation: the multiply-adds of every convolution and every
matrix product (``dot_general``: dense layers, einsums, attention's q·k and a·v; ``ragged_dot``:
a mixture of experts', as XLA computes it on CPU, every row by every expert) in its jaxpr,
sub-jaxprs included, and the element-wise work around them (norms, activations, pooling) as XLA
counts it. What :mod:`lrjax.costs` counts per conv layer, counted here for the whole net, so that
a reported speedup is the whole forward pass's. A conv counts the taps that land on its input, not
those on padding or on a transposed conv's dilation holes (:func:`lrjax.costs.valid_taps`), as
XLA does: XLA's own flop count (``jax.jit(f).lower(...).compile().cost_analysis()["flops"]``) is
twice these multiply-adds plus the element-wise flops, for a net without loops: XLA counts a
loop body once, lrjax counts a ``scan`` body (``nn.scan``, ``nnx.scan``) once per iteration, its
multiply-adds and its element-wise work. A conditional (``lax.cond`` / ``switch``) counts as its
costliest branch, as XLA counts it. Work no output uses is not counted (XLA drops it), nor, in
a scan's iterations XLA runs unrolled, the work only a dropped result of the last ones uses
(a model returning one of two streams: the other's last layer). Work traced inside a
:func:`layer_scope` is also counted per layer, over all the layer's runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
from jax.extend import core as jcore

from lrjax import costs

# primitives that call a sub-jaxpr once with their operands (inlined by jaxpr interpreters)
CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                   "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint")

__all__ = ["iter_eqns", "jaxpr_macs", "traced_macs", "layer_scope", "weighted_products",
           "samples", "live"]

_LAYER = re.compile(r"lrjax_layer_(\d+)")


def layer_scope(index: int):
    """A ``jax.named_scope`` marking the work traced inside it as layer ``index``'s:
    :func:`traced_macs` then reports the multiply-adds of each marked layer over all its runs
    (``"layers"``), so that a layer called twice, or inside a loop, is counted as it runs."""
    return jax.named_scope(f"lrjax_layer_{index}")


def _conv_macs(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    params = eqn.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    # specs: (batch or out feature dim, feature dim, spatial dims...)
    taps = math.prod(
        costs.valid_taps(int(lhs.shape[ld]), int(rhs.shape[rd]), int(stride), int(low),
                         int(dilation), int(out.shape[od]), int(input_dilation))
        for ld, rd, od, stride, (low, _), dilation, input_dilation in zip(
            lhs_spec[2:], rhs_spec[2:], out_spec[2:], params["window_strides"],
            params["padding"], params["rhs_dilation"], params["lhs_dilation"], strict=True))
    in_per_group = int(rhs.shape[rhs_spec[1]])
    batch_and_features = int(out.shape[out_spec[0]]) * int(out.shape[out_spec[1]])
    return batch_and_features * taps * in_per_group


def _dot_macs(eqn) -> int:
    lhs = eqn.invars[0].aval
    (contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval
    return math.prod(int(d) for d in out.shape) * math.prod(int(lhs.shape[d]) for d in contract)


def _ragged_macs(eqn) -> int:
    """A ``ragged_dot``'s multiply-adds as XLA counts and computes them on CPU: every row by
    every group's matrix (masked), ``G`` times the rows' own products (:mod:`lrjax.ragged`)."""
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (contract, _), _ = numbers.dot_dimension_numbers
    groups = math.prod(int(rhs.shape[d]) for d in numbers.rhs_group_dimensions)
    out = eqn.outvars[0].aval
    return groups * math.prod(int(d) for d in out.shape) * math.prod(
        int(lhs.shape[d]) for d in contract)


# the products whose multiply-adds are counted, by primitive: their kind and their count
_PRODUCTS = {"conv_general_dilated": ("conv", _conv_macs), "dot_general": ("dot", _dot_macs),
             "ragged_dot_general": ("dot", _ragged_macs)}


def _walk(jaxpr, scope: str, trips: int):
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        where = "/".join(p for p in (scope, str(eqn.source_info.name_stack)) if p)
        yield eqn, where, trips
        inner_trips = trips * int(eqn.params["length"]) if eqn.primitive.name == "scan" else trips
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner, where, inner_trips)


def iter_eqns(jaxpr, scope: str = ""):
    """``(equation, layer path)`` of every equation of a (closed) jaxpr, sub-jaxprs included
    (``pjit``, ``custom_vjp`` and control-flow bodies); the path is the ``/``-joined name stack
    (Flax's module path), ``""`` at the top level."""
    for eqn, where, _ in _walk(jaxpr, scope, 1):
        yield eqn, where


def _macs(jaxpr, scope: str = "", trips: int = 1) -> tuple[dict, int]:
    """``{"conv", "dot"}`` multiply-adds with a ``scan`` body once per iteration and a ``cond``
    as its costliest branch, as XLA counts one (``"layers"``: those of each
    :func:`layer_scope`, its innermost; ``"branched"``: the layers with work inside a
    ``cond`` branch), and their total with every loop body counted once (as XLA counts them)."""
    out, once = {"conv": 0, "dot": 0, "layers": {}, "branched": set()}, 0

    def add(counts, body_once):
        nonlocal once
        out["conv"] += counts["conv"]
        out["dot"] += counts["dot"]
        for i, m in counts["layers"].items():
            out["layers"][i] = out["layers"].get(i, 0) + m
        out["branched"] |= counts["branched"]
        once += body_once

    inner = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in inner.eqns:
        where = "/".join(p for p in (scope, str(eqn.source_info.name_stack)) if p)
        kind, count = _PRODUCTS.get(eqn.primitive.name, (None, None))
        if kind is not None:
            macs = count(eqn)
            marks = _LAYER.findall(where)
            add({"conv": 0, "dot": 0, kind: trips * macs, "branched": set(),
                 "layers": {int(marks[-1]): trips * macs} if marks else {}}, macs)
        if eqn.primitive.name == "cond":
            branches = [_macs(b, where, trips) for b in eqn.params["branches"]]
            costliest = max(branches, key=lambda b: b[0]["conv"] + b[0]["dot"])
            add(costliest[0], costliest[1])
            out["branched"] |= {i for b, _ in branches for i in (*b["layers"], *b["branched"])}
            continue
        if eqn.primitive.name == "scan":
            for counts, body_once in _scan_macs(eqn, where, trips, inner):
                add(counts, body_once)
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    add(*_macs(sub, where, trips))
    return out, once


def _scan_macs(scan, where: str, trips: int, enclosing):
    """The counts of a ``scan``'s iterations (:func:`_macs`' ``add`` arguments): those XLA runs
    in a loop, each with all the body's work that any iteration uses, and each of those it runs
    as straight-line code (:func:`_straight_bodies`) with its own live work. The loop-once
    count is the body's, once per copy XLA counts."""
    body = scan.params["jaxpr"]
    whole, body_once = _macs(body, where, trips)
    looped = int(scan.params["length"]) - _unrolled(scan)
    yield _scaled(whole, looped), body_once * _xla_copies(scan)
    seen: dict = {}
    for live_body, _ in _straight_bodies(scan, enclosing):
        if id(live_body) not in seen:
            seen[id(live_body)] = _macs(live_body, where, trips)[0]
        yield seen[id(live_body)], 0


def _straight_bodies(scan, enclosing) -> list:
    """``(body, used inputs)`` of each iteration of a ``scan`` that XLA runs as straight-line
    code (:func:`_unrolled`), the last first: the body without the work whose results neither
    the iterations after it nor the outputs of the scan that its ``enclosing`` jaxpr uses use.
    XLA drops that work (the last layer's work on a stream a model drops, once its loop is
    unrolled). Iterations wanting the same outputs share one body."""
    from jax._src.interpreters import partial_eval as pe

    straight = _unrolled(scan)
    if not straight:
        return []
    body, carries = scan.params["jaxpr"].jaxpr, int(scan.params["num_carry"])
    first, used = int(scan.params["num_consts"]), _used(enclosing)
    wanted = [isinstance(v, jcore.Var) and v in used for v in scan.outvars]
    bodies, seen = [], {}
    for _ in range(straight):
        key = tuple(wanted)
        if key not in seen:
            seen[key] = pe.dce_jaxpr(body, wanted)
        bodies.append(seen[key])
        wanted = [*seen[key][1][first:first + carries], *wanted[carries:]]
    return bodies


def _used(jaxpr) -> set:
    """The variables a jaxpr's equations or outputs use."""
    return {v for e in jaxpr.eqns for v in e.invars if isinstance(v, jcore.Var)} | {
        v for v in jaxpr.outvars if isinstance(v, jcore.Var)}


def _unrolled(scan) -> int:
    """How many of a scan's iterations XLA runs outside a loop: the ``length % unroll`` after
    the loop, or all where the loop runs once or never (JAX lowers a fully unrolled scan, or
    one of a single iteration, without one, or XLA inlines it)."""
    length, unroll = int(scan.params["length"]), int(scan.params.get("unroll", 1))
    trips, rest = divmod(length, unroll) if unroll > 0 else (0, length)
    return length if trips <= 1 else rest


def _scaled(counts: dict, times: int) -> dict:
    """``counts`` (:func:`_macs`') for ``times`` runs."""
    return {"conv": counts["conv"] * times, "dot": counts["dot"] * times,
            "layers": {i: m * times for i, m in counts["layers"].items()},
            "branched": counts["branched"] if times else set()}


def _xla_copies(scan) -> int:
    """How many copies of a scan's body XLA counts: one loop body of ``unroll`` copies and the
    ``length % unroll`` peeled after it (all ``length`` when the loop would run once)."""
    length, unroll = int(scan.params["length"]), max(1, int(scan.params.get("unroll", 1)))
    return min(length, unroll + length % unroll)


def jaxpr_macs(jaxpr) -> dict[str, int]:
    """``{"conv": macs, "dot": macs, "layers": {...}, "branched": {...}}`` of a (closed) jaxpr
    with concrete shapes (``"layers"`` and ``"branched"``: see :func:`layer_scope`).

    A ``scan`` body (``lax.scan``, ``nn.scan``, ``nnx.scan``, a ``fori_loop`` with static bounds)
    counts once per iteration; a ``while_loop`` body, whose trip count is not in the jaxpr, once
    (XLA's ``cost_analysis()`` counts every loop body once)."""
    return _macs(jaxpr)[0]


def traced_macs(fn: Callable, *args, **kwargs) -> dict[str, int]:
    """The cost of ``fn(*args, **kwargs)``, traced (no compute; arrays or
    ``jax.ShapeDtypeStruct``\\s): ``{"conv", "dot", "total"}`` multiply-adds, and
    ``"elementwise"``: the flops of everything else, XLA's count of the lowered computation
    (``Lowered.cost_analysis()``, no compilation) less two per multiply-add; 0 where the backend
    gives no count. XLA counts one flop per element of an arithmetic op (a bias, a ReLU, a norm's
    steps), the polynomial of ``erf`` (exact GELU, ~66 flops an element), and none for
    transcendentals (``exp``, ``tanh``: its ``"transcendentals"``) or data movement. The
    multiply-adds count a ``scan`` body once per iteration (:func:`jaxpr_macs`), and so do the
    element-wise flops (XLA's count of the whole, which has each loop body once, plus its count
    of each scan body for the other iterations); a ``while_loop`` body counts once.
    ``"weighted"``: :func:`weighted_products` with the first argument's leaves (a model's
    variables) as the weights. Only work the outputs use is counted (:func:`live`, as ``jax.jit``
    lowers it); ``"dead"``: the :func:`layer_scope` marks whose layers' work all goes unused (a
    pooler whose output the model drops); ``"outputs"``: the abstract values of its outputs;
    ``"xla_flops"``: XLA's own count, each loop body once; ``"rolled"``: how many scans it
    runs as loops (their bodies counted once there); ``"sampled"``: whether the outputs use
    random bits (``random_bits``; not a key drawn for nothing: nnx.RNN's zero carry)."""
    leaves, tree = jax.tree.flatten(args)  # (lowered on the leaves: JAX's lowering rebuilds
    traced = jax.jit(lambda *flat: fn(*jax.tree.unflatten(tree, flat), **kwargs)).trace(
        *leaves)  # its arguments' trees, which a pytree class checking its fields refuses)
    closed = live(traced.jaxpr)  # what the outputs use, as jit lowers it
    counts, once = _macs(closed)  # once: loop bodies counted once, as XLA does
    counts["dead"] = {i for i, m in _macs(traced.jaxpr)[0]["layers"].items()
                      if m > 0 and counts["layers"].get(i, 0) <= 0}
    weights = len(jax.tree_util.tree_leaves(args[0])) if args else 0
    products = _products(closed, [i < weights for i in range(len(closed.jaxpr.invars))])
    counts["weighted"] = [p for p in products if p[0] is not _CONSTANT]
    counts["constant"] = sum(p[2] for p in products if p[0] is _CONSTANT)
    total = counts["conv"] + counts["dot"]  # ("layers": of each layer_scope, over its runs)
    try:
        analysis = traced.lower().cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without a cost model: multiply-adds only
        analysis = None
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
    flops = xla_flops = float((analysis or {}).get("flops", 0.0))
    rolled = [(eqn, trips) for eqn, _, trips in _walk(traced.jaxpr, "", 1)
              if eqn.primitive.name == "scan" and int(eqn.params["length"]) > _xla_copies(eqn)]
    if flops:  # XLA counts a scan body once: its element-wise work for the other iterations
        flops += sum((int(eqn.params["length"]) - _xla_copies(eqn)) * trips
                     * _elementwise(eqn.params["jaxpr"]) for eqn, trips in rolled)
    return {**counts, "total": total, "elementwise": max(round(flops) - 2 * once, 0),
            "outputs": [v.aval for v in traced.jaxpr.jaxpr.outvars],
            "xla_flops": round(xla_flops), "rolled": len(rolled),
            "sampled": samples(closed)}


def samples(closed) -> bool:
    """Whether a (live, :func:`live`) jaxpr draws random bits (``random_bits``)."""
    return any(eqn.primitive.name == "random_bits" for eqn, _, _ in _walk(closed, "", 1))


def live(closed):
    """A closed jaxpr without the equations its outputs do not use (``jax.jit`` drops them when
    it lowers: a model's outputs computed and dropped); as it is where JAX's dead-code
    elimination is not available."""
    try:
        from jax._src.interpreters import partial_eval as pe

        jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), True)
        return closed.replace(jaxpr=jaxpr)
    except Exception:  # noqa: BLE001 - a JAX without it: every equation
        return closed


def _elementwise(closed) -> float:
    """XLA's element-wise flops of one run of a closed jaxpr (a scan body; its own loop bodies
    once), two per multiply-add taken off."""
    fn = jcore.jaxpr_as_fun(closed)
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    analysis = jax.jit(fn).trace(*avals).lower().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
    return max(float((analysis or {}).get("flops", 0.0)) - 2 * _macs(closed)[1], 0.0)


_DATA = "data"  # the kind of a value computed from the data (kinds of others: weight indices)
_THROUGH = -1  # among a weight value's indices: a layer's work computed it
_CONSTANT = frozenset({-2})  # a product's "weights": constants (no input computes them)


def weighted_products(jaxpr, weights) -> list[tuple[frozenset, str, int, str, bool]]:
    """The convolutions and matrix products of a (closed) jaxpr that multiply the data by weights
    outside any :func:`layer_scope`: one operand computed from the data (the inputs not marked in
    ``weights``), the other from weight inputs alone (a parameter, through any casts, scalings,
    reshapes or normalizations of weights). What a layer computes with its own code from its
    parameters (``lax.conv_general_dilated(x, self.param(...))``, ``x @ w``) looks so; a
    product of two data values (attention's q·k) or with a constant (a fixed filter) does not.

    Args:
      jaxpr: a closed jaxpr (sub-jaxprs are followed: calls, loop bodies, branches).
      weights: one bool per input of the jaxpr: whether it is a weight.

    Returns:
      ``(weight input indices, primitive name, multiply-adds over its runs, name stack,
      direct)`` of each such product, in trace order; ``direct``: its weight operand is computed
      from the weights without a layer's work (a tied head's ``x @ layer_kernel.T``; not a
      product with the output of a layer computing from weights alone, such as a MAP head's
      query of its learned probe).
    """
    return [p for p in _products(jaxpr, weights) if p[0] is not _CONSTANT]


def _products(jaxpr, weights) -> list:
    """:func:`weighted_products`, and the products of the data with constants (computed from
    no input: a fixed filter, or weights the model holds outside its variables), their weight
    indices :data:`_CONSTANT`."""
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    kinds = [frozenset((i,)) if w else _DATA for i, w in enumerate(weights)]
    found: list = []
    _weighted(inner, kinds, "", 1, found)
    return [(sources if sources is _CONSTANT else sources - {_THROUGH}, name, macs, where,
             _THROUGH not in sources) for sources, name, macs, where in found]


def _kind_of(kinds: dict, var):
    return None if isinstance(var, jcore.Literal) else kinds.get(var)


def _weighted(jaxpr, in_kinds, scope: str, trips: int, found: list) -> list:
    """Append the weighted products of ``jaxpr`` (its inputs of kinds ``in_kinds``) to
    ``found``; return its outputs' kinds."""
    kinds = dict(zip(jaxpr.invars, in_kinds, strict=True))
    for eqn in jaxpr.eqns:
        where = "/".join(p for p in (scope, str(eqn.source_info.name_stack)) if p)
        operands = [_kind_of(kinds, v) for v in eqn.invars]
        data = any(k is _DATA for k in operands)
        sources = frozenset().union(*(k for k in operands if isinstance(k, frozenset)))
        name = eqn.primitive.name
        if name in _PRODUCTS and not _LAYER.search(where):
            a, b = operands[:2]
            weight = a if b is _DATA else b if a is _DATA else _DATA
            if isinstance(weight, frozenset) or weight is None:  # (None: a constant)
                macs = _PRODUCTS[name][1](eqn)
                found.append((_CONSTANT if weight is None else weight, name, trips * macs,
                              where))
        for key, value in eqn.params.items():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                body = getattr(sub, "jaxpr", sub)
                if key != "cond_jaxpr" and hasattr(body, "eqns") and \
                        len(body.invars) <= len(operands):  # a branch or loop body: a suffix
                    body_kinds, inside = operands[len(operands) - len(body.invars):], []
                    out_kinds = _weighted(body, body_kinds, where, trips, inside)  # one run
                    carried = _carried(eqn, body_kinds, out_kinds)
                    if carried != body_kinds:  # again, with the carries the body makes data
                        inside = []
                        _weighted(body, carried, where, trips, inside)
                    if name != "scan":
                        found.extend(inside)
                        continue
                    looped = int(eqn.params["length"]) - _unrolled(eqn)
                    found.extend((*p[:2], p[2] * looped, *p[3:]) for p in inside if looped)
                    for live_body, used_in in _straight_bodies(eqn, jaxpr):
                        _weighted(live_body, [k for k, u in zip(carried, used_in, strict=True)
                                              if u], where, trips, found)
        out = _DATA if data else sources or None
        if out not in (_DATA, None) and _LAYER.search(where):
            out = out | {_THROUGH}
        for var in eqn.outvars:
            kinds[var] = out
    return [_kind_of(kinds, v) for v in jaxpr.outvars]


def _carried(eqn, in_kinds: list, out_kinds: list) -> list:
    """A loop body's input kinds with each carry that the body makes data (``out_kinds``: its
    outputs' kinds) marked data: an LSTM's hidden state starts as zeros (a constant) and is
    data from the second step, so its product with the recurrent kernel is a weighted
    product."""
    if eqn.primitive.name == "scan":
        first, count = int(eqn.params["num_consts"]), int(eqn.params["num_carry"])
    elif eqn.primitive.name == "while":
        first, count = int(eqn.params["body_nconsts"]), len(eqn.outvars)
    else:
        return in_kinds
    kinds = list(in_kinds)
    for i in range(count):
        if out_kinds[i] is _DATA:
            kinds[first + i] = _DATA
    return kinds
