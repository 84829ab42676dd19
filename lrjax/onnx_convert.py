"""Translate the jaxpr of a CNN's inference pass into an ONNX graph.

Covers the primitives that Flax CNN inference lowers to under the ``"portable"`` formulation
policy (convolutions, pooling, dense layers, batch norm in inference, element-wise maths, shape
ops), with a symbolic batch dimension. Convolutions and pooling run in ONNX's NCHW layout: a 4-D
activation produced by a conv or a pool stays NCHW *physically* while the jaxpr sees NHWC, and
element-wise ops, slices, pads and reductions are applied in that layout (their constants and axes
permuted), so that a whole conv stack has one transpose at its input and one where it is
flattened. Constant sub-expressions (batch-norm statistics, broadcast biases) are folded at
export time. Every primitive has one entry in :data:`HANDLERS` (primitive name -> handler);
anything outside that table, or a form a handler does not cover, raises :class:`TranslationError`
naming the primitive and the layer (module path) it comes from. The graph passes run on the result
(folding batch norm into convs) are :mod:`lrjax.onnx_passes`'.

Why not jax2onnx: its release pins ``orbax-checkpoint<0.11.37`` (lrjax's checkpoints use a newer
Orbax) and pulls netron, huggingface-hub, equinox and dm-pix; CNN inference needs the ~30
translations below, each tested against ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.extend import core as jcore
from onnx import helper

from lrjax import macs, onnx_arrays, onnx_math, onnx_scatter
from lrjax.onnx_graph import (
    INT64_MAX,
    Graph,
    Tensor,
    TranslationError,
    channels_first,
    concrete,
    onnx_dtype,
    reshape_spec,
    same_dim,
    value_info,
)
from lrjax.onnx_loops import select_branch, unroll_scan, while_loop

__all__ = ["jaxpr_to_onnx", "TranslationError", "HANDLERS", "OPSET"]

OPSET = 17
TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
# Primitives that wrap a sub-jaxpr: translated inline.
_CALLS = macs.CALL_PRIMITIVES


class _Converter:
    """Walks a jaxpr, emitting ONNX nodes into a :class:`Graph` (one handler per primitive)."""

    def __init__(self, input_name: str = "input", input_shape: tuple = ()):
        self.g = Graph()
        # the graph input, whose leading dimension is the (symbolic) batch
        self.input_name, self.input_shape = input_name, input_shape
        self._batch = None

    # -- values --------------------------------------------------------------------------------
    def nhwc(self, t: Tensor) -> str:
        """The tensor's name in its logical (NHWC) layout."""
        if not t.nchw:
            return t.name
        return self.g.node("Transpose", [t.name], "to_nhwc", perm=list(TO_NHWC))

    def nchw(self, t: Tensor) -> str:
        if t.nchw:
            return t.name
        return self.g.node("Transpose", [t.name], "to_nchw", perm=list(TO_NCHW))

    def operand(self, v, layout_nchw: bool, rank: int) -> str:
        """An operand of an element-wise op computed in NCHW (or not)."""
        if isinstance(v, Tensor):
            return self.nchw(v) if layout_nchw and v.shape else self.nhwc(v)  # a scalar as is
        value = np.asarray(v)
        if layout_nchw and value.ndim == 4:
            value = value.transpose(TO_NCHW)
        elif layout_nchw and 0 < value.ndim < 4 and rank == 4:
            value = value.reshape((1,) * (4 - value.ndim) + value.shape).transpose(TO_NCHW)
        return self.g.const(value)

    def axis(self, t: Tensor, axis: int) -> int:
        """Physical axis of a logical (NHWC) axis."""
        return TO_NCHW.index(axis) if t.nchw else axis

    # -- the walk ------------------------------------------------------------------------------
    def run(self, jaxpr, consts, inputs, scope: str = ""):
        env: dict[Any, Any] = {}

        def read(v):
            if isinstance(v, jcore.Literal):  # a Python scalar: take the jaxpr's dtype
                return np.asarray(v.val, v.aval.dtype)
            return env[v]

        for var, c in zip(jaxpr.constvars, consts, strict=True):
            env[var] = _host(c)
        for var, t in zip(jaxpr.invars, inputs, strict=True):
            env[var] = t
        for eqn in jaxpr.eqns:
            args = [read(v) for v in eqn.invars]
            where = "/".join(p for p in (scope, str(eqn.source_info.name_stack)) if p)
            outs = self.eqn(eqn, args, where)
            for var, o in zip(eqn.outvars, outs, strict=True):
                env[var] = o
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, args, where: str) -> list:
        """Translate one equation (or fold it, when every input is a constant)."""
        name = eqn.primitive.name
        place = f"primitive {name!r} (layer {where or '<top level>'})"
        try:
            if name in _CALLS:
                params = eqn.params
                sub = params.get("jaxpr") or params.get("call_jaxpr") or params.get("fun_jaxpr")
                closed = sub if hasattr(sub, "consts") else None
                inner = closed.jaxpr if closed is not None else sub
                return self.run(inner, closed.consts if closed is not None else [], args, where)
            if name == "scan" and any(isinstance(a, Tensor) for a in args):
                return unroll_scan(self, eqn, args, where)
            if name == "cond" and not isinstance(args[0], Tensor):  # a branch known at export
                branch = eqn.params["branches"][int(np.clip(args[0], 0, len(  # (Jet's coupling
                    eqn.params["branches"]) - 1))]  # kind, per unrolled scan iteration)
                return self.run(branch.jaxpr, branch.consts, args[1:], where)
            if name in ("cond", "while"):  # on data: every branch, then Where; ONNX's Loop
                return (select_branch if name == "cond" else while_loop)(self, eqn, args, where)
            shapes = [tuple(getattr(o.aval, "shape", (1,))) for o in eqn.outvars]
            if all(all(map(concrete, s)) and 0 in s for s in shapes):  # empty (jnp.pad's edge
                return [np.zeros(s, o.aval.dtype) for s, o in zip(  # mode): no values to
                    shapes, eqn.outvars, strict=True)]  # compute (ONNX's Reshape reads 0 as "keep")
            if all(not isinstance(a, Tensor) for a in args) and name != "broadcast_in_dim" and \
                    not all(concrete(d) for o in eqn.outvars for d in o.aval.shape):
                args = [self.batched(a, v.aval) for a, v in zip(args, eqn.invars, strict=True)]
            symbolic = {"tile": "reps", "iota": "shape", "dim_as_value": "dim"}.get(name)
            size = eqn.outvars[0].aval.shape  # a product of constants folds (a kernel resampled)
            expands = name in ("conv_general_dilated", "dot_general") and not (  # but factors
                all(map(concrete, size)) and np.prod(size) <= sum(map(np.size, args)))  # u @ v
            if all(not isinstance(a, Tensor) for a in args) and not expands and not (  # constant,
                    symbolic and not all(map(concrete, jax.tree.leaves(eqn.params[symbolic])))):
                if name == "broadcast_in_dim":  # to 1 along a symbolic batch: ONNX broadcasts
                    shape = [d if concrete(d) else 1 for d in eqn.params["shape"]]
                    ranked = [1] * len(shape)
                    for i, d in zip(eqn.params["broadcast_dimensions"], np.shape(args[0]),
                                    strict=True):
                        ranked[i] = d
                    return [np.broadcast_to(np.reshape(args[0], ranked), shape)
                            .astype(eqn.outvars[0].aval.dtype)]
                outs = eqn.primitive.bind(*[jnp.asarray(a) for a in args], **eqn.params)
                outs = outs if eqn.primitive.multiple_results else [outs]
                return [_host(o) for o in outs]
            if name in ("dynamic_update_slice", "scatter", "scatter-add", "scatter-sub",
                        "scatter-mul"):
                # a constant folded to 1 along the batch: expanded to it
                args = [a if isinstance(a, Tensor) else self.batched(a, v.aval)
                        for a, v in zip(args, eqn.invars, strict=True)]
            if name == "dot_general":  # operands of other dtypes (a bool mask) cast first
                args = onnx_arrays.as_dtype(self, args, eqn.invars, eqn.outvars[0].aval.dtype)
            if name in ("argmax", "argmin") and eqn.invars[0].aval.dtype == bool:  # the first
                args = onnx_arrays.as_dtype(self, args, eqn.invars, np.int32)  # True (seq2seq)
            handler = HANDLERS.get(name)
            if handler is None:
                raise TranslationError("it has no ONNX translation (lrjax covers CNN inference: "
                                       "convs, pooling, dense, batch norm, element-wise ops)")
            out = handler(self, args, eqn.params, eqn.outvars[0].aval)
        except TranslationError as e:
            if str(e).startswith("cannot export"):
                raise
            raise TranslationError(f"cannot export {place} to ONNX: {e}") from None
        except Exception as e:  # a bug or an unforeseen form: still one line naming the layer
            hint = " (it computes values of the batch's shape from constants, e.g. a random " \
                "draw: export with fixed_batch=True)" if not any(isinstance(a, Tensor) for a in args) \
                and not all(concrete(d) for o in eqn.outvars for d in o.aval.shape) else ""
            raise TranslationError(f"cannot export {place} to ONNX{hint}: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}") from None
        return out if isinstance(out, list) else [out]

    def batched(self, value, aval):
        """A constant folded to 1 along the symbolic batch (a learned token broadcast) as a tensor
        of the batch, for a primitive whose result has the batch (a reshape of it)."""
        return value if all(map(concrete, aval.shape)) else Tensor(self.g.node("Expand", [
            self.g.const(np.asarray(value)), self.shape_tensor(aval.shape)]), tuple(aval.shape))

    # -- element-wise --------------------------------------------------------------------------
    def elementwise(self, op: str, args, aval, **attrs) -> Tensor:
        """An ONNX element-wise op on any number of operands, computed in NCHW when every 4-D
        tensor operand is stored NCHW."""
        tensors = [a for a in args if isinstance(a, Tensor)]
        rank = len(aval.shape)
        nchw = rank == 4 and all(t.nchw for t in tensors if len(t.shape) == 4) and any(
            t.nchw for t in tensors)
        names = [self.operand(a, nchw, rank) for a in args]
        return Tensor(self.g.node(op, names, **attrs), tuple(aval.shape), nchw)

    def clamp(self, args, aval, *, lower: bool) -> Tensor:
        """``max(x, c)`` (``lower``: ``c`` is a lower bound) or ``min(x, c)`` of a tensor and a
        uniform constant as Relu (``max(x, 0)``) or Clip, which ONNX Runtime fuses into the conv
        before it (keeping its blocked NCHWc layout); Max / Min otherwise."""
        tensors = [a for a in args if isinstance(a, Tensor)]
        consts = [np.asarray(a) for a in args if not isinstance(a, Tensor)]
        if len(tensors) == 1 and len(consts) == 1 and consts[0].size \
                and np.all(consts[0] == consts[0].flat[0]) \
                and tuple(tensors[0].shape) == tuple(aval.shape):
            t, bound = tensors[0], consts[0].flat[0]
            if lower and bound == 0:
                return Tensor(self.g.node("Relu", [t.name], "relu"), t.shape, t.nchw)
            clip_bound = self.g.const(np.asarray(bound, aval.dtype), "bound")
            inputs = [t.name, clip_bound] if lower else [t.name, "", clip_bound]
            return Tensor(self.g.node("Clip", inputs, "clip"), t.shape, t.nchw)
        return self.elementwise("Max" if lower else "Min", args, aval)

    def then(self, t: Tensor, op: str, *constants) -> Tensor:
        """``op(t, *constants)`` (``(value, dtype)`` pairs) on an element-wise result."""
        names = [t.name, *(self.g.const(np.asarray(c, dtype)) for c, dtype in constants)]
        return Tensor(self.g.node(op, names), t.shape, t.nchw)

    def round(self, args, params, aval):  # ONNX Round is half to even, as jnp.round
        """Half away from zero (``lax.round``'s default) as ``sign(x) * floor(|x| + 0.5)``."""
        if params["rounding_method"] == jax.lax.RoundingMethod.TO_NEAREST_EVEN:
            return self.elementwise("Round", args, aval)
        shifted = self.then(self.elementwise("Abs", args, aval), "Add", (0.5, aval.dtype))
        return self.elementwise("Mul", [self.then(shifted, "Floor"),
                                        self.elementwise("Sign", args, aval)], aval)

    def convert_element_type(self, args, params, aval):
        t = args[0]
        return Tensor(self.g.node("Cast", [t.name], to=onnx_dtype(params["new_dtype"])),
                       tuple(aval.shape), t.nchw)

    def select_n(self, args, params, aval):
        if len(args) != 3:
            raise TranslationError("select_n with more than two cases")
        pred, on_false, on_true = args
        return self.where(pred, on_true, on_false, aval)

    def where(self, pred, on_true, on_false, aval) -> Tensor:
        """``on_true`` where ``pred`` holds, else ``on_false``: ``Where``, or for booleans (ONNX
        Runtime has no boolean ``Where``: Gemma's sliding-window masks) their logic."""
        pred = pred if isinstance(pred, Tensor) else np.asarray(pred, bool)
        if np.dtype(aval.dtype) != np.bool_:
            return self.elementwise("Where", [pred, on_true, on_false], aval)
        negated = self.then(pred, "Not") if isinstance(pred, Tensor) else ~pred
        return self.elementwise("Or", [self.elementwise("And", [pred, on_true], aval),
                                       self.elementwise("And", [negated, on_false], aval)], aval)

    # -- shapes --------------------------------------------------------------------------------
    def reshape(self, args, params, aval):
        t, order = args[0], params.get("dimensions")  # order: lax.reshape's transpose first
        name, shape = self.nhwc(t), tuple(t.shape)
        if order is not None and tuple(order) != tuple(range(len(shape))):  # (vmap's batching)
            name = self.g.node("Transpose", [name], perm=[int(i) for i in order])
            shape = tuple(shape[i] for i in order)
        spec = reshape_spec(shape, tuple(aval.shape))
        return Tensor(self.g.node("Reshape", [name, self.g.ints(spec)]), tuple(aval.shape))

    def squeeze(self, args, params, aval):
        return self.reshape(args, {}, aval)

    def broadcast_in_dim(self, args, params, aval):
        t = args[0]
        shape, dims = tuple(aval.shape), tuple(params["broadcast_dimensions"])
        ranked = [1] * len(shape)  # the operand's dims in place, 1 elsewhere
        for i, d in zip(dims, t.shape, strict=True):
            ranked[i] = d
        x = self.nhwc(t)
        if tuple(ranked) != tuple(t.shape):
            x = self.g.node("Reshape", [x, self.g.ints(reshape_spec(t.shape, ranked))])
        if tuple(ranked) != shape:
            target = []
            for want, have in zip(shape, ranked, strict=True):
                if not concrete(want) and not same_dim(want, have):
                    raise TranslationError(f"a broadcast of {t.shape} to the symbolic batch "
                                           f"dimension of {shape}")
                target.append(int(want) if concrete(want) else 1)  # 1: Expand keeps the batch
            x = self.g.node("Expand", [x, self.g.ints(target)])
        return Tensor(x, shape)

    def transpose(self, args, params, aval):
        t = args[0]
        return Tensor(self.g.node("Transpose", [self.nhwc(t)],
                                   perm=[int(p) for p in params["permutation"]]),
                       tuple(aval.shape))

    def slice(self, args, params, aval):
        t = args[0]
        starts, limits = params["start_indices"], params["limit_indices"]
        steps = params.get("strides") or (1,) * len(starts)
        axes, s, e, st = [], [], [], []
        for ax, (a, b, c, full) in enumerate(zip(starts, limits, steps, t.shape, strict=True)):
            if a == 0 and c == 1 and (b is full or (concrete(b) and concrete(full)
                                                    and b == full)):
                continue
            axes.append(self.axis(t, ax))
            s.append(a)  # symbolic bounds (b - 1) computed from the batch
            e.append(INT64_MAX if not concrete(b) and same_dim(b, full) else b)
            st.append(int(c))
        if not axes:
            return t
        out = self.g.node("Slice", [t.name, self.shape_tensor(s), self.shape_tensor(e),
                                    self.g.ints(axes), self.g.ints(st)])
        return Tensor(out, tuple(aval.shape), t.nchw)

    def shape_tensor(self, dims) -> str:
        """A 1-D int64 tensor of ``dims``, a symbolic one being the graph input's batch."""
        if all(map(concrete, dims)):
            return self.g.ints([int(d) for d in dims])
        if self._batch is None:
            self._batch = self.g.node("Shape", [self.input_name], "batch", start=0, end=1)
        parts = [self.g.ints([int(d)]) if concrete(d) else self._affine(d) for d in dims]
        return self.g.node("Concat", parts, "dims", axis=0)

    def _affine(self, d) -> str:
        """A symbolic dimension ``a * batch + k`` (``b - 1``: jnp.pad's edge slice) as a
        1-element int64 tensor."""
        for offset in range(-8, 9):  # a = (d - k) // batch: a MoE's 32*b routed tokens too
            a = (d - offset) // self.input_shape[0]
            k = d - a * self.input_shape[0] if concrete(a) and int(a) > 0 else None
            if k is not None and concrete(k):
                a = int(a)
                scaled = self._batch if a == 1 else self.g.node("Mul", [self._batch,
                                                                        self.g.ints([a])])
                return scaled if k == 0 else self.g.node("Add", [scaled, self.g.ints([int(k)])])
        raise TranslationError(f"a dimension {d} other than a multiple of the batch")

    def tile(self, args, params, aval):
        """``jnp.tile`` (a class token repeated over the batch) as ONNX ``Tile``."""
        x = args[0]
        name = self.nhwc(x) if isinstance(x, Tensor) else self.g.const(np.asarray(x))
        out = self.g.node("Tile", [name, self.shape_tensor(params["reps"])])
        return Tensor(out, tuple(aval.shape))

    def pad(self, args, params, aval):
        t, value = args
        config = params["padding_config"]
        if any(interior for _, _, interior in config):  # values between neighbours first
            t = onnx_math.dilated(self, t, config, value)
        order = TO_NCHW if t.nchw else tuple(range(len(config)))
        lo = [int(config[ax][0]) for ax in order]
        hi = [int(config[ax][1]) for ax in order]
        x = t.name
        if min(lo + hi) < 0:  # negative padding crops
            starts = [max(0, -v) for v in lo]
            ends = [-max(0, -v) if v < 0 else INT64_MAX for v in hi]
            x = self.g.node("Slice", [x, self.g.ints(starts), self.g.ints(ends),
                                      self.g.ints(list(range(len(lo))))])
            lo, hi = [max(0, v) for v in lo], [max(0, v) for v in hi]
        if max(lo + hi) > 0:
            x = self.g.node("Pad", [x, self.g.ints(lo + hi), self.g.const(np.asarray(value))])
        return Tensor(x, tuple(aval.shape), t.nchw)

    def concatenate(self, args, params, aval):
        axis = params["dimension"]  # empty pieces (jnp.pad's edge mode) add nothing
        args = [a for a in args if not _empty_along(a, axis)]
        tensors = [a for a in args if isinstance(a, Tensor)]
        nchw = len(aval.shape) == 4 and all(t.nchw for t in tensors)
        axis = TO_NCHW.index(params["dimension"]) if nchw else params["dimension"]
        names = [self.operand(a, nchw, len(aval.shape)) for a in args]
        for i, a in enumerate(args):  # a constant (a class token) folded to 1 along the batch
            if not isinstance(a, Tensor) and not all(map(concrete, aval.shape)):
                dims = [np.shape(a)[k] if k == params["dimension"] else d
                        for k, d in enumerate(aval.shape)]
                dims = [dims[k] for k in TO_NCHW] if nchw else dims
                names[i] = self.g.node("Expand", [names[i], self.shape_tensor(dims)])
        return Tensor(self.g.node("Concat", names, axis=int(axis)), tuple(aval.shape), nchw)

    def reduction(self, op: str, args, params, aval) -> Tensor:
        """``ReduceSum`` / ``ReduceMax`` / ``ReduceMin`` over the primitive's axes; over none
        (``jnp.sum(x, axis=())``) the input itself, where ONNX's would reduce every axis."""
        t = args[0]
        if not params["axes"]:
            return t
        axes = [self.axis(t, int(a)) for a in params["axes"]]
        if op == "ReduceSum":  # opset 13+: axes as an input
            out = self.g.node(op, [t.name, self.g.ints(axes)], keepdims=0)
        else:  # ReduceMax / ReduceMin take axes as an attribute until opset 18
            out = self.g.node(op, [t.name], axes=axes, keepdims=0)
        kept = [a for a in (TO_NCHW if t.nchw else range(len(t.shape))) if a not in params["axes"]]
        if kept != sorted(kept):  # physical order of the remaining axes differs: restore it
            out = self.g.node("Transpose", [out], perm=[kept.index(a) for a in sorted(kept)])
        return Tensor(out, tuple(aval.shape))

    # -- convolutions, pooling, dense --------------------------------------------------------
    def conv(self, args, params, aval):
        """``conv_general_dilated`` in any layout (``nn.Conv``'s channels-last ``N...C`` /
        ``...IO``, a PyTorch port's ``NCHW`` / ``OIHW``, ``jnp.convolve``'s ``NCW``) as ONNX's
        ``Conv`` on ``(N, C, *spatial)``: each operand transposed by its dimension numbers (no
        transpose where it is already there), the output back to the jaxpr's layout. An
        input-dilated conv (a transposed conv, 1-D, 2-D or 3-D) as :meth:`conv_transpose`, or
        zero insertion."""
        x, w = args
        lhs, rhs, out = (tuple(d) for d in params["dimension_numbers"])
        pads = [tuple(int(v) for v in p) for p in params["padding"]]
        if params.get("batch_group_count", 1) != 1 or min(v for p in pads for v in p) < 0:
            raise TranslationError(f"a conv with batch_group_count != 1 or padding {pads}")
        n = len(pads)  # spatial dims: 1-D, 2-D and 3-D+ as ONNX's (N, C, ...)
        nhwc = channels_first(2)  # Flax's 2-D layout, held in NCHW between layers (Tensor.nchw)
        source = self.nchw(x) if n == 2 and lhs == nhwc else self._permuted(self.nhwc(x), lhs)
        if any(d != 1 for d in params["lhs_dilation"]):  # a transposed conv (nn.ConvTranspose)
            native = self.conv_transpose(source, w, rhs, params)
            if native is not None:
                return self._laid_out(native, out, aval)
            shape = [x.shape[i] for i in (lhs[0], *lhs[2:], lhs[1])]  # (N, *spatial, C)
            source = self.g.dilate(source, shape, [int(d) for d in params["lhs_dilation"]],
                                   aval.dtype)
        y = self.g.node("Conv", [source, self.kernel(w, rhs)], "conv",
                        pads=[p[0] for p in pads] + [p[1] for p in pads],
                        strides=[int(s) for s in params["window_strides"]],
                        dilations=[int(d) for d in params["rhs_dilation"]],
                        group=int(params["feature_group_count"]))
        return self._laid_out(y, out, aval)

    def _permuted(self, name: str, perm) -> str:
        """``name`` transposed by ``perm`` (no node for the identity)."""
        if tuple(perm) == tuple(range(len(perm))):
            return name
        return self.g.node("Transpose", [name], perm=list(perm))

    def _laid_out(self, y: str, out_spec, aval) -> Tensor:
        """A conv's ONNX output ``(N, C, *spatial)`` as a Tensor of the jaxpr's ``out_spec``
        layout: a 2-D channels-last one left in NCHW (:attr:`Tensor.nchw`), others transposed."""
        if out_spec == channels_first(2):
            return Tensor(y, tuple(aval.shape), True)
        return Tensor(self._permuted(y, np.argsort(out_spec)), tuple(aval.shape))

    def kernel(self, w, perm) -> str:
        """A conv kernel (``...IO``, a constant or a traced tensor) in ONNX's ``(O, I, ...)``."""
        if isinstance(w, Tensor):
            return self.g.node("Transpose", [self.nhwc(w)], perm=list(perm))
        return self.g.const(np.ascontiguousarray(np.asarray(w).transpose(perm)), "weight")

    def conv_transpose(self, source: str, w, rhs_spec, params) -> str | None:
        """An input-dilated conv (``nn.ConvTranspose``) as ONNX ``ConvTranspose`` (zero insertion
        then ``Conv`` also multiplies the holes: ~4x the work at stride 2): stride ``s``, the
        kernel flipped, ``pads`` ``k_eff - 1 - lo`` / ``k_eff - 1 - hi`` (``k_eff``: the dilated
        kernel's extent). ``None`` where that does not apply (window strides, groups, padding
        beyond ``k_eff - 1``, a traced kernel): the caller inserts the zeros."""
        if any(int(s) != 1 for s in params["window_strides"]) or \
                int(params["feature_group_count"]) != 1 or isinstance(w, Tensor):
            return None
        kernel = np.asarray(w).transpose(*rhs_spec[2:], *rhs_spec[1::-1])  # as (...)IO
        n = kernel.ndim - 2
        pads = [((k - 1) * d - int(lo), (k - 1) * d - int(hi)) for k, d, (lo, hi) in zip(
            kernel.shape[:n], params["rhs_dilation"], params["padding"], strict=True)]
        if min(v for p in pads for v in p) < 0:
            return None
        flipped = kernel[(slice(None, None, -1),) * n]  # (C, N, *window), flipped
        weight = self.g.const(np.ascontiguousarray(flipped.transpose(n, n + 1, *range(n))),
                              "weight")
        y = self.g.node("ConvTranspose", [source, weight], "conv_transpose",
                        strides=[int(d) for d in params["lhs_dilation"]],
                        dilations=[int(d) for d in params["rhs_dilation"]],
                        pads=[p[0] for p in pads] + [p[1] for p in pads])
        return y

    def matmul(self, args, params, aval):
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        lhs, rhs = args
        lhs_rank = len(lhs.shape) if isinstance(lhs, Tensor) else np.ndim(lhs)
        rhs_rank = len(rhs.shape) if isinstance(rhs, Tensor) else np.ndim(rhs)
        if not lb and not rb and tuple(lc) == (lhs_rank - 1,) and tuple(rc) == (0,) \
                and rhs_rank == 2:
            names = [self.nhwc(a) if isinstance(a, Tensor) else self.g.const(np.asarray(a),
                                                                             "weight")
                     for a in (lhs, rhs)]
            return Tensor(self.g.node("MatMul", names, "matmul"), tuple(aval.shape))
        return self.einsum(args, params, aval)

    def einsum(self, args, params, aval):
        """Any other ``dot_general`` (DenseGeneral, einsum layers, attention's products, a
        bilinear resize's interpolation matrices) as one ONNX ``Einsum``: batch dims first, then
        the lhs's free dims, then the rhs's, as in JAX."""
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        ranks = [len(a.shape) if isinstance(a, Tensor) else np.ndim(a) for a in args]
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        lhs = [next(letters) for _ in range(ranks[0])]
        rhs = [next(letters) for _ in range(ranks[1])]
        for i, j in zip(list(lc) + list(lb), list(rc) + list(rb), strict=True):
            rhs[j] = lhs[i]
        out = ([lhs[i] for i in lb] + [c for i, c in enumerate(lhs) if i not in (*lc, *lb)]
               + [c for j, c in enumerate(rhs) if j not in (*rc, *rb)])
        names = [self.nhwc(a) if isinstance(a, Tensor) else self.g.const(np.asarray(a), "weight")
                 for a in args]
        equation = f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"
        return Tensor(self.g.node("Einsum", names, "einsum", equation=equation),
                       tuple(aval.shape))


