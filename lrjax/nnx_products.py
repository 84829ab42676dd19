"""Products written by hand in NNX modules: a module of the user's own whose call multiplies the
data by some of its parameters (the canonical hand-written MLP, ``h = relu(x @ self.w1 +
self.b1); return h @ self.w2 + self.b2``; a hand-written attention's ``wq``, ``wk``, ``wv``,
``wo``; a block holding a norm and Flax layers besides its own projections; a model's own
hand-written head).

Such a module (not Flax's or lrjax's, whose variables are ``nnx.Param``, one of two or more
axes, besides which it may hold modules, directly or in an ``nnx.List``; a one-kernel layer
only where :mod:`lrjax.nnx_written` does not split it whole: ``gelu(x @ self.w + self.b)``)
has its first call traced (:class:`Recording`), with its parameters as inputs and each call of a
child one opaque equation (:class:`_Child`: its outputs' shapes from an abstract run of a copy
of the child); each parameter of two or more axes whose one use is a ``dot_general`` with the
call's data, through transposes only (:func:`lrjax.written_products.product_of`: ``x @
self.w``, ``x @ self.w.T``, ``jnp.einsum('btd,dhk->bthk', x, self.w)``), is a product an
``nnx.Einsum`` of that equation computes; a conv's is an ``nnx.Conv``'s; a mixture of experts'
``lax.ragged_dot`` by the parameter, transposed and reshaped on its way, a
:class:`lrjax.ragged.RaggedDot`'s; one-index pieces ``w[i]`` each multiplying other data alike (a
loop over experts), an ``nnx.Einsum``'s of the pieces' data stacked (:attr:`lrjax.
written_products.Product.stacked`: the replay computes every piece's data before the first
piece, :func:`lrjax.replay.waiting`). Its other uses (scaled, sliced otherwise, a lookup, used twice) are
its own code's products, a fixed cost. A call that transforms the module itself (``nnx.vmap``
or ``nnx.remat`` of a function of ``self``) is traced with the module taken as made in that trace
(:func:`_of_this_trace`). A call that cannot be traced so (Python control flow on values) keeps
the module as written.

In lrjax's copies of the model (:func:`canonical`), each such parameter becomes the kernel of an
``nnx.Einsum`` view in its place (the same variable, shared), and the module's class a subclass
whose call traces its own code again and replays it (:mod:`lrjax.replay`) with each product
computed by the layer in its place (its view, its probe while lrjax runs the model, or its pair
once split) and each child's call made by the child itself (so lrjax observes, costs and splits
the children's layers as anywhere else, and a dropout draws from its stream as built). Each
product is found, costed, calibrated on its own input and split as an ``nnx.Einsum``, named
``{module path}/{parameter}``; a split one's pair takes the parameter's place (``{module
path}/{parameter}/vertical/kernel``, ``.../horizontal/kernel``), the module's other parameters
and children stay as they were, and its code runs as written around the pairs. A decomposed
module whose call no longer computes a split product so (called on data of another rank) is a
``ValueError`` naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from flax.nnx import tracers
from jax.extend import core as jcore

from lrjax import ragged, replay, sites, written_products
from lrjax.written_products import NotALayer

__all__ = ["eligible", "Recording", "checked", "canonical", "from_sites", "with_specs",
           "tracing"]

_PRODUCTS = "lrjax_products"  # ((parameter, equation, shape, dtype), ...) of a canonical module
_PATH = "lrjax_products_path"  # a module's path while its call is recorded
_STEPS = ("transpose", "copy", "copy_p")  # what may stand between a parameter and its product
_RECORDED: list[dict] = []  # {module path: {parameter: (equation, shape)}} being recorded
_TRACING: list = []  # the modules whose own call is being traced


def eligible(node, flax_layers: tuple[type, ...]) -> bool:
    """Whether ``node`` is a module of the user's own (not of ``flax_layers``, not Flax's or
    lrjax's) whose variables are ``nnx.Param`` (one of two or more axes), besides which it may
    hold modules (its children, directly or in an ``nnx.List``; they run as themselves)."""
    if not isinstance(node, nnx.Module) or isinstance(node, flax_layers) or \
            type(node).__module__.partition(".")[0] in ("flax", "lrjax"):
        return False
    params = []
    for name, value in vars(node).items():
        if name.startswith("_"):
            continue
        if isinstance(value, nnx.List):  # (a module too)
            if not all(isinstance(v, nnx.Module) for v in value):
                return False
        elif isinstance(value, nnx.Module):
            continue
        elif isinstance(value, nnx.Variable):
            if not isinstance(value, nnx.Param):
                return False
            params.append(value)
        elif any(isinstance(leaf, (nnx.Module, nnx.Variable)) for leaf in jax.tree.leaves(
                value, is_leaf=lambda x: isinstance(x, (nnx.Module, nnx.Variable)))):
            return False  # (graph nodes in another container)
    return any(len(p.shape) >= 2 for p in params)


def tracing() -> bool:
    """Whether a module's own call is being traced here: the modules it calls run abstractly,
    and run for real in its replay (lrjax's probes observe them then)."""
    return bool(_TRACING)


def _child_avals(*arrays, name, avals):
    return [jax.core.ShapedArray(shape, dtype) for shape, dtype in avals]


_CHILD_CALL = jcore.Primitive("lrjax_child_call")  # a child's call in a traced module's call
_CHILD_CALL.multiple_results = True
_CHILD_CALL.def_abstract_eval(_child_avals)


class _Child:
    """Stands in for a module's child while the module's call is traced: each call one
    ``lrjax_child_call`` equation of its arrays, its outputs' shapes from an abstract run of
    the child, which the replay makes of the child itself (``calls``: ``{name: the child's
    call as a function of its arrays}``); anything else read from it is the child's. An
    ``nnx.List`` of children is a list of these."""

    def __init__(self, child, label: str, calls: dict):
        self.__dict__.update(_child=child, _label=label, _calls=calls)

    def __getattr__(self, name):
        return getattr(self.__dict__["_child"], name)

    def __call__(self, *args, **kwargs):
        node = nnx.graph.is_graph_node  # (NNX objects it is given, rngs=: passed as they are)
        arrays, call = replay.array_call(self._child, args, kwargs, is_leaf=node)
        name = f"{self._label}:{len(self._calls)}"
        self._calls[name] = call
        flat, treedef = jax.tree.flatten(((self._child, args, kwargs)), is_leaf=node)
        graphs = {i: nnx.split(leaf) for i, leaf in enumerate(flat) if node(leaf)}

        def copy_call(states, *arrays):  # (on copies: what the call updates, a dropout's
            copies = list(flat)  # random stream, stays inside; lrjax's probes do not observe
            for i, state in states.items():  # it: tracing())
                copies[i] = nnx.merge(graphs[i][0], state)
            child, args_, kwargs_ = jax.tree.unflatten(treedef, copies)
            return replay.array_call(child, args_, kwargs_, is_leaf=node)[1](*arrays)

        shapes = jax.eval_shape(copy_call, {i: g[1] for i, g in graphs.items()}, *arrays)
        leaves, tree = jax.tree.flatten(shapes)
        outs = _CHILD_CALL.bind(*arrays, name=name, avals=tuple(
            (tuple(leaf.shape), leaf.dtype) for leaf in leaves))
        return jax.tree.unflatten(tree, outs)


def _stand_ins(module, names, calls: dict) -> dict:
    """``{attribute: stand-in}`` of ``module``'s children (but the attributes ``names``)."""
    out = {}
    for name, value in vars(module).items():
        if name in names or name.startswith("_"):
            continue
        if isinstance(value, nnx.List):
            out[name] = [_Child(v, f"{name}.{i}", calls) for i, v in enumerate(value)]
        elif isinstance(value, nnx.Module):
            out[name] = _Child(value, name, calls)
    return out


def _base(cls: type) -> type:
    """The user's class behind a recording or replaying subclass."""
    return getattr(cls, "_lrjax_base", cls)


@functools.cache
def _subclass(cls: type, call: Callable, suffix: str) -> type:
    return type(cls.__name__, (cls,), {"__call__": call, "_lrjax_base": cls,
                                       "__module__": cls.__module__,
                                       "__qualname__": f"{cls.__qualname__}[{suffix}]"})


def _traced(module, names: list[str], kernels: list, args, kwargs):
    """The module's own call on ``args``, ``kwargs`` traced with its parameters ``names`` as
    the jaxpr's first inputs (``kernels``: their shapes and dtypes), then the call's arrays, its
    children's calls each a named call (:class:`_Child`): ``(closed jaxpr, output shapes, the
    call's arrays, {call name: the child's call})``."""
    arrays, call = replay.array_call(functools.partial(_base(type(module)).__call__, module),
                                     args, kwargs, is_leaf=nnx.graph.is_graph_node)
    held, calls = dict(vars(module)), {}

    def body(values, *arrays):
        _TRACING.append(module)
        try:
            vars(module).update(_stand_ins(module, names, calls))
            for name, value in zip(names, values, strict=True):  # (its code reads parameters)
                vars(module)[name] = nnx.Param(value)
            with _of_this_trace(module):
                return call(*arrays)
        finally:  # (as it was: an attribute its code set in the trace would hold a tracer)
            for name in [n for n in vars(module) if n not in held]:
                del vars(module)[name]
            vars(module).update(held)
            _TRACING.pop()

    closed, shapes = replay.traced_inlined(body, kernels, *arrays,
                                           keep=lambda e: e.primitive is _CHILD_CALL)
    return closed, shapes, arrays, calls


@contextlib.contextmanager
def _of_this_trace(module):
    """``module`` and its variables taken as made in the trace being made, their values put
    back after: NNX's transforms refuse a node made outside the current trace, and its own code
    may transform itself (``nnx.vmap(lambda m, row: row @ m.w, in_axes=(None, 0))(self, x)``)."""
    held = [n if isinstance(n, nnx.Variable) else n._pytree__state  # (what holds each state)
            for _, n in nnx.graph.iter_graph(module) if isinstance(n, (nnx.Variable, nnx.Pytree))]
    saved = [(h, h._trace_state, h.get_raw_value() if isinstance(h, nnx.Variable) else None)
             for h in held]
    try:
        for holder in held:
            object.__setattr__(holder, "_trace_state", tracers.TraceState())
        yield
    finally:
        for holder, state, value in saved:
            if isinstance(holder, nnx.Variable):  # (while it may be updated here)
                holder.set_raw_value(value, _unsafe_bypass_check=True)
            object.__setattr__(holder, "_trace_state", state)


def _equation(product: written_products.Product):
    """What computes ``product``'s output from its stored kernel: the ``nnx.Einsum`` equation
    (the stored kernel's letters) of a ``dot_general``; for a conv, ``("conv", the transposes
    and flips of its kernel to HWIO, window, in features, out features, strides, padding,
    dilation, feature groups, input dilation)``, an ``nnx.Conv``'s (its data in channels last:
    :attr:`Product.layout`); for a ``ragged_dot``, ``("ragged", its kernel's layout steps,
    precision, dtype)``, a :class:`lrjax.ragged.RaggedDot`'s; or ``None``. A kernel cast last
    to its data's dtype (a mixed-precision model's ``w.astype(self.dtype)``) is the einsum's or
    ragged product's ``dtype``: ``("einsum", equation, dtype)``, as ``nnx.Einsum(dtype=...)``
    computes it."""
    name, steps = product.eqn.primitive.name, product.steps
    cast = None
    if steps and steps[-1].primitive.name == "convert_element_type" and np.dtype(
            steps[-1].params["new_dtype"]) == product.eqn.invars[product.data].aval.dtype:
        steps, cast = steps[:-1], str(np.dtype(steps[-1].params["new_dtype"]))
    if name == "ragged_dot_general":
        layout = ragged.layout_steps(steps)
        return None if layout is None else ("ragged", layout, product.eqn.params["precision"],
                                            cast)
    if name == "conv_general_dilated" and product.sliced is None and cast is None:
        if any(step.primitive.name not in ("transpose", "rev") for step in steps):
            return None  # (scaled, cast: its own code's)
        ops = tuple((step.primitive.name, tuple(step.params[
            "permutation" if step.primitive.name == "transpose" else "dimensions"]))
            for step in steps)  # (to HWIO, as the conv reads it: transposed, flipped)
        shape = tuple((product.chain[0][0].invars[product.chain[0][1]] if product.chain else
                       product.eqn.invars[1]).aval.shape)
        for op, axes in ops:
            shape = tuple(shape[a] for a in axes) if op == "transpose" else shape
        params = product.eqn.params
        return ("conv", ops, shape[:-2], shape[-2] * params["feature_group_count"], shape[-1],
                tuple(params["window_strides"]), tuple(tuple(int(v) for v in p)
                                                        for p in params["padding"]),
                tuple(params["rhs_dilation"]), params["feature_group_count"],
                tuple(params["lhs_dilation"]))
    if name != "dot_general" or (product.sliced is not None and not product.stacked) or \
            any(step.primitive.name not in _STEPS for step in steps):
        return None
    equation = written_products.stored_equation(product)
    if not isinstance(sites.einsum_split(equation), sites.EinsumSplit):
        return None
    return equation if cast is None else ("einsum", equation, cast)


def _products(closed, names: list[str]) -> dict:
    """``{name: (Product, equation)}`` of the parameters among the first ``len(names)`` inputs
    of ``closed`` whose one use an ``nnx.Einsum`` computes on the call's data."""
    inputs, found = closed.jaxpr.invars[len(names):], {}
    for name, var in zip(names, closed.jaxpr.invars, strict=False):
        try:
            product = written_products.product_of(closed, var, inputs, experts=True)
        except NotALayer:
            continue
        equation = _equation(product)
        if equation is not None:
            found[name] = (product, equation)
    return found


def _recording_call(self, *args, **kwargs):
    """A module's call while its products are recorded (:func:`record`): traced once, then run
    as written."""
    if not _RECORDED:  # (lrjax calling it after the run: as written)
        return _base(type(self)).__call__(self, *args, **kwargs)
    path, recorded = vars(self)[_PATH], _RECORDED[-1]
    params = {n: v for n, v in vars(self).items() if isinstance(v, nnx.Param) and len(v.shape) >= 2}
    names = list(params)
    try:
        closed, *_ = _traced(self, names, [jax.ShapeDtypeStruct(v.shape, v.dtype)
                                           for v in params.values()], args, kwargs)
        found = {n: (eq, tuple(params[n].shape)) for n, (_, eq) in _products(closed, names).items()}
    except Exception:  # noqa: BLE001 - a call that does not trace: its own code, as written
        found = {}
    if path in recorded and recorded[path] != found:  # called again, otherwise: none
        found = {}
    recorded[path] = found
    return _base(type(self)).__call__(self, *args, **kwargs)


class Recording:
    """The products of a model copy's eligible modules (:func:`eligible`), recorded while the
    copy runs on its example call inside ``with`` (``copy``: a copy of the user's model whose
    modules' classes this changes at once, before anything copies them further), as
    ``{module path: {parameter: equation}}`` in :attr:`products` when the block ends. A module
    called several times must compute the same products each time; a parameter seen in another
    shape than stored (a stack's iteration) is none."""

    def __init__(self, copy, flax_layers: tuple[type, ...]):
        self.products: dict = {}
        self._stored = {}
        for path, node in nnx.iter_graph(copy):
            if eligible(node, flax_layers):
                self._stored[sites.path_of(path)] = {
                    n: tuple(v.shape) for n, v in vars(node).items() if isinstance(v, nnx.Param)}
                node.__class__ = _subclass(type(node), _recording_call, "recording")
                setattr(node, _PATH, sites.path_of(path))

    def __enter__(self) -> Recording:
        _RECORDED.append({})
        return self

    def __exit__(self, *exc) -> None:
        recorded = _RECORDED.pop()
        self.products.update({
            path: {name: equation for name, (equation, shape) in found.items()
                   if self._stored[path].get(name) == shape}
            for path, found in recorded.items() if found})


def _view(param: nnx.Param, spec):
    """The layer computing a product (:func:`_equation`'s ``spec``) with ``param`` as its
    kernel, no bias: an ``nnx.Einsum`` sharing it (computing in the cast's dtype), a
    :class:`lrjax.ragged.RaggedDot` sharing it, or an ``nnx.Conv`` (sharing it when stored in
    Flax's ``HWIO``, else holding it transposed and flipped so)."""
    if not isinstance(spec, str) and spec[0] == "ragged":
        return ragged.RaggedDot(param, spec[1], spec[2], dtype=spec[3])
    if isinstance(spec, str) or spec[0] == "einsum":
        equation, dtype = (spec, None) if isinstance(spec, str) else spec[1:]
        view = nnx.Einsum(equation, tuple(param.shape), None, param_dtype=param.dtype,
                          dtype=dtype, rngs=nnx.Rngs(0), kernel_init=lambda *_: param[...])
        view.kernel = param
        return view
    _, ops, window, c, n, strides, padding, dilation, groups, input_dilation = spec
    value = param[...]
    for op, axes in ops:
        value = jax.numpy.transpose(value, axes) if op == "transpose" else \
            jax.numpy.flip(value, axes)
    kernel = nnx.Param(value) if ops else param
    view = nnx.Conv(c, n, window, strides=strides, padding=padding, kernel_dilation=dilation,
                    input_dilation=input_dilation, feature_group_count=groups, use_bias=False,
                    param_dtype=param.dtype,
                    rngs=nnx.Rngs(0), kernel_init=lambda *_: kernel[...])
    view.kernel = kernel
    return view


def _replaying_call(self, *args, **kwargs):
    """A canonical module's call: its own code traced, replayed with each declared product
    computed by the layer in its parameter's place."""
    declared = {name: (eq, shape, dtype) for name, eq, shape, dtype in vars(self)[_PRODUCTS]}
    layers = {n: vars(self)[n] for n in declared if isinstance(vars(self)[n], nnx.Module)}
    if not layers:
        return _base(type(self)).__call__(self, *args, **kwargs)
    names = list(layers)
    kernels = [jax.ShapeDtypeStruct(declared[n][1], np.dtype(declared[n][2])) for n in names]
    closed, shapes, arrays, calls = _traced(self, names, kernels, args, kwargs)
    found = _products(closed, names)
    replaced, skipped = {}, {}
    for name in names:
        product, equation = found.get(name, (None, None))
        if equation != declared[name][0]:
            raise ValueError(
                f"{type(self).__name__}'s parameter {name!r} was found as the product "
                f"{declared[name][0]!r} of its call's data, and split so; this call computes "
                f"{'it otherwise' if equation is None else repr(equation)}: call the "
                "decomposed module as it was called when it was decomposed")
        for index, (eqn, *_) in enumerate(product.slices or ((product.eqn,),)):
            replaced[id(eqn)] = (layers[name], product, index)
        skipped.update({id(e): position for e, position in product.chain})
    env, stacked = {}, {}

    def rule(eqn, ins, here):
        if id(eqn) in replaced:
            layer, product, index = replaced[id(eqn)]
            if product.eqn.primitive.name == "ragged_dot_general":  # (data, kernel, groups)
                return [layer(ins[product.data], ins[2])]
            if product.stacked:  # every piece's data, stacked: computed by the first piece
                if id(product) not in stacked:
                    stacked[id(product)] = layer(jax.numpy.stack(
                        [env[e.invars[product.data]] for e, *_ in product.slices]))
                return [stacked[id(product)][index]]
            return [written_products.run_in_layout(layer, product, ins[product.data]).astype(
                eqn.outvars[0].aval.dtype)]  # (the product's own dtype)
        if eqn.primitive is _CHILD_CALL:  # a child's call: made by the child itself
            return jax.tree.leaves(calls[eqn.params["name"]](*ins))
        if id(eqn) in skipped:  # a step to a kernel: never computed with
            return [ins[skipped[id(eqn)]]] * len(eqn.outvars)
        return None

    waits = {k: v for product, _ in found.values() for k, v in product.waits.items()}
    outs = replay.run(replay.waiting(closed.jaxpr, waits), closed.consts, [*kernels, *arrays],
                      rule, env=env)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)


