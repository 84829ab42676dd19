"""The parameters a module with a product of its own reads under lrjax: zeros in place of a
split kernel, and the check that nothing computes with them.

A module whose own code computes a product that lrjax split (:mod:`lrjax.linen_products`) no
longer holds its kernel: its pair does. Its code still reads the kernel on its way to the
product (the replay skips those steps), so it is given zeros of the kernel's shape, made in a
named scope (``lrjax_split_kernel:{path}``) that :func:`check_unread` finds in a traced model:
any other use of them (``layer.kernel`` read in another module's code) is an error naming the
module, never a silent product with zeros. :func:`setup_param` and :func:`compact_param` are
what :mod:`lrjax.linen_products`' hooked ``param`` returns, in a ``setup`` or a compact module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.extend import core as jcore

from lrjax import linen_calls, macs
from lrjax.written_products import KERNEL, is_pair

__all__ = ["PAIR", "placeholder", "placeholders", "check_unread", "has_pair", "written_pair",
           "setup_param", "compact_param"]

_UNSPLIT = "lrjax_split_kernel:"  # the scope of a split module's kernel placeholder
PAIR = ("vertical", "horizontal")  # a pair's variables in its module's scope


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


def has_pair(module: nn.Module) -> bool:
    """A pair's variables in ``module``'s scope: in its own place, or in a parameter's (a
    module sharing its scope, :func:`lrjax.linen_products._shares_scope`, or holding several products)."""
    params = module.variables.get("params", {}) if module.scope is not None else {}
    return all(p in params for p in PAIR) or any(written_pair(v) for v in params.values())


def written_pair(value) -> bool:
    """A pair in a parameter's place: a written layer's (no bias: its module's stays its own),
    not a split submodule's (a Flax layer's, biased as a rule)."""
    return is_pair(value) and "bias" not in value["horizontal"]


def setup_param(module: nn.Module, name, init_fn, init_args, init_kwargs, flax_param):
    """``(value, is a placeholder)`` of a hooked ``setup`` module's parameter: in a decomposed
    model whose pair replaced it, zeros of its shape; its ``kernel`` read or made without
    reserving its name (the layer its product runs as reads it under that name; stored by
    :mod:`lrjax.linen_products`); another as Flax's ``param`` (``flax_param()``) makes it. ``None``:
    Flax's own ``param``, unrecorded."""
    scope = module.scope
    if not module.is_initializing() and has_pair(module) and (
            not scope.has_variable("params", name) or
            written_pair(scope.get_variable("params", name))):
        return placeholder(module, init_fn, init_args, init_kwargs), True
    if name != KERNEL:
        return flax_param(), False
    if scope.has_variable("params", KERNEL):
        return nn.meta.unbox(scope.get_variable("params", KERNEL)), False
    if module.is_initializing():
        return nn.meta.unbox(init_fn(module.make_rng("params"), *init_args, **init_kwargs)), False
    return None


def compact_param(module, hook, name, init_fn, init_args, init_kwargs, unbox):
    """A hooked compact module's parameter ``name`` (``hook``: ``(made, given, *split)``, the
    values it made, those a trace is given, and for a holder's run as written the set of names
    found split): given, stored, made and stored as Flax's ``param`` makes it (same keys), zeros
    for a kernel a pair replaced, or Flax's own ``param``."""
    made, given, *split = hook  # (split: the names a holder's run as written found split)
    if given is not None and name in given:
        return given[name]
    scope = module.scope
    held = scope.get_variable("params", name) if scope.has_variable("params", name) else None
    if held is not None and not is_pair(held):
        value = held
        if split:  # (a holder's run as written: checked as Flax's param checks it)
            linen_calls.check_shape(module, name, value, init_fn, init_args, init_kwargs)
    elif module.is_initializing():  # as Flax's param makes and stores it (same keys)
        value = init_fn(module.make_rng("params"), *init_args, **init_kwargs)
        scope.put_variable("params", name, value)  # (its own code may read self.variables)
    elif (given is not None and has_pair(module)) or (split and is_pair(held)):
        value = placeholder(module, init_fn, init_args, init_kwargs)  # the split kernel
        if split:
            split[0].add(name)
    else:
        return nn.Module.param(module, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    if made is not None:
        made[name] = value
    return nn.meta.unbox(value) if unbox else value
