"""The ONNX graph a translation builds (:mod:`lrjax.onnx_convert`): nodes and initializers with
unique names, the values flowing between them (name, logical shape, physical layout), and the
small conversions the handlers share (dtypes, reshape specs, symbolic dimensions)."""

from __future__ import annotations

import dataclasses
import hashlib

import jax.numpy as jnp
import numpy as np
from onnx import TensorProto, helper, numpy_helper

__all__ = ["INT64_MAX", "TranslationError", "Tensor", "Graph", "concrete", "same_dim",
           "onnx_dtype", "reshape_spec", "value_info", "channels_first", "channels_last"]

INT64_MAX = np.iinfo(np.int64).max


class TranslationError(ValueError):
    """A jaxpr the translator cannot express in ONNX: the message names the primitive and the
    layer it comes from."""


@dataclasses.dataclass
class Tensor:
    """A non-constant value: its ONNX name, logical (jaxpr) shape and physical layout."""

    name: str
    shape: tuple  # logical shape; symbolic dims (the batch) are not ints
    nchw: bool = False  # a 4-D value stored NCHW while the jaxpr sees NHWC


class Graph:
    """The nodes and initializers of the graph being built."""

    def __init__(self):
        self.nodes, self.initializers = [], []
        self._names: dict[str, int] = {}
        self._stored: dict[tuple, str] = {}  # (dtype, shape, bytes' digest) -> initializer

    def name(self, hint: str) -> str:
        i = self._names.get(hint, 0)
        self._names[hint] = i + 1
        return f"{hint}_{i}"

    def node(self, op: str, inputs, hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const(self, value, hint: str = "const") -> str:
        """An initializer holding ``value``; its name. Equal values are stored once: a scan's
        broadcast weights (an LSTM's kernels) are read by every unrolled step."""
        value = np.asarray(value)  # (np.ascontiguousarray makes a scalar 1-D)
        key = (value.dtype.str, value.shape, hashlib.sha1(value.tobytes()).digest())
        if key not in self._stored:
            self._stored[key] = self.name(hint)
            self.initializers.append(numpy_helper.from_array(value, self._stored[key]))
        return self._stored[key]

    def ints(self, values, hint="shape") -> str:
        return self.const(np.asarray(values, np.int64), hint)

    def dilate(self, name: str, shape, factors, dtype) -> str:
        """A channels-first ``(N, C, *spatial)`` tensor of channels-last ``shape``
        ``(N, *spatial, C)`` with ``factor - 1`` zeros between neighbours along each spatial axis
        (what ``lhs_dilation`` does before the conv): reshape to ``(N, C, d1, 1, d2, 1, ...)``,
        pad the unit dims to the factors, merge them back and drop the trailing zeros."""
        dims, c = [int(d) for d in shape[1:-1]], int(shape[-1])
        n = len(dims)
        x = self.node("Reshape", [name, self.ints([0, c, *(v for d in dims for v in (d, 1))])])
        ends = [0, 0] + [v for f in factors for v in (0, f - 1)]  # after each unit dim
        x = self.node("Pad", [x, self.ints([0] * (2 + 2 * n) + ends),
                              self.const(np.asarray(0, dtype))])
        x = self.node("Reshape", [x, self.ints([0, c, *(d * f for d, f in zip(
            dims, factors, strict=True))])])
        return self.node("Slice", [x, self.ints([0] * n),
                                   self.ints([(d - 1) * f + 1 for d, f in zip(
                                       dims, factors, strict=True)]),
                                   self.ints(list(range(2, 2 + n)))])


def channels_first(n: int) -> tuple:
    """The permutation taking an ``(N, *spatial[n], C)`` tensor (Flax's channels-last layout,
    as a jaxpr's conv dimension numbers write it) to ONNX's ``(N, C, *spatial)``."""
    return (0, n + 1, *range(1, n + 1))


def channels_last(n: int) -> list:
    """The inverse of :func:`channels_first`: ``(N, C, *spatial[n])`` to ``(N, *spatial, C)``."""
    return [0, *range(2, n + 2), 1]


def concrete(d) -> bool:
    return isinstance(d, (int, np.integer))


def same_dim(a, b) -> bool:
    """Whether two dimensions (ints or symbolic) are known to be equal."""
    try:
        return a is b or bool(a == b)
    except Exception:  # an inconclusive symbolic comparison
        return False


def value_info(name: str, aval):
    """A graph input's or output's ONNX type: its dtype and shape, a symbolic dim ``batch``."""
    dims = ["batch" if not concrete(d) else int(d) for d in aval.shape]
    return helper.make_tensor_value_info(name, onnx_dtype(aval.dtype), dims)


def onnx_dtype(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype == np.dtype(jnp.bfloat16):
        return TensorProto.BFLOAT16
    return helper.np_dtype_to_tensor_dtype(dtype)


def reshape_spec(in_shape, out_shape) -> list[int]:
    """ONNX Reshape's shape input: 0 copies the (symbolic) batch, -1 infers one dim."""
    spec = []
    for i, d in enumerate(out_shape):
        if concrete(d):
            spec.append(int(d))
        elif i < len(in_shape) and in_shape[i] is d:
            spec.append(0)
        else:
            spec.append(-1)
    if spec.count(-1) > 1:
        raise TranslationError(f"a reshape {in_shape} -> {out_shape} with two symbolic "
                               "dimensions")
    return spec