def _op(onnx_op: str):
    """The handler of a primitive that is one ONNX element-wise op."""
    return lambda c, args, params, aval: c.elementwise(onnx_op, args, aval)


def _method(name: str, *extra):
    return lambda c, args, params, aval: getattr(c, name)(*extra, args, params, aval)


# primitive name -> handler(converter, args, params, out_aval) -> Tensor
HANDLERS: dict[str, Any] = {
    # element-wise, one ONNX op each
    **{prim: _op(op) for prim, op in {
        "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow",
        "gt": "Greater", "lt": "Less", "eq": "Equal", "ge": "GreaterOrEqual",
        "le": "LessOrEqual", "and": "And", "or": "Or", "neg": "Neg", "exp": "Exp", "log": "Log",
        "sqrt": "Sqrt", "tanh": "Tanh", "logistic": "Sigmoid", "abs": "Abs", "erf": "Erf",
        "sign": "Sign", "floor": "Floor", "ceil": "Ceil", "sin": "Sin", "cos": "Cos"}.items()},
    "exp2": lambda c, args, params, aval: c.elementwise("Pow", [np.asarray(2, aval.dtype),
                                                                args[0]], aval),
    "rsqrt": lambda c, args, params, aval: c.then(c.elementwise("Sqrt", args, aval), "Reciprocal"),
    "expm1": lambda c, args, params, aval: c.then(c.elementwise("Exp", args, aval), "Sub",
                                                  (1, aval.dtype)),  # ELU, SELU, CELU
    "ne": lambda c, args, params, aval: c.then(c.elementwise("Equal", args, aval), "Not"),
    "erfc": lambda c, args, params, aval: c.then(c.then(c.elementwise("Erf", args, aval), "Neg"),
                                                 "Add", (1, aval.dtype)),
    "log1p": lambda c, args, params, aval: c.then(c.elementwise(  # softplus, mish
        "Add", [args[0], np.asarray(1, aval.dtype)], aval), "Log"),
    "square": lambda c, args, params, aval: c.elementwise("Mul", [args[0], args[0]], aval),
    # lax.rem keeps the dividend's sign (C's fmod), as ONNX's Mod with fmod=1, ints included
    "rem": lambda c, args, params, aval: c.elementwise("Mod", args, aval, fmod=1),
    "integer_pow": lambda c, args, params, aval: c.elementwise(
        "Pow", [args[0], np.asarray(params["y"], aval.dtype)], aval),
    **{prim: (lambda c, args, params, aval: args[0]) for prim in (  # sharding: none in a graph
        "copy", "stop_gradient", "reshard", "sharding_constraint")},
    "clamp": lambda c, args, params, aval: c.elementwise("Max", [c.elementwise(  # lax.clamp
        "Min", args[1:], aval), args[0]], aval),
    "max": lambda c, args, params, aval: c.clamp(args, aval, lower=True),
    "min": lambda c, args, params, aval: c.clamp(args, aval, lower=False),
    # one converter method each, named after the primitive
    **{prim: _method(prim) for prim in (
        "round", "convert_element_type", "select_n",
        "reshape", "squeeze", "broadcast_in_dim", "transpose", "slice", "tile", "pad",
        "concatenate")},
    **{prim: getattr(onnx_arrays, prim) for prim in onnx_arrays.__all__},
    **onnx_math.HANDLERS,  # trigonometry, cumulative reductions, sort, min pooling, ...
    **onnx_scatter.HANDLERS,  # scatter-add, scatter-mul (scatter: onnx_arrays.scatter)
    "reduce_sum": _method("reduction", "ReduceSum"),
    "reduce_max": _method("reduction", "ReduceMax"),
    "reduce_min": _method("reduction", "ReduceMin"),
    # convolutions, pooling, dense
    "conv_general_dilated": _method("conv"),
    "reduce_window_max": lambda c, args, params, aval: onnx_arrays.pool(c, "MaxPool", args, params, aval),
    "reduce_window_sum": lambda c, args, params, aval: onnx_arrays.pool(c, "AveragePool", args,
                                                                        params, aval),
    "dot_general": _method("matmul"),
}


