"""ONNX translations of the less common element-wise, reduction and scan primitives a model's
own code uses: trigonometric and hyperbolic functions (``tan``, ``asin``, ..., ``atan2``: polar
coordinates, rotary and Fourier features), ``cbrt``, ``erf_inv``, ``is_finite``
(``jax.nn.logsumexp``'s guard), ``not`` and ``xor``, ``argmin``, ``reduce_prod`` /
``reduce_and`` / ``reduce_or`` (``jnp.prod``, ``jnp.all``, ``jnp.any``; ``jnp.median``'s NaN
check), the cumulative
``cummax`` / ``cummin`` / ``cumprod`` / ``cumlogsumexp``, ``sort`` (``jnp.sort``, ``jnp.argsort``,
``jnp.median``), a pad with interior padding (values between neighbours: a zero-inserting
upsampler), min pooling, ``reduce_precision`` (a model simulating bfloat16 arithmetic) and
``optimization_barrier`` (a scheduling hint: its operands as they are). Handlers of
:data:`lrjax.onnx_convert.HANDLERS`, keyed by primitive name in :data:`HANDLERS`:
``handler(converter, args, params, out_aval)``."""

from __future__ import annotations

import numpy as np
import onnx

from lrjax import onnx_arrays
from lrjax.onnx_graph import Tensor, TranslationError, concrete, onnx_dtype, reshape_spec

__all__ = ["HANDLERS", "dilated"]

_ONE_OP = {"tan": "Tan", "asin": "Asin", "acos": "Acos", "atan": "Atan", "sinh": "Sinh",
           "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh"}


def _unary(op):
    return lambda c, args, params, aval: c.elementwise(op, args, aval)


def atan2(c, args, params, aval):
    """``atan2(y, x)`` as ``atan(y / x)`` moved to the quadrant of ``(x, y)``; ``sign(y) π/2`` on
    the vertical axis; at the origin ``±0`` or ``±π`` by the zeros' signs, as JAX (a zero's
    sign read off ``1 / 0 = ±inf``)."""
    y, x = args
    dtype = aval.dtype
    zero, pi = np.asarray(0, dtype), np.asarray(np.pi, dtype)

    def op(name, *operands):
        return c.elementwise(name, list(operands), aval)

    left = op("Less", op("Div", np.asarray(1, dtype), x), zero)  # x < 0 or x = -0
    upper = op("Greater", op("Div", np.asarray(1, dtype), y), zero)  # y > 0 or y = +0
    turn = op("Where", left, op("Where", upper, pi, -pi), zero)
    off_axis = op("Add", op("Atan", op("Div", y, x)), turn)
    on_axis = op("Where", op("Equal", y, zero), op("Where", left, turn, y),
                 op("Mul", op("Sign", y), np.asarray(np.pi / 2, dtype)))
    return op("Where", op("Equal", x, zero), on_axis, off_axis)


def cbrt(c, args, params, aval):
    """``sign(x) |x|^(1/3)``."""
    root = c.elementwise("Pow", [c.elementwise("Abs", args, aval),
                                 np.asarray(1 / 3, aval.dtype)], aval)
    return c.elementwise("Mul", [root, c.elementwise("Sign", args, aval)], aval)


# Giles (2010), "Approximating the erfinv function": single precision, as XLA computes erf_inv
_ERF_INV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06,
                    0.00021858087, -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_ERF_INV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
                 -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)


def erf_inv(c, args, params, aval):
    """``erf_inv(x)`` by XLA's own polynomials in ``w = -log(1 - x^2)`` (one for ``w < 5``, one
    in ``sqrt(w)`` beyond), both computed and one selected; ``±inf`` at ``±1``. Within two units
    in the last place of JAX's (``jax.random.truncated_normal``, probit transforms)."""
    x, dtype = args[0], aval.dtype

    def op(name, *operands):
        return c.elementwise(name, list(operands), aval)

    def horner(coefficients, w):
        p = np.asarray(coefficients[0], dtype)
        for k in coefficients[1:]:
            p = op("Add", op("Mul", p, w), np.asarray(k, dtype))
        return p

    w = op("Neg", op("Log", op("Sub", np.asarray(1, dtype), op("Mul", x, x))))
    central = horner(_ERF_INV_CENTRAL, op("Sub", w, np.asarray(2.5, dtype)))
    tail = horner(_ERF_INV_TAIL, op("Sub", op("Sqrt", w), np.asarray(3, dtype)))
    p = op("Where", op("Less", w, np.asarray(5, dtype)), central, tail)
    edge = op("Equal", op("Abs", x), np.asarray(1, dtype))
    return op("Where", edge, op("Mul", x, np.asarray(np.inf, dtype)), op("Mul", p, x))


def is_finite(c, args, params, aval):
    """``not (isinf(x) or isnan(x))``."""
    bad = c.elementwise("Or", [c.elementwise("IsInf", args, aval),
                               c.elementwise("IsNaN", args, aval)], aval)
    return c.elementwise("Not", [bad], aval)


