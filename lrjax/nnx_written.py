"""Dense layers written by hand in NNX: a module of the user's own whose call computes
``x @ kernel + bias`` (bonsai's ``ShardedLinear`` in Qwen 3-VL and LLaDA: ``nnx.Linear``'s
variables, its own ``__call__(x, *, out_sharding)`` multiplying with ``jnp.matmul``).

Such a module is split as ``nnx.Linear`` is when (1) it is not a Flax layer (those are matched by
type) and holds, as variables, exactly a 2-D kernel ``nnx.Param`` ``(C, N)`` and a bias
``nnx.Param`` of shape ``(N,)`` or none, under any names (``kernel`` and ``bias``, ``w`` and
``b``), and no module; (2) its first call in the model passes the data alone (and at most an
``out_sharding=`` keyword, which the pair passes on); (3) on a random input of that call's
shape it computes ``x @ kernel + bias`` (to a few units of rounding), or one einsum of the data
and its kernel (below). Anything else it computes (an activation, a scale argument) fails (3):
its product is then split as its own code's where its kernel's one use is one
(:mod:`lrjax.nnx_products`), else the module is left as it is, listed in the report with the
condition it fails (unless its 2-D parameter is not named ``kernel``: an embedding table, a
position code, not listed). A bias of zeros that is not a variable is left
out of the pair; the adds it cost on every call are what a split saves besides the product
(:attr:`lrjax.sites.ConvSite.parametrization_flops`).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import einsums, sites, written_products
from lrjax.sites import ConvSite

__all__ = ["is_written", "call_of", "linear_site", "as_linear", "as_einsum", "as_layer",
           "product_einsum", "used_kernel", "input_axes", "keep_attributes", "kernel_of",
           "batched_linear", "batched_equation", "linear_as_einsum"]

_KEYWORDS = frozenset({"out_sharding"})  # what a pair's __call__ takes besides the input
WRITTEN = "a module of its own holding a kernel (and a bias)"
_ELEMENTWISE = ("mul", "div", "convert_element_type", "copy", "copy_p")  # steps of a kernel
KEPT = "its own computation is kept, a fixed cost"


def _named(node) -> tuple[str | None, str | None]:
    """The attribute names of a module's kernel (its one ``nnx.Param`` of the most axes, two or
    more) and bias (its one other ``nnx.Param``, or ``bias``), any names (``w`` and ``b`` as
    well as ``kernel`` and ``bias``); ``None`` where there is none, or more than one
    candidate."""
    params = {n: v for n, v in vars(node).items() if isinstance(v, nnx.Param)}
    most = max((len(v.shape) for v in params.values()), default=0)
    kernels = [n for n, v in params.items() if len(v.shape) == most >= 2]
    if len(kernels) != 1:
        return None, None
    others = [n for n in params if n != kernels[0]]
    if len(others) > 1:
        return kernels[0], None
    return kernels[0], others[0] if others else ("bias" if "bias" in vars(node) else None)


def kernel_of(node):
    """A layer's kernel variable: a Flax layer's ``kernel``, a written one's 2-D parameter under
    whatever name it has."""
    kernel = getattr(node, "kernel", None)
    if isinstance(kernel, nnx.Variable) or not isinstance(node, nnx.Module):
        return kernel
    name = _named(node)[0]
    return None if name is None else getattr(node, name)


def is_written(node, flax_layers: tuple[type, ...]) -> bool:
    """Whether ``node`` is a module of the user's own holding exactly a 2-D kernel ``nnx.Param``
    and at most a 1-D bias ``nnx.Param`` (of the kernel's output size), under any names, or no
    bias: condition (1) above. ``flax_layers``: the Flax types matched by type (their
    subclasses are not "written"). A ``bias`` of zeros that is not a variable (LLaDA's
    ``nnx.data(jnp.zeros(...))`` when it has no bias) counts as none."""
    if not isinstance(node, nnx.Module) or isinstance(node, flax_layers) or \
            type(node).__module__.partition(".")[0] in ("flax", "lrjax"):
        return False
    kernel_name, bias_name = _named(node)
    if kernel_name is None:
        return False
    kernel = getattr(node, kernel_name)
    bias = None if bias_name is None else getattr(node, bias_name, None)
    if bias is not None and len(kernel.shape) == 2 and \
            tuple(getattr(bias, "shape", ())) != (kernel.shape[1],):
        return False  # (an einsum's bias: checked with its equation, in linear_site)
    if bias is not None and not isinstance(bias, nnx.Param):
        try:
            zeros = isinstance(bias, (jax.Array, np.ndarray)) and not np.any(np.asarray(bias))
        except jax.errors.TracerArrayConversionError:  # inside a trace: not known
            zeros = False
        if not zeros:
            return False
    held = [n for p, n in nnx.iter_graph(node) if p and isinstance(n, (nnx.Module, nnx.Variable))]
    return all(n is kernel or n is bias for n in held)


def call_of(args, kwargs) -> dict | None:
    """The keywords of a written layer's first call, if they are what a pair takes (condition
    (2)), else ``None``."""
    if args or set(kwargs) - _KEYWORDS or any(isinstance(v, jax.Array) for v in kwargs.values()):
        return None
    return dict(kwargs)


def linear_site(path: str, layer, shape, keywords: dict | None,
                batch: int = 1) -> ConvSite | None:
    """The dense (or einsum) site of a written layer first called on an input of ``shape`` with
    ``keywords`` (:func:`call_of`) in a model called on ``batch`` examples, or the site left as
    it is, with the reason, when it computes neither ``x @ kernel + bias`` nor one einsum there
    (conditions (2), (3)); ``None`` for such a module whose parameter is not named ``kernel``
    (an embedding table, a position code: not a layer, nothing to list)."""
    site = _linear_site(path, layer, shape, keywords, batch)
    if not site.candidate and len(kernel_of(layer).shape) > 2:  # one layer of a stack?
        one = _iteration(layer)  # (the stack itself: ``lrjax.sites.unless_stacked``)
        stacked = None if one is None else _linear_site(path, one, shape, keywords, batch)
        site = stacked if stacked is not None and stacked.candidate else site
    return site if site.candidate or _named(layer)[0] == "kernel" else None


def _iteration(layer):
    """The first iteration of a written layer stacked on its variables' leading axis
    (``nnx.vmap``-made blocks run by ``nnx.scan``), or ``None`` when its variables do not share
    one."""
    graphdef, state = nnx.split(layer)
    leaves = jax.tree.leaves(state)
    if not leaves or any(np.ndim(v) < 2 or v.shape[0] != leaves[0].shape[0] for v in leaves):
        return None
    return nnx.merge(graphdef, jax.tree.map(lambda v: v[0], state))


def _linear_site(path: str, layer, shape, keywords: dict | None, batch: int) -> ConvSite:
    if keywords is None:
        return ConvSite(path, None, skip=f"{WRITTEN}, called with arguments other than the data "
                        f"(and out_sharding=), which a pair would not take: {KEPT}")
    kernel, bias = np.asarray(kernel_of(layer)[...]), _bias(layer)
    bias = None if bias is None else np.asarray(bias[...])
    x = np.random.default_rng(0).standard_normal(tuple(shape)).astype(kernel.dtype)
    try:
        got = np.asarray(layer(jnp.asarray(x), **keywords), np.float64)
    except Exception as e:  # noqa: BLE001 - it does not run as a dense layer would be run
        return ConvSite(path, None, skip=f"{WRITTEN}, which fails on a random input of its "
                        f"call's shape ({type(e).__name__}): {KEPT}")
    if kernel.ndim != 2 or not x.ndim or x.shape[-1] != kernel.shape[0] or not _close(
            got, _dense(x, kernel, bias), kernel.dtype, kernel.shape[0]):  # not x @ kernel
        return _einsum_site(path, layer, x, got, keywords, batch)
    c, n = (int(d) for d in kernel.shape)
    shape = tuple(int(d) for d in shape)
    added = getattr(layer, "bias", None) is not None and bias is None  # zeros, added per call
    return ConvSite(path, sites.dense_shape(path, shape, (c,), (n,), bias is not None),
                    dense_dims=((c,), (n,)), parametrization_flops=float(
                        np.prod(shape[1:-1]) * n if added and len(shape) > 1 else 0.0),
                    kernel_name=_named(layer)[0])


def _dense(x, kernel, bias):
    want = x.astype(np.float64) @ kernel.astype(np.float64)
    return want if bias is None else want + bias.astype(np.float64)


def _close(got, want, dtype, contracted: int) -> bool:
    """Whether ``got`` is ``want`` to a few units of rounding of a product over ``contracted``
    terms in ``dtype``."""
    eps = float(jnp.finfo(jnp.result_type(dtype, jnp.float32)).eps)
    bound = 16 * eps * max(float(np.abs(want).max(initial=0.0)), 1.0) * np.sqrt(contracted)
    return got.shape == want.shape and bool(np.all(np.abs(got - want) <= bound))


def _einsum_site(path: str, layer, x, got, keywords: dict, batch: int) -> ConvSite:
    """The einsum site of a written layer whose call on ``x`` (giving ``got``) is one
    ``jnp.einsum`` of the data and its kernel (plus its bias): an ``nnx.Einsum`` of the equation
    its traced call computes (:func:`product_einsum`) on its kernel as used, checked to compute
    ``got`` too; else the site left as it is, with the reason. A kernel scaled or cast on its
    way gets that step as its :attr:`ConvSite.parametrization`, its flops per example of the
    model's ``batch`` what a split saves."""
    found = product_einsum(layer, x, keywords)
    equation, used = found if found is not None else (None, None)
    split = None if equation is None else sites.einsum_split(equation)
    if isinstance(split, sites.EinsumSplit):
        kernel = kernel_of(layer)
        in_dims, out_dims = split.dims(kernel.shape)
        view = as_einsum(layer, equation)
        if used is not None:  # checked with the kernel as its code uses it
            view.kernel = nnx.Param(used(kernel[...]))
        try:
            want = np.asarray(view(jnp.asarray(x)), np.float64)
        except Exception:  # noqa: BLE001 - e.g. a bias nnx.Einsum cannot reshape to its output
            want = None
        if want is not None and _close(got, want, x.dtype, math.prod(in_dims)):
            flops = 0.0 if used is None else float(jax.jit(used).lower(
                kernel[...]).cost_analysis()["flops"]) / batch
            return sites.einsum_site(path, x.shape, split, kernel.shape,
                                     _bias(layer) is not None, equation=equation,
                                     parametrization=None if used is None else
                                     functools.partial(_parametrized, used),
                                     parametrization_flops=flops, kernel_name=_named(layer)[0])
    return ConvSite(path, None, skip=f"{WRITTEN}, which computes neither x @ kernel + bias nor "
                    "one einsum of the data and its kernel (plus its bias), checked on a random "
                    f"input of its call's shape: {KEPT}", equation=equation)


