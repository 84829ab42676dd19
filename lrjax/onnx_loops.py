"""``lax.scan`` in an ONNX graph (:mod:`lrjax.onnx_convert`), unrolled; ``lax.cond`` on data,
every branch computed and the taken one selected.

A scan of static length (``nn.scan`` / ``nnx.scan`` stacks of identical blocks, a ``fori_loop``
with static bounds) is translated as its body once per iteration: the body's stacked inputs
(the blocks' kernels, which are constants at export time) are sliced per iteration, so every
iteration's convs and matmuls get their own constant weights, as an unstacked model's would, and
ONNX Runtime optimises each as a plain layer. The per-iteration outputs are stacked again
(``Unsqueeze`` + ``Concat``). ONNX's own ``Loop`` would keep one body but read its weights by a
``Gather`` per iteration, which ONNX Runtime cannot pre-pack or fuse; a scan as long as the
symbolic batch (``lax.map`` over the examples: an unrolled solver per image) is a ``Loop`` of
that many iterations, its outputs stacked by it. A ``while`` loop (a
``fori_loop`` with traced bounds, a detector's non-maximum suppression, a solver run to a
tolerance) has no static length: it is ONNX's ``Loop`` with no trip count, its body the loop's
body and then its condition on the new carries; one whose condition reads constants alone runs
unrolled.

A ``cond`` whose branch index is known at export runs that branch alone (the converter's own
case); one whose index is a value of the graph (``lax.cond(x.mean() > 0, ...)``, ``lax.switch``
on a computed index) computes every branch and selects each output with ``Where`` (inference
branches are side-effect free in a jaxpr; ONNX's ``If`` would hide their weights from ONNX
Runtime's constant folding and fusion, as ``Loop`` does).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import onnx
from onnx import helper

from lrjax.onnx_graph import (
    INT64_MAX,
    Tensor,
    TranslationError,
    concrete,
    onnx_dtype,
    value_info,
)

__all__ = ["unroll_scan", "scan_loop", "select_branch", "while_loop"]

_UNROLLED_MOST = 10_000  # iterations of a while loop of constant condition unrolled at most


def unroll_scan(converter, eqn, args, where: str) -> list:
    """The outputs of a ``scan`` equation (final carries, then the stacked per-iteration
    outputs), its body translated once per iteration by ``converter.run``.

    ``args`` are the equation's inputs as the converter holds them (:class:`Tensor` or NumPy
    constants): the body's constants, the initial carries, then the scanned-over inputs, each
    with the iterations on axis 0. Iteration ``i`` of a reversed scan reads row ``i`` and writes
    row ``i`` (as ``lax.scan(reverse=True)``), running from the last row to the first."""
    params = eqn.params
    if not concrete(params["length"]):  # as long as the batch (lax.map over the examples)
        return scan_loop(converter, eqn, args, where)
    body, length = params["jaxpr"], int(params["length"])
    n_consts, n_carry = int(params["num_consts"]), int(params["num_carry"])
    if length < 1:
        raise TranslationError("a scan of length 0")
    consts, carry = args[:n_consts], list(args[n_consts:n_consts + n_carry])
    xs = args[n_consts + n_carry:]
    rows: list[list] = [[None] * length for _ in eqn.outvars[n_carry:]]
    for i in (reversed(range(length)) if params["reverse"] else range(length)):
        outs = converter.run(body.jaxpr, body.consts,
                             [*consts, *carry, *(_row(converter, x, i) for x in xs)],
                             f"{where}[{i}]" if where else f"scan[{i}]")
        carry = outs[:n_carry]
        for stacked, y in zip(rows, outs[n_carry:], strict=True):
            stacked[i] = y
    return [*carry, *(_stack(converter, ys, var.aval) for ys, var in
                      zip(rows, eqn.outvars[n_carry:], strict=True))]


def _row(converter, x, i: int):
    """Row ``i`` of a scanned-over input: a NumPy slice of a constant, a ``Gather`` of a tensor
    (in its logical layout; axis 0 is the iterations)."""
    if not isinstance(x, Tensor):  # a key array (a key per step, split_rngs) stays one
        return x[i] if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x)[i]
    index = converter.g.const(np.asarray(i, np.int64), "iteration")
    return Tensor(converter.g.node("Gather", [converter.nhwc(x), index], "row", axis=0),
                  tuple(x.shape[1:]))


def _stack(converter, ys: list, aval):
    """The per-iteration outputs ``ys`` stacked on a new leading axis, as ``aval``."""
    if not any(isinstance(y, Tensor) for y in ys):
        if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
            return jax.numpy.stack(ys)  # (keys of the steps, for a later scan)
        return np.stack([np.asarray(y) for y in ys]).astype(aval.dtype)
    axis0, names = converter.g.ints([0], "axes"), []
    for y in ys:
        if isinstance(y, Tensor):
            row = converter.nhwc(y)
        else:  # a constant, held with 1 along a symbolic batch: brought to the row's shape
            row = converter.g.const(np.asarray(y, aval.dtype))
            if np.shape(y) != tuple(aval.shape[1:]):
                row = converter.g.node("Expand", [row, converter.shape_tensor(aval.shape[1:])])
        names.append(converter.g.node("Unsqueeze", [row, axis0], "stack_row"))
    return Tensor(converter.g.node("Concat", names, "stacked", axis=0), tuple(aval.shape))


def select_branch(converter, eqn, args, where: str) -> list:
    """The outputs of a ``cond`` equation whose branch index ``args[0]`` is a graph value: every
    branch translated by ``converter.run`` on ``args[1:]``, and output ``j`` the taken branch's
    (the index clamped into ``[0, branches - 1]``, as ``lax.switch`` clamps it; a boolean
    predicate is index 0 or 1)."""
    branches = eqn.params["branches"]
    index = converter.g.node("Cast", [converter.nhwc(args[0])], to=7)  # int64
    last = len(branches) - 1
    index = converter.g.node("Min", [converter.g.node("Max", [
        index, converter.g.const(np.asarray(0, np.int64))]),
        converter.g.const(np.asarray(last, np.int64))])
    outs = [converter.run(b.jaxpr, b.consts, args[1:], where) for b in branches]
    selected = list(outs[last])
    for k in reversed(range(last)):
        taken = Tensor(converter.g.node("Equal", [index, converter.g.const(
            np.asarray(k, np.int64))]), ())
        selected = [converter.where(taken, mine, other, var.aval)
                    for mine, other, var in zip(outs[k], selected, eqn.outvars, strict=True)]
    return selected


def while_loop(converter, eqn, args, where: str) -> list:
    """The outputs of a ``while`` equation (its final carries). Its condition on the initial
    carries is computed first; while it is a constant (it reads no graph value) the body runs
    unrolled; else the loop is ONNX's ``Loop`` (no trip count): its body subgraph computes the
    jaxpr's body, then its condition on the new carries, every carry in its logical layout."""
    params, g = eqn.params, converter.g
    cond, body = params["cond_jaxpr"], params["body_jaxpr"]
    n_cond, n_body = int(params["cond_nconsts"]), int(params["body_nconsts"])
    cond_consts, body_consts = args[:n_cond], args[n_cond:n_cond + n_body]
    carry = list(args[n_cond + n_body:])
    for _ in range(_UNROLLED_MOST):
        go = converter.run(cond.jaxpr, cond.consts, [*cond_consts, *carry], where)[0]
        if isinstance(go, Tensor):
            break
        if not bool(np.asarray(go)):
            return carry
        carry = converter.run(body.jaxpr, body.consts, [*body_consts, *carry], where)
    else:
        raise TranslationError(f"a while loop of constant condition ran {_UNROLLED_MOST} "
                               "iterations without stopping")
    avals = [v.aval for v in eqn.outvars]
    names = [converter.nhwc(c) if isinstance(c, Tensor) else g.const(np.asarray(c, a.dtype))
             for c, a in zip(carry, avals, strict=True)]
    with _subgraph(converter) as nodes:
        step, flag = g.name("iteration"), g.name("condition")
        inside = [Tensor(g.name("carry"), tuple(a.shape)) for a in avals]
        new = converter.run(body.jaxpr, body.consts, [*body_consts, *inside], f"{where}/while")
        again = converter.run(cond.jaxpr, cond.consts, [*cond_consts, *new],
                              f"{where}/while")[0]
        outputs = [_named(converter, v, a, "body_out") for v, a in zip(
            [again, *new], [cond.out_avals[0], *avals], strict=True)]
    graph = helper.make_graph(
        nodes, g.name("while_body"), [*_loop_inputs(step, flag), *(
            value_info(t.name, a) for t, a in zip(inside, avals, strict=True))],
        [value_info(o, a) for o, a in zip(outputs, [cond.out_avals[0], *avals], strict=True)])
    results = [g.name("while_out") for _ in avals]
    g.nodes.append(helper.make_node("Loop", ["", converter.nhwc(go), *names], results,
                                    body=graph))
    return [Tensor(r, tuple(a.shape)) for r, a in zip(results, avals, strict=True)]