def _empty_along(value, axis: int) -> bool:
    """Whether a concatenation's piece has no entries along ``axis`` (known at export)."""
    n = (value.shape if isinstance(value, Tensor) else np.shape(value))[axis]
    return concrete(n) and n == 0


def _host(value):
    """A constant as a NumPy array; a ``jax.random`` key as it is (a fixed key's draws fold)."""
    return value if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) else np.asarray(value)


def jaxpr_to_onnx(closed_jaxpr, input_names=("input",), output_names=("output",),
                  *, graph_name: str = "lrjax", opset: int = OPSET) -> onnx.ModelProto:
    """An ONNX model computing a closed jaxpr of array inputs (one or more, the batch first in
    each) and one or more array outputs.

    Args:
      closed_jaxpr: e.g. ``jax.make_jaxpr(f)(jax.ShapeDtypeStruct(symbolic_shape, float32))``;
        a symbolic leading dimension (one symbol for every input) becomes ``batch``.
      input_names, output_names: the ONNX graph's tensor names, one per jaxpr input / output.

    Raises:
      TranslationError: a primitive (or a form of one) the translation does not cover, naming
        it and its layer.
    """
    jaxpr, input_names = closed_jaxpr.jaxpr, list(input_names)
    if len(jaxpr.invars) != len(input_names) or len(jaxpr.outvars) != len(output_names):
        raise TranslationError(f"ONNX export takes a function of {len(input_names)} arrays "
                               f"returning {len(output_names)}")
    shapes = [tuple(v.aval.shape) for v in jaxpr.invars]
    conv = _Converter(input_names[0], shapes[0])
    outs = conv.run(jaxpr, closed_jaxpr.consts,
                    [Tensor(n, s) for n, s in zip(input_names, shapes, strict=True)])
    for out, name, var in zip(outs, output_names, jaxpr.outvars, strict=True):
        if not isinstance(out, Tensor):  # an output of constants: stored (expanded to the batch
            out = conv.batched(out, var.aval)  # where its shape has it: SAM 2's position code)
        source = conv.nhwc(out) if isinstance(out, Tensor) else conv.g.const(np.asarray(out))
        conv.g.nodes.append(helper.make_node("Identity", [source], [name]))
    graph = helper.make_graph(
        conv.g.nodes, graph_name, [value_info(n, v.aval) for n, v in zip(
            input_names, jaxpr.invars, strict=True)],
        [value_info(name, v.aval) for name, v in zip(output_names, jaxpr.outvars, strict=True)],
        conv.g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lrjax")
    model.ir_version = min(model.ir_version, 9)  # readable by ONNX Runtime releases of 2024+
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:  # a translation bug: still one line
        raise TranslationError(f"the translated graph fails ONNX's checker: "
                               f"{str(e).splitlines()[0]}") from None
    return model