def _parametrized(used, params: dict) -> dict:
    """A written layer's parameters as its code uses them (:attr:`ConvSite.parametrization`)."""
    return {**params, "kernel": used(params["kernel"])}


def _steps(steps, kernel):
    for step in steps:
        kernel = step(kernel)
    return kernel


def product_einsum(layer, x, keywords: dict) -> tuple[str, Callable | None] | None:
    """The einsum ``data,kernel->out`` that a written layer's call on ``x`` (with
    ``keywords``) computes with its kernel, read from its traced call: the kernel's one use, a
    ``dot_general`` with data (:func:`lrjax.written_products.product_of`), its kernel possibly
    transposed, scaled by constants and cast on its way, its output transposed after; and the
    function from the stored kernel to the one it uses (its scalings and casts, in the stored
    layout), or ``None`` where it is used as stored. ``None`` for any other use (the caller
    checks that the einsum computes the call's output)."""
    graphdef, state = nnx.split(layer)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    name = _named(layer)[0]
    at = [i for i, (p, _) in enumerate(flat) if getattr(p[0], "key", None) == name]
    if len(at) != 1:
        return None

    def call(x, leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(x, **keywords)

    try:
        closed = jax.make_jaxpr(call)(jnp.asarray(x), [v for _, v in flat])
        data, *leaves = closed.jaxpr.invars
        product = written_products.product_of(closed, leaves[at[0]], [data])
    except (written_products.NotALayer, jax.errors.JAXTypeError, TypeError, ValueError):
        return None  # (a call that does not trace: Python control flow on its values)
    names = [step.primitive.name for step in product.steps]
    if product.eqn.primitive.name != "dot_general" or product.sliced is not None or \
            any(n not in _ELEMENTWISE + ("transpose",) for n in names):
        return None
    lhs, rest = written_products.stored_equation(product).split(",")
    kernel, out = rest.split("->")
    # scalars and casts commute with the transposes: applied to the stored kernel
    scaled = tuple(step for step in product.steps if step.primitive.name in _ELEMENTWISE)
    var = product.eqn.outvars[0]
    while True:  # its output transposed after
        uses = [e for e in closed.jaxpr.eqns if var in e.invars]
        if len(uses) != 1 or uses[0].primitive.name != "transpose":
            break
        out = "".join(out[axis] for axis in uses[0].params["permutation"])
        var = uses[0].outvars[0]
    return f"{lhs},{kernel}->{out}", (functools.partial(_steps, scaled) if scaled else None)


def as_einsum(layer, equation: str) -> nnx.Einsum:
    """A written layer seen as the ``nnx.Einsum`` of ``equation`` it computes as: its kernel
    and bias variables (shared, under Flax's names), computing in its parameters' dtype."""
    kernel, bias = kernel_of(layer), _bias(layer)
    view = nnx.Einsum(equation, tuple(kernel.shape), None if bias is None else tuple(bias.shape),
                      param_dtype=kernel.dtype, rngs=nnx.Rngs(0),
                      kernel_init=lambda *_: kernel[...],  # (no weights drawn to be dropped:
                      bias_init=lambda *_: bias[...])      # a vocabulary-sized head is large)
    view.kernel, view.bias = kernel, bias
    return view


def batched_linear(layer) -> bool:
    """Whether ``layer`` is an ``nnx.LinearGeneral`` with one batch axis (one matrix per index
    of its input's first axis), of Flax's own product: split as the einsum it computes
    (:func:`linear_as_einsum`)."""
    return type(layer) is nnx.LinearGeneral and len(layer.batch_axis) == 1 and \
        layer.dot_general is None and layer.dot_general_cls is None


def batched_equation(layer, x) -> str | None:
    """The einsum a :func:`batched_linear` layer computes on its input ``x``, or ``None``
    (another layer, whatever its input)."""
    return einsums.batched_dense_equation(x.ndim, layer.axis, len(layer.out_features)) if \
        batched_linear(layer) else None


def linear_as_einsum(layer, equation: str) -> nnx.Einsum:
    """A :func:`batched_linear` layer seen as the ``nnx.Einsum`` of ``equation`` it computes
    (:func:`lrjax.einsums.batched_dense_equation`): its kernel and bias variables, shared."""
    kernel, bias = layer.kernel, layer.bias
    view = nnx.Einsum(equation, tuple(kernel.shape), None if bias is None else tuple(bias.shape),
                      dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
                      rngs=nnx.Rngs(0), kernel_init=lambda *_: kernel[...],
                      bias_init=lambda *_: bias[...])
    view.kernel, view.bias = kernel, bias
    return view


def as_layer(layer, site: ConvSite):
    """A written layer (or a :func:`batched_linear` one) seen as the Flax layer its ``site``
    found it computes as."""
    if batched_linear(layer):
        return linear_as_einsum(layer, site.equation)
    return as_linear(layer) if site.equation is None else as_einsum(layer, site.equation)


def keep_attributes(layer, pair) -> None:
    """Gives a written layer's ``pair`` the layer's plain attributes (neither variables, nor
    modules, nor arrays) that it lacks: model code reads them (tunix's attention takes its head
    size from ``self.o_proj.shape``)."""
    for name, value in vars(layer).items():
        if not name.startswith("_") and not hasattr(pair, name) and not isinstance(
                value, (nnx.Variable, nnx.Module, jax.Array, np.ndarray)):
            setattr(pair, name, value)


def used_kernel(layer, site: ConvSite):
    """A written layer's kernel as its code uses it: the stored one, scaled and cast as its
    ``site`` found (:attr:`ConvSite.parametrization`)."""
    kernel = kernel_of(layer)[...]
    return kernel if site.parametrization is None else \
        site.parametrization({"kernel": kernel})["kernel"]


def input_axes(site: ConvSite) -> tuple[int, ...]:
    """The input axes a written layer's product contracts (its ``site``'s)."""
    return (-1,) if site.equation is None else sites.einsum_split(site.equation).input_axes


def as_linear(layer) -> types.SimpleNamespace:
    """A written layer seen as the ``nnx.Linear`` it computes as: its ``kernel`` and ``bias``
    variables, contracting the input's last axis, computing in its parameters' dtype."""
    kernel, bias = kernel_of(layer), _bias(layer)
    return types.SimpleNamespace(kernel=kernel, bias=bias, axis=-1, use_bias=bias is not None,
                                 dtype=None, param_dtype=kernel.dtype, precision=None)


def _bias(layer):
    """A written layer's bias variable, or ``None`` (none, or zeros that are not one)."""
    name = _named(layer)[1]
    bias = None if name is None else getattr(layer, name, None)
    return bias if isinstance(bias, nnx.Param) else None