def not_(c, args, params, aval):
    """Logical not of booleans; bitwise not of integers (``-x - 1`` signed, ``max - x``
    unsigned: ONNX's ``BitwiseNot`` is newer than the graph's opset)."""
    dtype = np.dtype(aval.dtype)
    if dtype == np.bool_:
        return c.elementwise("Not", args, aval)
    if np.issubdtype(dtype, np.signedinteger):
        return c.elementwise("Sub", [c.elementwise("Neg", args, aval), np.asarray(1, dtype)],
                             aval)
    return c.elementwise("Sub", [np.asarray(np.iinfo(dtype).max, dtype), args[0]], aval)


def xor(c, args, params, aval):
    if np.dtype(aval.dtype) != np.bool_:
        raise TranslationError(f"a bitwise xor of {np.dtype(aval.dtype)} values")
    return c.elementwise("Xor", args, aval)


def reduce_prod(c, args, params, aval):
    return c.reduction("ReduceProd", args, params, aval)


def _logical_reduction(op):
    """``jnp.all`` / ``jnp.any``: the minimum / maximum of the booleans as int32."""
    def handler(c, args, params, aval):
        t = args[0]
        ints = Tensor(c.g.node("Cast", [t.name], to=onnx_dtype(np.int32)), t.shape, t.nchw)
        out = c.reduction(op, [ints], params, aval)
        return Tensor(c.g.node("Cast", [out.name], to=onnx_dtype(np.bool_)), out.shape)
    return handler


def _cumulative(op, fill):
    """A cumulative reduction along one axis of static length ``L`` as one reduction over a
    ``(..., L, L, ...)`` view whose entries past each position (before it, ``reverse=True``)
    hold ``fill(dtype)``, the reduction's identity: ``L`` times the memory of the input, for
    the short axes models scan (ONNX has ``CumSum`` alone)."""
    def handler(c, args, params, aval):
        t, axis = args[0], int(params["axis"])
        length, rank = t.shape[axis], len(t.shape)
        if not concrete(length):
            raise TranslationError(f"a cumulative {op} along the symbolic batch axis")
        i, j = np.arange(length)[:, None], np.arange(length)[None, :]
        keep = (j >= i) if params.get("reverse", False) else (j <= i)
        mask = keep.reshape((1,) * axis + (length, length) + (1,) * (rank - axis - 1))
        x = c.g.node("Unsqueeze", [c.nhwc(t), c.g.ints([axis])])  # (..., 1, L_j, ...)
        dtype = np.dtype(aval.dtype)
        masked = c.g.node("Where", [c.g.const(mask), x, c.g.const(np.asarray(fill(dtype),
                                                                              dtype))])
        out = c.g.node(op, [masked], axes=[axis + 1], keepdims=0)
        return Tensor(out, tuple(aval.shape))
    return handler


def _lowest(dtype):
    return -np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min


def _highest(dtype):
    return np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max


def sort(c, args, params, aval):
    """``lax.sort`` on one key (``jnp.sort``, ``jnp.argsort``: the key sorted with its
    positions) as ONNX ``TopK`` of the whole axis, smallest first (equal keys keep their
    order, as a stable sort), the other operands gathered in the same order."""
    if int(params["num_keys"]) != 1:
        raise TranslationError(f"a sort on {params['num_keys']} keys")
    axis = int(params["dimension"])
    operands = [a if isinstance(a, Tensor) else None for a in args]
    key = args[0]
    if operands[0] is None:
        raise TranslationError("a sort of constants by a key of the data")
    length = key.shape[axis]  # (along the batch axis, a multiple of it: a MoE's routed tokens)
    length = c.g.ints([int(length)]) if concrete(length) else c.shape_tensor([length])
    values, order = c.g.node("TopK", [c.nhwc(key), length], "sorted",
                             axis=axis, largest=0, sorted=1), c.g.name("order")
    c.g.nodes[-1].output.append(order)
    outs = [Tensor(values, tuple(key.shape))]
    for operand in args[1:]:
        if isinstance(operand, Tensor):
            name = c.nhwc(operand)
        else:  # an iota of positions (argsort), a constant of the key's shape
            name = c.g.node("Expand", [c.g.const(np.asarray(operand)),
                                       c.g.node("Shape", [c.nhwc(key)])])
        outs.append(Tensor(c.g.node("GatherElements", [name, order], axis=axis),
                           tuple(key.shape)))
    return outs


