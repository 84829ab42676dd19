"""A kernel normalized by statistics of its own parameter, in any code: a reparametrization.

Weight standardization written by hand (lucidrains-style diffusion U-Nets'
``WeightStandardizedConv``: ``(w - mean(w)) / sqrt(var(w) + eps)`` over all axes but the output
one, then a conv, often Flax's ``nn.Conv`` applied apart with ``conv.apply({"params": {"kernel":
standardized, "bias": b}}, x)``) reads its parameter several times before one product. The
closed form factors the kernel the product uses, as it factors BiT's ``StdConv`` kernels
(:func:`lrjax.surgery.used_parameters`): the pair computes with the factors of the standardized
kernel, and the standardization goes with the stored kernel. :func:`reparametrization` finds
such code in a traced call: the equations computing from the parameter and constants only, a
reduction among them, ending in one value of the parameter's shape and dtype that the rest of
the call uses; :class:`Reparametrization` runs them on a kernel, as the first step of a
:class:`lrjax.written_products.Product`. A kernel changed with no statistic of it (masked by a
constant: a pair would not keep its zeros) or computed from two parameters (weight
normalization's ``g * v / |v|``) is none.
"""

from __future__ import annotations

import dataclasses
import types

import jax
from jax.extend import core as jcore

from lrjax import replay

__all__ = ["Reparametrization", "reparametrization"]

PRIMITIVE = types.SimpleNamespace(name="reparametrization")
_STATISTICS = ("reduce_", "argmax", "argmin")  # what normalizing code reads of its kernel


@dataclasses.dataclass(frozen=True, eq=False)
class Reparametrization:
    """The equations ``jaxpr`` (one input, the stored parameter; one output, the kernel a
    product uses, of the same shape and dtype) with its constants ``consts``, as a step: called
    on a kernel, it returns the reparametrized one. ``primitive.name`` is
    ``"reparametrization"`` (no layout step, no scaling)."""
    jaxpr: jcore.Jaxpr
    consts: tuple
    primitive = PRIMITIVE
    params = types.MappingProxyType({})

    def __call__(self, kernel):
        return replay.run(self.jaxpr, self.consts, [kernel])[0]


def _concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def reparametrization(closed, var):
    """``(value, step, chain)`` when the parameter ``var`` of ``closed`` (a closed jaxpr) goes
    only to code computing from it and constants, reading statistics of it (a reduction: a
    mean, a variance, a norm), whose one value used elsewhere (``value``) has ``var``'s shape
    and dtype: ``step`` the :class:`Reparametrization` computing it, ``chain`` its equations
    as ``(equation, the position of an operand computed from var)`` in order; ``None``
    otherwise (the parameter used with data, in two places, or with other parameters; or
    changed without a statistic of it: a kernel masked by a constant, whose zeros a pair
    would not keep)."""
    jaxpr = closed.jaxpr
    consts = {v: c for v, c in zip(jaxpr.constvars, closed.consts, strict=True) if _concrete(c)}
    fixed = set(consts)  # computed from constants alone (a literal's broadcast, an eps)
    derived, region, computed = {var}, [], []
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not isinstance(v, jcore.Literal)]
        if eqn.effects or not all(v in derived or v in fixed for v in ins):
            continue  # (with data or another parameter: where the region stops)
        if any(v in derived for v in ins):
            region.append(eqn)
            derived.update(eqn.outvars)
        else:
            computed.append(eqn)
            fixed.update(eqn.outvars)
    if not any(e.primitive.name.startswith(_STATISTICS) for e in region):
        return None  # (a mask, a constant table: a kernel changed, not normalized)
    inside = {id(e) for e in region}
    used_outside = {v for e in jaxpr.eqns if id(e) not in inside for v in e.invars
                    if not isinstance(v, jcore.Literal) and v in derived}
    used_outside.update(v for v in jaxpr.outvars if not isinstance(v, jcore.Literal) and v in derived)
    if len(used_outside) != 1 or var in used_outside:
        return None
    (value,) = used_outside
    if value in jaxpr.outvars or value.aval.shape != var.aval.shape or \
            value.aval.dtype != var.aval.dtype:
        return None
    needed = {v for e in region for v in e.invars if not isinstance(v, jcore.Literal)}
    for eqn in reversed(computed):  # (the constants' code the region reads)
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    kept = inside | {id(e) for e in computed if any(v in needed for v in e.outvars)}
    body = [e for e in jaxpr.eqns if id(e) in kept]
    constvars = [v for v in consts if v in needed]
    body = jcore.Jaxpr(constvars, [var], [value], body)
    chain = tuple((e, next(i for i, v in enumerate(e.invars)
                           if not isinstance(v, jcore.Literal) and v in derived)) for e in region)
    return value, Reparametrization(body, tuple(consts[v] for v in constvars)), chain
