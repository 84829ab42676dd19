"""The steps from a stored parameter to the kernel its product uses: one operation with constants
(:class:`Step`: a scaling, a cast, a transpose), or a program (:class:`Reparametrization`): a kernel
normalized by statistics of its own parameter, in any code.

Weight standardization written by hand (lucidrains-style diffusion U-Nets'
``WeightStandardizedConv``: ``(w - mean(w)) / sqrt(var(w) + eps)`` over all axes but the output
one, then a conv, often Flax's ``nn.Conv`` applied apart with ``conv.apply({"params": {"kernel":
standardized, "bias": b}}, x)``) reads its parameter several times before one product; weight
normalization written by hand (``g * v / |v|``: PyTorch's ``weight_norm`` as Hugging Face's
wav2vec2 ports it, ``weight_g`` and ``weight_v``; a gain initialized to the kernel's norm)
reads a second parameter, a gain used nowhere else. The closed form factors the kernel the
product uses, as it factors BiT's ``StdConv`` kernels (:func:`lrjax.surgery.used_parameters`):
the pair computes with the factors of the normalized kernel, and the normalization goes with
the stored kernel and its gain. :func:`reparametrization` finds such code in a traced call: the
equations computing from the parameter, constants and such companions only, a reduction of the
parameter among them, ending in one value of the parameter's shape and dtype that the rest of
the call uses; :class:`Reparametrization` runs them on a kernel and its companions, as the first
step of a :class:`lrjax.written_products.Product`. A kernel changed with no statistic of it
(masked by a constant: a pair would not keep its zeros), or read with a parameter used
elsewhere too, is none.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from lrjax import macs, replay

__all__ = ["Step", "Reparametrization", "reparametrization", "companions"]

PRIMITIVE = types.SimpleNamespace(name="reparametrization")
_STATISTICS = ("reduce_", "argmax", "argmin")  # what normalizing code reads of its kernel
_LAYOUT = ("transpose", "reshape", "squeeze", "rev", "convert_element_type", "copy", "copy_p")


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """One operation between a written kernel and its product: ``primitive`` applied with
    ``params`` to ``operands``, the kernel at ``position`` and constants (scalars) elsewhere."""
    primitive: Any
    params: dict
    operands: tuple
    position: int

    def __call__(self, kernel):
        ins = list(self.operands)
        ins[self.position] = kernel
        return self.primitive.bind(*ins, **self.params)

    @property
    def key(self) -> tuple:
        """What it computes, comparable across traces."""
        return (self.primitive.name, str(sorted(map(str, self.params.items()))), self.position,
                str([None if o is None else np.asarray(o).tolist() for o in self.operands]))


@dataclasses.dataclass(frozen=True, eq=False)
class Reparametrization:
    """The equations ``jaxpr`` (inputs: the stored parameter, then its ``companions``, the
    other parameters of its module it reads, by name; one output, the kernel a product uses,
    of the parameter's shape and dtype) with its constants ``consts``, as a step: called on a
    kernel and the companions' values, it returns the reparametrized kernel.
    ``primitive.name`` is ``"reparametrization"`` (no layout step, no scaling)."""
    jaxpr: jcore.Jaxpr
    consts: tuple
    companions: tuple[str, ...] = ()
    primitive = PRIMITIVE
    params = types.MappingProxyType({})

    def __call__(self, kernel, *companions):  # (its jitted helpers called as written)
        return replay.run(self.jaxpr, self.consts, [kernel, *companions], replay.statistic_call)[0]

    @property
    def key(self) -> tuple:
        """What it computes, comparable across traces (its program's text, its constants)."""
        return (str(self.jaxpr), self.companions,
                tuple((np.shape(c), np.asarray(c).tobytes()) for c in self.consts))


def _concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _atoms(eqn) -> list:
    return [v for v in eqn.invars if not isinstance(v, jcore.Literal)]


def reparametrization(closed, var, companions: dict | None = None):
    """``(value, step, chain)`` when the parameter ``var`` of ``closed`` (a closed jaxpr) goes
    only to code computing from it, constants and ``companions`` (``{variable: name}``: the
    module's other parameters, each read there alone), reading statistics of it (a reduction:
    a mean, a variance, a norm), whose one value used elsewhere (``value``) has ``var``'s shape
    and dtype: ``step`` the :class:`Reparametrization` computing it, ``chain`` its equations as
    ``(equation, the position of an operand computed from var or a companion)``, the first
    reading ``var``; ``None`` otherwise (the parameter used with data or in two places, a
    companion read elsewhere too; or changed without a statistic of it: a kernel masked by a
    constant, whose zeros a pair would not keep)."""
    jaxpr, companions = closed.jaxpr, companions or {}
    consts = {v: c for v, c in zip(jaxpr.constvars, closed.consts, strict=True) if _concrete(c)}
    fixed = set(consts)  # computed from constants alone (a literal's broadcast, an eps)
    side = set(companions)  # computed from companions (and constants), not from var
    derived, region, beside, computed = {var}, [], [], []
    for eqn in jaxpr.eqns:
        ins = _atoms(eqn)
        if eqn.effects or not all(v in derived or v in fixed or v in side for v in ins):
            continue  # (with data or another parameter: where the region stops)
        if any(v in derived for v in ins):
            region.append(eqn)
            derived.update(eqn.outvars)
        elif any(v in side for v in ins):
            beside.append(eqn)
            side.update(eqn.outvars)
        else:
            computed.append(eqn)
            fixed.update(eqn.outvars)
    if not any(_statistic(e) for e in region):
        return None  # (a mask, a constant table: a kernel changed, not normalized)
    needed, inside = _body(jaxpr, region, (*beside, *computed))
    read = (derived | side) & (needed | derived)
    used_outside = {v for e in jaxpr.eqns if id(e) not in inside for v in _atoms(e) if v in read}
    used_outside.update(v for v in jaxpr.outvars if not isinstance(v, jcore.Literal) and v in read)
    if len(used_outside) != 1 or not used_outside <= derived or var in used_outside:
        return None
    (value,) = used_outside
    made = {v: e for e in region for v in e.outvars}
    while value.aval.shape != var.aval.shape and value in made and \
            made[value].primitive.name in _LAYOUT:  # (a transpose or reshape last, to another
        before = _atoms(made[value])  # shape: left to plain steps after it)
        if len(before) != 1 or before[0] is var or \
                sum(before[0] in _atoms(e) for e in jaxpr.eqns) != 1:
            break
        region = [e for e in region if e is not made[value]]
        value = before[0]
    if value.aval.shape != var.aval.shape or value.aval.dtype != var.aval.dtype:
        return None
    needed, inside = _body(jaxpr, region, (*beside, *computed))
    body = [e for e in jaxpr.eqns if id(e) in inside]
    used = [v for v in companions if v in needed]
    constvars = [v for v in consts if v in needed]
    program = jcore.Jaxpr(constvars, [var, *used], [value], body)
    chain = tuple((e, next(i for i, v in enumerate(e.invars)
                           if not isinstance(v, jcore.Literal) and (v in derived or v in side)))
                  for e in (*region, *(e for e in body if e.outvars and e.outvars[0] in side)))
    return value, Reparametrization(program, tuple(consts[v] for v in constvars),
                                    tuple(companions[v] for v in used)), chain


def companions(steps) -> tuple[str, ...]:
    """The names of the other parameters ``steps`` read (a weight normalization's gain)."""
    return tuple(name for step in steps for name in getattr(step, "companions", ()))


def _body(jaxpr, region, ahead) -> tuple[set, set]:
    """The variables the ``region``'s equations read, directly or through ``ahead`` (equations
    of constants and companions), and the ids of the equations computing it."""
    needed, earlier = {v for e in region for v in _atoms(e)}, {id(e) for e in ahead}
    for eqn in reversed([e for e in jaxpr.eqns if id(e) in earlier]):
        if any(v in needed for v in eqn.outvars):
            needed.update(_atoms(eqn))
    inside = {id(e) for e in region} | {id(e) for e in jaxpr.eqns if id(e) in earlier and any(
        v in needed for v in e.outvars)}
    return needed, inside


def _statistic(eqn) -> bool:
    """Whether ``eqn`` reads a statistic of its operand (a reduction), itself or in a call."""
    body = replay.call_jaxpr(eqn)
    inner = [eqn] if body is None else [e for e, _ in macs.iter_eqns(body)]
    return any(e.primitive.name.startswith(_STATISTICS) for e in inner)