def canonical(model, products: dict, flax_layers: tuple[type, ...]):
    """``model`` (a copy of the user's, changed in place and returned) with the ``products``
    (``{module path: {parameter: equation}}``) of its eligible modules computed by layers:
    each parameter an ``nnx.Einsum`` view's kernel in its place, the module replaying its call
    with them (the module's docstring)."""
    if not products:
        return model
    for path, node in list(nnx.iter_graph(model)):
        wanted = products.get(sites.path_of(path))
        if not wanted or not eligible(node, flax_layers):
            continue
        made = []
        for name, equation in wanted.items():
            param = vars(node).get(name)
            if isinstance(param, nnx.Param):
                setattr(node, name, _view(param, equation))
                made.append((name, equation, tuple(param.shape), str(param.dtype)))
        if made:
            node.__class__ = _subclass(type(node), _replaying_call, "products")
            setattr(node, _PRODUCTS, tuple(made))
    return model


def with_specs(found: list, products: dict) -> list:
    """The sites ``found`` with the products among ``products`` (:class:`Recording`'s) that are
    not plain einsums (convs, ragged products, einsums on a cast kernel) marked as such
    (:attr:`lrjax.sites.ConvSite.written_spec`), so that :func:`from_sites` places them
    again."""
    specs = {sites.path_of((*sites.variable_key(path), name)): spec
             for path, named in products.items() for name, spec in named.items()
             if not isinstance(spec, str)}
    return [dataclasses.replace(s, written_spec=specs[s.path]) if s.path in specs else s
            for s in found]


def from_sites(found) -> dict:
    """``{module path: {parameter: equation}}`` of the einsum sites among ``found`` named
    ``{module path}/{parameter}``: what :func:`canonical` needs to place them again (it places
    only those of eligible modules holding such a parameter)."""
    products: dict = {}
    for site in found:
        keys, spec = sites.variable_key(site.path), site.written_spec or site.equation
        if spec is not None and len(keys) >= 1:
            products.setdefault(sites.path_of(keys[:-1]), {})[keys[-1]] = spec
    return products


def checked(model, run: Callable, products: dict, flax_layers: tuple[type, ...]) -> dict:
    """``products`` (:class:`Recording`'s) less those of a module whose layers in their place
    stop ``model`` from running (``run(copy)``: its example call; its parent reading the
    parameter: each module tried alone where all together fail)."""
    def runs(chosen) -> bool:
        try:
            run(canonical(nnx.clone(model), chosen, flax_layers))
        except Exception:  # noqa: BLE001 - something else reads a parameter the layer holds
            return False
        return True

    if not products or runs(products):
        return products
    return {p: v for p, v in products.items() if runs({p: v})}
