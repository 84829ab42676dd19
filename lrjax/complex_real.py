"""Complex arithmetic on data as pairs of real arrays, for the runtimes that take no complex
tensors: ONNX Runtime (no complex kernels) and LiteRT ("'vhlo.fft_v1' op is not part of the
vhlo support yet").

A model's spectral layers compute with complex values between real inputs and real outputs:
FNet's token mixing (``jnp.fft.fftn(x).real``), a global filter (``irfft2(rfft2(x) * w)``), the
long convolutions of S4 and Hyena (``irfft(rfft(u, 2L) * rfft(k, 2L))``). :func:`replayed`
replays such a traced program (:func:`lrjax.replay.run`) with every complex value held as its
real and imaginary parts (:class:`Pair`) and every ``fft`` as products with the DFT's cosine
and sine matrices along each transformed axis: ``n x n`` entries for an axis of length ``n``,
``O(n^2)`` work, as FNet's own TPU path computes it; meant for the feature and sequence lengths
models transform, not for long signals. Complex constants computed from the weights alone (a
filter's spectrum) are split where the data meets them. Covered: casts to complex, ``real``,
``imag``, ``complex``, ``conj``, ``+``, ``-``, ``*``, ``/``, ``abs``, ``exp``,
``dot_general`` and ``conv_general_dilated`` (a complex filter bank: perch's Gabor / Morlet
front end), the four FFT types, and the ops that move or sum values without mixing real
and imaginary parts (reshape, transpose, slice, pad, concatenate, gather, ``select_n``,
``reduce_sum``, ...), in loops and conditionals too (``lax.map``, ``scan``, ``while_loop``,
``cond``: rebuilt around their replayed bodies, complex carries as pairs: an unrolled inverse
solver's circular convolutions by FFT inside a conjugate-gradient loop, as lanl/scico's MoDL
and ODP nets run theirs); another complex op (or a complex output) is a
:class:`ComplexError` naming it and its layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lrjax import macs, replay

__all__ = ["Pair", "ComplexError", "holds_complex", "replayed", "dft_along"]


class ComplexError(replay.ReplayError):
    """A complex value the real replay cannot hold: ``primitive`` (in ``layer``) and why."""

    def __init__(self, primitive: str, layer: str, reason: str):
        self.primitive, self.layer, self.reason = primitive, layer or "<top level>", reason
        super().__init__(f"primitive {primitive!r} (layer {self.layer}): {reason}")


class Pair(NamedTuple):
    """A complex value as its real and imaginary parts (real arrays or tracers, one shape)."""
    re: Any
    im: Any


# primitives that move, select or sum values: applied to the real and the imaginary parts alike
_SEPARABLE = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice", "rev",
    "dynamic_slice", "dynamic_update_slice", "gather", "concatenate", "pad", "select_n",
    "reduce_sum", "cumsum", "copy", "copy_p", "add_any", "reduce_precision", "scatter",
    "scatter-add", "tile", "split"})


def _complex(aval) -> bool:
    return jnp.issubdtype(getattr(aval, "dtype", np.float32), jnp.complexfloating)


def holds_complex(closed) -> bool:
    """Whether a closed jaxpr (its calls, loops and conditionals included) computes a complex
    value."""
    return any(_complex(v.aval) for eqn, _ in macs.iter_eqns(closed) for v in eqn.outvars)


def replayed(closed):
    """A function of ``closed``'s flat inputs computing its flat outputs with complex values as
    :class:`Pair` s (the module's docstring); its outputs must be real."""
    def run(*args):
        outs = replay.run(closed.jaxpr, closed.consts, list(args), _rule)
        if any(isinstance(o, Pair) or _complex(o) for o in outs):
            raise ComplexError("output", "", "a complex output: return its real and imaginary "
                               "parts (jnp.real, jnp.imag) or its magnitude instead")
        return outs

    return run


def _parts(value, aval):
    """``(re, im)`` of a complex operand (a Pair or a constant); a real one as itself twice."""
    if isinstance(value, Pair):
        return value
    if _complex(aval):
        return np.real(value), np.imag(value)
    return value, value


def _sized(eqn) -> bool:
    """Whether ``eqn`` holds no symbolic size: an array made from constants alone but as long
    as the symbolic batch (``jnp.zeros(x.shape)``), or the batch's size as a value (the lengths
    of a padded batch), is staged, not evaluated."""
    return eqn.primitive.name != "dim_as_value" and all(
        isinstance(d, (int, np.integer)) for v in eqn.outvars
        for d in getattr(v.aval, "shape", ()))


def _real_dtype(aval):
    return jnp.finfo(aval.dtype).dtype


def _rule(eqn, ins, here):
    name = eqn.primitive.name
    if not any(isinstance(a, (Pair, jax.core.Tracer)) for a in ins) and _sized(eqn):
        with jax.ensure_compile_time_eval():  # constants alone (S4's HiPPO matrix, its kernel
            return replay.bind(eqn, ins)  # from the weights): evaluated, complex ones kept
    touches = any(isinstance(a, Pair) for a in ins) or any(_complex(v.aval) for v in eqn.outvars)
    if name in _LOOPS and (touches or any(holds_complex(sub) for sub in
                                          jcore.jaxprs_in_params(eqn.params))):
        # a loop or conditional computing with complex values (a CG solve whose operator is a
        # circular convolution by FFT, inside ``lax.map`` over the batch): rebuilt around its
        # bodies replayed so, complex carries held as pairs
        held = [_held(a, v.aval) for a, v in zip(ins, eqn.invars, strict=True)]
        return replay.rebuilt(eqn, held, lambda closed: _paired(closed, here))
    if not touches or replay.call_jaxpr(eqn) is not None:
        return None  # real values (or a call: inlined, each equation seen here)
    avals = [v.aval for v in eqn.invars]
    if name in _SEPARABLE:
        parts = [_parts(a, v) for a, v in zip(ins, avals, strict=True)]
        re = replay.bind(eqn, [p[0] for p in parts])
        im = replay.bind(eqn, [p[1] for p in parts])
        return [Pair(r, i) if _complex(v.aval) else r
                for r, i, v in zip(re, im, eqn.outvars, strict=True)]
    handler = _HANDLERS.get(name)
    if handler is None:
        raise ComplexError(name, str(here.name_stack), "complex values in it have no real "
                           "form for export (covered: FFTs, arithmetic, exp, abs, products, convs, "
                           "moves, sums)")
    return [handler(eqn, ins, avals)]


_LOOPS = ("scan", "while", "cond")


def _held(value, aval):
    """A complex value as a :class:`Pair` of arrays (one structure through a loop's carry and
    its branches), a real one as it is."""
    if isinstance(value, Pair) or not _complex(aval):
        return value
    return Pair(jnp.real(value), jnp.imag(value))


def _paired(closed, caller):
    """A loop's or branch's body (a closed jaxpr) as a function of its input values, replayed
    with complex values as pairs."""
    def body(*values):
        values = [_held(x, v.aval) for x, v in zip(values, closed.jaxpr.invars, strict=True)]
        outs = replay.run(closed.jaxpr, closed.consts, values, _rule, caller)
        return [_held(o, v.aval) for o, v in zip(outs, closed.jaxpr.outvars, strict=True)]

    return body


def _binary(eqn, ins, avals):
    (a, b), (c, d) = (_parts(x, v) if _complex(v) else (x, jnp.zeros_like(x))
                      for x, v in zip(ins, avals, strict=True))
    name = eqn.primitive.name
    if name in ("add", "sub"):
        sign = 1 if name == "add" else -1
        return Pair(a + sign * c, b + sign * d)
    if name == "mul":
        return Pair(a * c - b * d, a * d + b * c)
    norm = c * c + d * d  # div
    return Pair((a * c + b * d) / norm, (b * c - a * d) / norm)


def _convert(eqn, ins, avals):
    x, dtype = ins[0], np.dtype(eqn.params["new_dtype"])
    if not jnp.issubdtype(dtype, jnp.complexfloating):  # the real part, as NumPy casts
        return (x.re if isinstance(x, Pair) else jnp.real(x)).astype(dtype)
    part = jnp.finfo(dtype).dtype
    if isinstance(x, Pair):
        return Pair(x.re.astype(part), x.im.astype(part))
    x = jnp.asarray(x).astype(part)
    return Pair(x, jnp.zeros_like(x))


def _bilinear(eqn, ins, avals):
    """A ``dot_general`` or a conv (bilinear in its two operands) of complex values: its real
    products, two where one operand is real, four otherwise."""
    params = dict(eqn.params, preferred_element_type=_real_dtype(eqn.outvars[0].aval))
    (a, b), (c, d) = (_parts(x, v) if _complex(v) else (x, None)
                      for x, v in zip(ins, avals, strict=True))

    def dot(x, y):
        return replay.bind(eqn, [x, y], params)[0]

    if b is None:
        return Pair(dot(a, c), dot(a, d))
    if d is None:
        return Pair(dot(a, c), dot(b, c))
    return Pair(dot(a, c) - dot(b, d), dot(a, d) + dot(b, c))


def dft_along(x: Pair, axis: int, n: int, inverse: bool) -> Pair:
    """The DFT (``inverse``: the inverse DFT, divided by ``n``) of ``x`` along ``axis`` of
    length ``n``, as products with the cosine and sine matrices: ``X W`` with
    ``W = C - iS`` (``C + iS``, over ``n``, for the inverse)."""
    angle = 2 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
    dtype = x.re.dtype
    cos = (np.cos(angle) / (n if inverse else 1)).astype(dtype)
    sin = (np.sin(angle) / (n if inverse else 1) * (1 if inverse else -1)).astype(dtype)
    re, im = (jnp.moveaxis(p, axis, -1) for p in x)
    out = Pair(re @ cos - im @ sin, re @ sin + im @ cos)
    return Pair(*(jnp.moveaxis(p, -1, axis) for p in out))


def _fft(eqn, ins, avals):
    kind, lengths = eqn.params["fft_type"], [int(n) for n in eqn.params["fft_lengths"]]
    kind = getattr(kind, "name", str(kind)).split(".")[-1].upper()
    x, k = ins[0], len(lengths)
    axes = list(range(-k, 0))
    if kind in ("FFT", "IFFT"):
        for axis, n in zip(axes, lengths, strict=True):
            x = dft_along(x, axis, n, inverse=kind == "IFFT")
        return x
    if kind == "RFFT":  # real input: the last axis's first n // 2 + 1 frequencies
        n = lengths[-1]
        angle = 2 * np.pi * np.outer(np.arange(n), np.arange(n // 2 + 1)) / n
        last = jnp.asarray(x)
        x = Pair(last @ np.cos(angle).astype(last.dtype), last @ (-np.sin(angle)).astype(
            last.dtype))
        for axis, m in zip(axes[:-1], lengths[:-1], strict=True):
            x = dft_along(x, axis, m, inverse=False)
        return x
    # IRFFT: the inverse over the other axes, then the real signal of n from n // 2 + 1 terms
    for axis, m in zip(axes[:-1], lengths[:-1], strict=True):
        x = dft_along(x, axis, m, inverse=True)
    n, terms = lengths[-1], int(x.re.shape[-1])
    weight = np.where((np.arange(terms) == 0) | (2 * np.arange(terms) == n), 1.0, 2.0) / n
    angle = 2 * np.pi * np.outer(np.arange(terms), np.arange(n)) / n
    dtype = x.re.dtype
    return x.re @ (weight[:, None] * np.cos(angle)).astype(dtype) + x.im @ (
        -weight[:, None] * np.sin(angle)).astype(dtype)


_HANDLERS = {
    "add": _binary, "sub": _binary, "mul": _binary, "div": _binary,
    "convert_element_type": _convert, "dot_general": _bilinear,
    "conv_general_dilated": _bilinear, "fft": _fft,
    "real": lambda eqn, ins, avals: _parts(ins[0], avals[0])[0],
    "imag": lambda eqn, ins, avals: _parts(ins[0], avals[0])[1],
    "complex": lambda eqn, ins, avals: Pair(*ins),
    "conj": lambda eqn, ins, avals: Pair(_parts(ins[0], avals[0])[0],
                                         -_parts(ins[0], avals[0])[1]),
    "neg": lambda eqn, ins, avals: Pair(-ins[0].re, -ins[0].im),
    "abs": lambda eqn, ins, avals: jnp.hypot(*_parts(ins[0], avals[0])),
    "exp": lambda eqn, ins, avals: Pair(*(jnp.exp(ins[0].re) * f(ins[0].im)
                                          for f in (jnp.cos, jnp.sin))),
}
