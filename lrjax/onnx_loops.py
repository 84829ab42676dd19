"""``lax.scan`` in an ONNX graph (:mod:`lrjax.onnx_convert`), unrolled; ``lax.cond`` on data,
every branch computed and the taken one selected.

A scan of static length (``nn.scan`` / ``nnx.scan`` stacks of identical blocks, a ``fori_loop``
with static bounds) is translated as its body once per iteration: the body's stacked inputs
(the blocks' kernels, which are constants at export time) are sliced per iteration, so every
iteration's convs and matmuls get their own constant weights, as an unstacked model's would, and
ONNX Runtime optimises each as a plain layer. The per-iteration outputs are stacked again
(``Unsqueeze`` + ``Concat``). ONNX's own ``Loop`` would keep one body but read its weights by a
``Gather`` per iteration, which ONNX Runtime cannot pre-pack or fuse. A ``while`` loop (a
``fori_loop`` with traced bounds) has no static length and is not translated.

A ``cond`` whose branch index is known at export runs that branch alone (the converter's own
case); one whose index is a value of the graph (``lax.cond(x.mean() > 0, ...)``, ``lax.switch``
on a computed index) computes every branch and selects each output with ``Where`` (inference
branches are side-effect free in a jaxpr; ONNX's ``If`` would hide their weights from ONNX
Runtime's constant folding and fusion, as ``Loop`` does).
"""

from __future__ import annotations

import jax
import numpy as np

from lrjax.onnx_graph import Tensor, TranslationError

__all__ = ["unroll_scan", "select_branch"]


def unroll_scan(converter, eqn, args, where: str) -> list:
    """The outputs of a ``scan`` equation (final carries, then the stacked per-iteration
    outputs), its body translated once per iteration by ``converter.run``.

    ``args`` are the equation's inputs as the converter holds them (:class:`Tensor` or NumPy
    constants): the body's constants, the initial carries, then the scanned-over inputs, each
    with the iterations on axis 0. Iteration ``i`` of a reversed scan reads row ``i`` and writes
    row ``i`` (as ``lax.scan(reverse=True)``), running from the last row to the first."""
    params = eqn.params
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
