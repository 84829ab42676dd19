"""Convs and dense products written by hand in linen modules that declare their ``kernel`` in
``setup``, run as Flax layers so that they can be split: AlgoPerf's Conformer and DeepSpeech
subsample with such a module (``self.kernel = self.param("kernel", ...)`` in ``setup``, then
``lax.conv_general_dilated(inputs, self.kernel, ...)`` among other work in ``__call__``: a ReLU,
a mask, a second output).

Inside :func:`lrjax.linen_cells.as_sublayers` (every stage of the linen surgery and every call of
a :class:`lrjax.layers.LowRankModel`), for a module that is not Flax's or lrjax's and has a
``setup``:

* its ``setup`` runs with ``self.param("kernel", ...)`` reading the stored kernel without
  reserving its name (creating it in an init, in the module's own variables as before; in a
  decomposed model, whose variables hold the pair instead, returning zeros of its shape that
  nothing computes with);
* its ``__call__`` is traced (``jax.make_jaxpr``; a call that cannot be, e.g. one creating
  variables, runs as written) and, when the kernel's one use is the second operand of a
  ``conv_general_dilated`` in Flax's layouts (channels last, ``HWIO``; any strides, explicit
  padding, dilation and feature groups; no input dilation) or of a ``dot_general`` contracting
  the data's last axis with its first, the traced program is replayed with that product computed
  by an ``nn.Conv`` (``nn.Dense``) without bias bound to the module's own scope: its kernel is the
  module's ``kernel``, and lrjax finds, costs, calibrates and splits it as that layer, named by
  the module's path, its pair's variables ``vertical/kernel`` and ``horizontal/kernel`` in the
  module's scope next to the module's other variables (its bias stays its own). The rest of the
  module's code runs as written, on the layer's output.

A kernel used in any other way (transposed, scaled, in two products) leaves the module as it
is: its products are its own, a fixed cost (:mod:`lrjax.own_code`); a decomposed module that
can no longer be traced so is a ``ValueError`` naming it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.extend import core as jcore

from lrjax import replay

__all__ = ["as_layer", "runs_as_layer", "is_written_layer", "check_unread"]

_KERNEL = "kernel"
_STATE = "_lrjax_written_kernel"  # (kernel value, is a placeholder) set on the module by setup
_CHILD = "_lrjax_written_layer"  # the Flax layer its product runs as, once per module
_WRITTEN = "_lrjax_written"  # set on that layer
_HOOKED: dict[type, type] = {}
_RUNNING: set[int] = set()  # the modules whose setup or call this interceptor is running
_UNSPLIT = "lrjax_split_kernel:"  # the scope of a split module's kernel placeholder


def _eligible(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.partition(".")[0] not in ("flax", "lrjax") and \
        cls.setup is not nn.Module.setup


def runs_as_layer(module: nn.Module) -> bool:
    """Whether ``module``'s own call may run with its product as a Flax layer bound to its
    scope (it holds a ``kernel`` declared in ``setup``): the layer, not the module, is the one
    named by its path (costed, calibrated and split)."""
    return _STATE in module.__dict__


def _split_in(module: nn.Module) -> bool:
    params = module.variables.get("params", {}) if module.scope is not None else {}
    return _KERNEL not in params and "vertical" in params and "horizontal" in params


def _kernel(module: nn.Module, init_fn, init_args, init_kwargs):
    """``(value, is a placeholder)`` of a hooked module's ``kernel``, read or made without
    reserving its name: the stored one; in an init, a new one (stored by the layer, or by
    :func:`_stored` when the call runs as written); in a decomposed model, whose pair computes
    the product, zeros of its shape. ``None``: none of these (Flax's own ``param`` then)."""
    scope = module.scope
    if scope.has_variable("params", _KERNEL):
        return scope.get_variable("params", _KERNEL), False
    if module.is_initializing():
        return init_fn(module.make_rng("params"), *init_args, **init_kwargs), False
    if not _split_in(module):
        return None
    shaped = jax.eval_shape(lambda: init_fn(jax.random.key(0), *init_args, **init_kwargs))
    with jax.named_scope(_UNSPLIT + "|".join(scope.path)):  # (check_unread)
        return jax.numpy.zeros(shaped.shape, shaped.dtype), True


def _hooked(cls: type) -> type:
    """``cls`` with a ``param`` reading (or creating) ``kernel`` without reserving its name,
    so that the Flax layer bound to the module's scope can take it as its own."""
    if cls not in _HOOKED:
        def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
            made = _kernel(self, init_fn, init_args, init_kwargs) if name == _KERNEL else None
            if made is None:
                return super(hooked, self).param(name, init_fn, *init_args, unbox=unbox,
                                                 **init_kwargs)
            value = nn.meta.unbox(made[0]) if unbox else made[0]
            object.__setattr__(self, _STATE, (value, made[1]))
            return value

        hooked = type(cls.__name__, (cls,), {"param": param, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__})
        _HOOKED[cls] = hooked
    return _HOOKED[cls]


def as_layer(next_fun, args, kwargs, context):
    """A method interceptor: an eligible module's ``setup`` with the hooked ``param``, its
    ``__call__`` with its product as a Flax layer (the module's docstring)."""
    module, method = context.module, context.method_name
    if not _eligible(module) or method == "param" or \
            id(module) in _RUNNING:  # (nested: the interceptor is entered once per stage)
        return next_fun(*args, **kwargs)
    _RUNNING.add(id(module))
    try:
        if method == "setup":
            own = type(module)
            object.__setattr__(module, "__class__", _hooked(own))
            try:
                return next_fun(*args, **kwargs)
            finally:
                object.__setattr__(module, "__class__", own)
        state = module.__dict__.get(_STATE)
        if state is None:
            return next_fun(*args, **kwargs)
        if method == "__call__":
            return _replayed(module, next_fun, args, kwargs)
        if state[1]:
            raise ValueError(f"layer {'/'.join(module.scope.path)!r} was split as the product "
                             f"of its kernel that its __call__ computes; its method {method!r} "
                             "would need the kernel it no longer has: call it as it was "
                             "decomposed")
        _stored(module, state[0])  # another method computes with it as written
        return next_fun(*args, **kwargs)
    finally:
        _RUNNING.discard(id(module))


def _stored(module: nn.Module, kernel) -> None:
    """In an init, the kernel stored as the module's own ``param`` would have stored it."""
    if module.is_initializing() and not module.scope.has_variable("params", _KERNEL):
        module.scope.put_variable("params", _KERNEL, kernel)


def _replayed(module: nn.Module, next_fun, args, kwargs):
    kernel, placeholder = module.__dict__[_STATE]
    flat, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, a in enumerate(flat) if isinstance(a, (jax.Array, np.ndarray))]

    def body(*arrays):
        full = list(flat)
        for i, a in zip(dynamic, arrays, strict=True):
            full[i] = a
        call_args, call_kwargs = jax.tree.unflatten(treedef, full)
        return next_fun(*call_args, **call_kwargs)

    try:
        closed, shapes = jax.make_jaxpr(body, return_shape=True)(*(flat[i] for i in dynamic))
        product = _product(closed, kernel)
    except Exception as e:  # noqa: BLE001 - its own code runs as written (a fixed cost)
        if placeholder:
            raise ValueError(f"layer {'/'.join(module.scope.path)!r} was split as the product "
                             f"of its kernel that its code computes, but its call no longer "
                             f"traces so: {str(e).splitlines()[0] if str(e) else type(e)}") \
                from None
        _stored(module, kernel)
        return next_fun(*args, **kwargs)
    layer = module.__dict__.get(_CHILD)
    if layer is None:
        layer = _layer(product, kernel, module)
        object.__setattr__(module, _CHILD, layer)

    def rule(eqn, ins, here):
        return [layer(ins[0])] if eqn is product else None

    outs = replay.run(closed.jaxpr, closed.consts, [flat[i] for i in dynamic], rule)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)


