"""Zeros in place of a split kernel, and the check that nothing computes with them.

A module whose own code computes a product that lrjax split (:mod:`lrjax.linen_products`) no
longer holds its kernel: its pair does. Its code still reads the kernel on its way to the
product (the replay skips those steps), so it is given zeros of the kernel's shape, made in a
named scope (``lrjax_split_kernel:{path}``) that :func:`check_unread` finds in a traced model:
any other use of them (``layer.kernel`` read in another module's code) is an error naming the
module, never a silent product with zeros.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.extend import core as jcore

from lrjax import macs

__all__ = ["placeholder", "placeholders", "check_unread"]

_UNSPLIT = "lrjax_split_kernel:"  # the scope of a split module's kernel placeholder


def placeholder(module: nn.Module, init_fn, init_args, init_kwargs) -> jax.Array:
    """Zeros of the shape and dtype ``init_fn(key, *init_args, **init_kwargs)`` makes, in
    place of ``module``'s split kernel."""
    shaped = jax.eval_shape(lambda: init_fn(jax.random.key(0), *init_args, **init_kwargs))
    return placeholders(module, {None: nn.meta.unbox(shaped)})[None]


def placeholders(module: nn.Module, shapes: dict) -> dict:
    """``{name: zeros}`` of ``shapes`` (``{name: shape and dtype}``), in place of ``module``'s
    split kernels."""
    with jax.named_scope(_UNSPLIT + "|".join(module.scope.path)):
        return {name: jax.numpy.zeros(shaped.shape, shaped.dtype)
                for name, shaped in shapes.items()}


def check_unread(fn, *args) -> None:
    """Raise ``ValueError`` naming each split module whose kernel ``fn(*args)`` still reads
    outside its product (``layer.kernel`` in its parent's code: the split module holds zeros
    in its place, which nothing may compute with), traced as the exporters trace it."""
    closed = macs.live(jax.make_jaxpr(fn)(*args))  # (a holder's run as written: dropped)
    made, others = {}, []
    for e in closed.jaxpr.eqns:
        stack = str(e.source_info.name_stack)
        if _UNSPLIT in stack:
            made.update(dict.fromkeys(e.outvars, stack.split(_UNSPLIT, 1)[1].split("/")[0]))
        else:
            others.append(e)
    read = {made[v] for e in others for v in e.invars
            if not isinstance(v, jcore.Literal) and v in made} | {
        made[v] for v in closed.jaxpr.outvars if not isinstance(v, jcore.Literal) and v in made}
    if read:
        raise ValueError(f"layers {sorted(p.replace('|', '/') for p in read)} were split as the "
                         "product of their kernel that their __call__ computes, but the model "
                         "also reads that kernel elsewhere (e.g. layer.kernel in another "
                         "module's code), which they no longer have: keep them full")