def scan_loop(converter, eqn, args, where: str) -> list:
    """The outputs of a ``scan`` whose length is the symbolic batch (``lax.map`` over the
    examples) as ONNX's ``Loop`` of that trip count: its body reads row ``i`` of each scanned
    input (``Gather``; a reversed scan row ``length - 1 - i``), computes the scan's body, and
    gives its carries and per-iteration outputs, which ``Loop`` stacks on a new leading axis (a
    reversed scan's then flipped)."""
    params, g = eqn.params, converter.g
    body = params["jaxpr"]
    n_consts, n_carry = int(params["num_consts"]), int(params["num_carry"])
    consts, carry = args[:n_consts], args[n_consts:n_consts + n_carry]
    xs = [converter.nhwc(x) if isinstance(x, Tensor) else g.const(np.asarray(x))
          for x in args[n_consts + n_carry:]]
    avals = [v.aval for v in eqn.outvars]
    trips = g.node("Squeeze", [converter.shape_tensor([params["length"]]), g.ints([0])], "trips")
    names = [converter.nhwc(c) if isinstance(c, Tensor) else g.const(np.asarray(c, a.dtype))
             for c, a in zip(carry, avals[:n_carry], strict=True)]
    with _subgraph(converter) as nodes:
        step, flag = g.name("iteration"), g.name("condition")
        row = g.node("Sub", [g.node("Sub", [trips, g.ints(1)]), step]) if params["reverse"] \
            else step
        inside = [Tensor(g.name("carry"), tuple(a.shape)) for a in avals[:n_carry]]
        rows = [Tensor(g.node("Gather", [x, row], "row", axis=0), tuple(v.aval.shape[1:]))
                for x, v in zip(xs, eqn.invars[n_consts + n_carry:], strict=True)]
        outs = converter.run(body.jaxpr, body.consts, [*consts, *inside, *rows], f"{where}/scan")
        outputs = [g.node("Identity", [flag], "body_out")] + [
            _named(converter, v, a, "body_out") for v, a in zip(outs, avals, strict=True)]
    graph = helper.make_graph(
        nodes, g.name("scan_body"), [*_loop_inputs(step, flag), *(
            value_info(t.name, a) for t, a in zip(inside, avals, strict=False))],
        [helper.make_tensor_value_info(outputs[0], onnx.TensorProto.BOOL, []), *(
            value_info(o, a) for o, a in zip(outputs[1:1 + n_carry], avals, strict=False)), *(
            helper.make_tensor_value_info(o, onnx_dtype(a.dtype), None)  # (one row of each)
            for o, a in zip(outputs[1 + n_carry:], avals[n_carry:], strict=True))])
    results = [g.name("scan_out") for _ in avals]
    g.nodes.append(helper.make_node("Loop", [trips, g.const(np.asarray(True)), *names], results,
                                    body=graph))
    if params["reverse"]:  # iteration i wrote row length - 1 - i
        results[n_carry:] = [g.node("Slice", [r, g.ints([-1]), g.ints([-INT64_MAX]),
                                              g.ints([0]), g.ints([-1])], "reversed")
                             for r in results[n_carry:]]
    return [Tensor(r, tuple(a.shape)) for r, a in zip(results, avals, strict=True)]


@contextlib.contextmanager
def _subgraph(converter):
    """The converter emitting into a fresh node list (a loop body's, yielded), the batch size
    read anew inside it (a value of the body is not one of the outer graph)."""
    g = converter.g
    outer = g.nodes, converter._batch  # noqa: SLF001 - the converter's own
    g.nodes, converter._batch = [], None
    try:
        yield g.nodes
    finally:
        g.nodes, converter._batch = outer


def _named(converter, value, aval, hint: str) -> str:
    """A body output: ``value`` (a tensor in its logical layout, or a constant) by a new name."""
    source = converter.nhwc(value) if isinstance(value, Tensor) else converter.g.const(
        np.asarray(value, aval.dtype))
    return converter.g.node("Identity", [source], hint)


def _loop_inputs(step: str, flag: str) -> list:
    """A ``Loop`` body's first two inputs: the iteration number and the condition."""
    return [helper.make_tensor_value_info(step, onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, [])]