class _Ineligible(Exception):
    pass


def _product(closed, kernel):
    """The one top-level equation of ``closed`` using ``kernel`` (a constant of it), when that is
    a product of the data by it as a Flax layer computes it; else :class:`_Ineligible`."""
    kernel_vars = [v for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True)
                   if c is kernel]
    uses = [e for e in closed.jaxpr.eqns if any(v in kernel_vars for v in e.invars
                                                if not isinstance(v, jcore.Literal))]
    if len(kernel_vars) != 1 or len(uses) != 1 or kernel_vars[0] in closed.jaxpr.outvars:
        raise _Ineligible("its kernel is used otherwise than in one product")
    eqn = uses[0]
    if eqn.invars[1] is not kernel_vars[0] or eqn.invars[0] is kernel_vars[0]:
        raise _Ineligible("its kernel is not the product's second operand")
    x, params = eqn.invars[0].aval, eqn.params
    if eqn.outvars[0].aval.dtype != jax.numpy.result_type(x.dtype, kernel.dtype):
        raise _Ineligible("a product computed in another dtype (preferred_element_type)")
    if eqn.primitive.name == "conv_general_dilated":
        ndim = len(x.shape)
        lhs = (0, ndim - 1, *range(1, ndim - 1))  # Flax's: channels last, HWIO
        flax_layout = (lhs, (ndim - 1, ndim - 2, *range(ndim - 2)), lhs)
        if tuple(tuple(s) for s in params["dimension_numbers"]) != flax_layout or \
                any(d != 1 for d in params["lhs_dilation"]) or params["batch_group_count"] != 1:
            raise _Ineligible("a conv in another layout, input-dilated or batch-grouped")
        return eqn
    if eqn.primitive.name == "dot_general":
        (contracted, batched) = params["dimension_numbers"]
        if len(kernel.shape) != 2 or tuple(contracted[0]) != (len(x.shape) - 1,) or \
                tuple(contracted[1]) != (0,) or any(batched):
            raise _Ineligible("a product of other axes")
        return eqn
    raise _Ineligible(f"its kernel goes to {eqn.primitive.name}")