def dilated(c, t: Tensor, config, value) -> Tensor:
    """``t`` (in its NHWC view) with ``value`` inserted ``interior`` times between neighbours
    along each axis of ``config`` (``lax.pad``'s ``(low, high, interior)``; low and high are
    left to the caller): per axis, a unit axis after it padded to ``interior + 1`` with
    ``value``, merged back, and the trailing ``interior`` entries dropped."""
    x, shape = c.nhwc(t), list(t.shape)
    fill = c.g.const(np.asarray(value))
    for axis, (_, _, k) in enumerate(config):
        k = int(k)
        if not k:
            continue
        n = shape[axis]
        if not concrete(n):
            raise TranslationError("interior padding along the symbolic batch axis")
        if n == 0:
            continue
        rank = len(shape) + 1
        x = c.g.node("Unsqueeze", [x, c.g.ints([axis + 1])])
        pads = [0] * (2 * rank)
        pads[rank + axis + 1] = k
        x = c.g.node("Pad", [x, c.g.ints(pads), fill])
        merged = shape[:axis] + [n * (k + 1)] + shape[axis + 1:]
        x = c.g.node("Reshape", [x, c.g.ints(reshape_spec(
            shape[:axis + 1] + [k + 1] + shape[axis + 1:], merged))])
        x = c.g.node("Slice", [x, c.g.ints([0]), c.g.ints([n + (n - 1) * k]),
                               c.g.ints([axis])])
        shape[axis] = n + (n - 1) * k
    return Tensor(x, tuple(shape))


def reduce_precision(c, args, params, aval):
    """``lax.reduce_precision`` to bfloat16's or float16's bits as a ``Cast`` there and back
    (rounding to nearest even, as XLA); a float32 value to float32's own bits as itself."""
    t, bits = args[0], (int(params["exponent_bits"]), int(params["mantissa_bits"]))
    narrow = {(8, 7): onnx.TensorProto.BFLOAT16, (5, 10): onnx.TensorProto.FLOAT16}
    if bits == (8, 23) and aval.dtype == np.float32:
        return t
    if bits not in narrow:
        raise TranslationError(f"reduce_precision to {bits[0]} exponent and {bits[1]} mantissa "
                               "bits (bfloat16's and float16's are covered)")
    down = c.g.node("Cast", [t.name], to=narrow[bits])
    return Tensor(c.g.node("Cast", [down], to=onnx_dtype(aval.dtype)), t.shape, t.nchw)


def min_pool(c, args, params, aval):
    """``reduce_window_min`` (an erosion) as ``-MaxPool(-x)``: padding ignored either way."""
    return c.then(onnx_arrays.pool(c, "MaxPool", [c.then(args[0], "Neg")], params, aval), "Neg")


_WINDOW_BODIES = {"min": ("MaxPool", "Min"), "max": ("MaxPool", "Max"),
                  "add": ("AveragePool", "Add")}


def reduce_window(c, args, params, aval):
    """A ``reduce_window`` of one ``min``, ``max`` or ``add`` from a constant init value
    (``lax.reduce_window(paddings, 1.0, lax.min, ...)``, which JAX keeps general where the init
    is not the op's identity) as that pooling, then combined with the init once: a window's
    padded taps hold the init, which that covers for a min or a max; a sum with padding takes
    an init of 0 only."""
    body = params["jaxpr"]
    eqns = getattr(body, "jaxpr", body).eqns
    name = eqns[0].primitive.name if len(eqns) == 1 else None
    if len(args) != 2 or name not in _WINDOW_BODIES or isinstance(args[1], Tensor):
        raise TranslationError(f"a reduce_window of {[e.primitive.name for e in eqns]} over "
                               f"{len(args) // 2} operand(s) (covered: one min, max or add, "
                               "from a constant init value)")
    init = np.asarray(args[1], aval.dtype)
    padded = any(tuple(int(v) for v in p) != (0, 0) for p in params["padding"])
    if name == "add" and padded and init != 0:
        raise TranslationError(f"a padded window sum from init {init} (each padded tap adds it)")
    window = {k: params[k] for k in ("window_dimensions", "window_strides", "padding",
                                     "base_dilation", "window_dilation")}
    pooled = min_pool(c, args[:1], window, aval) if name == "min" else \
        onnx_arrays.pool(c, _WINDOW_BODIES[name][0], args[:1], window, aval)
    if name == "add" and init == 0:
        return pooled
    return c.then(pooled, _WINDOW_BODIES[name][1], (init, aval.dtype))


HANDLERS = {
    **{prim: _unary(op) for prim, op in _ONE_OP.items()},
    "atan2": atan2, "cbrt": cbrt, "erf_inv": erf_inv, "is_finite": is_finite, "not": not_,
    "xor": xor,
    "argmin": onnx_arrays.arg_reduction("ArgMin"), "reduce_prod": reduce_prod,
    "reduce_and": _logical_reduction("ReduceMin"), "reduce_or": _logical_reduction("ReduceMax"),
    "cummax": _cumulative("ReduceMax", _lowest), "cummin": _cumulative("ReduceMin", _highest),
    "cumprod": _cumulative("ReduceProd", lambda dtype: 1),
    "cumlogsumexp": _cumulative("ReduceLogSumExp", _lowest),
    "sort": sort, "reduce_window_min": min_pool, "reduce_window": reduce_window,
    "reduce_precision": reduce_precision,
    "optimization_barrier": lambda c, args, params, aval: list(args),
}