def _layer(eqn, kernel, module: nn.Module) -> nn.Module:
    """The Flax layer (no bias) computing ``eqn``, bound to ``module``'s own scope; in an init,
    its kernel is the one the module's ``param`` made."""
    params = eqn.params

    def made(key, shape, dtype=None):  # (a pair built in its place inits its own factors)
        if tuple(shape) == tuple(kernel.shape):
            return kernel
        return nn.initializers.lecun_normal()(key, shape, dtype or kernel.dtype)

    if eqn.primitive.name == "dot_general":
        layer = nn.Dense(kernel.shape[1], use_bias=False, param_dtype=kernel.dtype,
                         precision=params["precision"], kernel_init=made, parent=module.scope)
        object.__setattr__(layer, _WRITTEN, True)
        return layer
    layer = nn.Conv(kernel.shape[-1], tuple(kernel.shape[:-2]),
                   strides=tuple(params["window_strides"]),
                   padding=[tuple(int(v) for v in p) for p in params["padding"]],
                   kernel_dilation=tuple(params["rhs_dilation"]),
                   feature_group_count=params["feature_group_count"], use_bias=False,
                   param_dtype=kernel.dtype, precision=params["precision"], kernel_init=made,
                   parent=module.scope)
    object.__setattr__(layer, _WRITTEN, True)
    return layer


def is_written_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` is the Flax layer a module's own product runs as."""
    return bool(layer.__dict__.get(_WRITTEN))


def check_unread(fn, *args) -> None:
    """Raise ``ValueError`` naming each split module whose kernel ``fn(*args)`` still reads
    outside its product (``layer.kernel`` in its parent's code: the split module holds zeros
    in its place, which nothing may compute with), traced as the exporters trace it."""
    closed = jax.make_jaxpr(fn)(*args)
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
