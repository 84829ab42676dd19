"""The Flax layer that a product written by hand computes: which products of a parameter are
one, and the layer they run as (:mod:`lrjax.linen_products` finds them in a module's traced
call and replays the call with the layer in the product's place).

A parameter is a layer's kernel when its one use, through multiplications and divisions by
constants, casts, transposes, reshapes and flips (:class:`Step`: StyleGAN2's equalized learning
rate, t5x's kernels stored flattened to 2-D, a PyTorch-layout kernel transposed or flipped), and
first any code normalizing it by its own statistics (:mod:`lrjax.reparametrized`), is

* the second operand of a ``conv_general_dilated`` (any strides, explicit padding, dilation and
  feature groups; input dilation at stride 1, one group: ``lax.conv_transpose`` written by hand,
  an ``nn.Conv(input_dilation=...)``): an ``nn.Conv``; in another layout than Flax's (a PyTorch
  port's ``NCHW`` / ``OIHW``) the kernel is read transposed to ``HWIO`` (one more step), the
  layer run on the data transposed to channels last, its output back (:attr:`Product.layout`);
* an operand of a ``dot_general`` with the data, with one batch dimension or none, contracting
  some of the kernel's axes with some of the data's and keeping at least one of each: the data's
  last axes with the kernel's first ones is an ``nn.Dense`` (``nn.DenseGeneral``: t5x's and
  MaxText's ``(embed, heads, head_dim)`` kernels); any other axes, or the kernel first, an
  ``nn.Einsum`` whose equation gives the product's own output order (Gemma's
  ``jnp.einsum('BTD,NDH->BTNH', x, w)``: the kernel's middle axis contracted).

A parameter cut along one axis into pieces that tile it (``slice``s, a ``split``, an
``unstack``), each (through scalings and casts) a ``dot_general`` of the same data alike, is
one product of the whole parameter, from whose output each piece's product is taken:
one-index pieces squeezed away (big_vision's Gemma gating, ``jnp.dot(x, w[0])`` and
``jnp.dot(x, w[1])``; ``a, b = w``; ``jnp.unstack(w)``) make an ``nn.Einsum`` keeping that
axis; ranges of an axis the product keeps (a fused ``(C, 2H)`` kernel cut as ``w[:, :h]`` and
``w[:, h:]``, or by ``jnp.split``) the layer of the whole kernel. In NNX (``experts=True``),
one-index pieces each on other data alike (a loop over experts, ``x_i @ w[i]``) are one product
of their data stacked (:attr:`Product.stacked`); so is a ``lax.ragged_dot`` (:mod:`lrjax.ragged`).

The layer is :class:`WrittenConv` / :class:`WrittenDense` / :class:`WrittenDenseGeneral` /
:class:`WrittenEinsum` when the parameter has another name than ``kernel`` or takes steps: it
reads the module's variable under its stored name and shape and applies the steps (a
re-parametrization the closed form factors as it factors BiT's standardized kernels); Flax's
own layer otherwise. A product over one batch axis of the data and the kernel (a batch of
kernels: one per head, a block-diagonal ``'BTHi,Hij->BTHj'``; one per expert,
``'ecd,edf->ecf'``) is an ``nn.Einsum`` of that batch letter (:class:`lrjax.einsums.EinsumSplit`).
A kernel batched over several axes, multiplied by data, or used twice is none, and so is a product
whose other operand no input of the call computes (t5x's relative-position table contracted
with a one-hot of positions built from integers: a lookup).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.extend import core as jcore

from lrjax.ragged import is_ragged_product
from lrjax.reparametrized import Step, reparametrization

__all__ = ["KERNEL", "NotALayer", "Product", "Step", "WrittenConv", "WrittenDense", "WrittenDenseGeneral",
           "WrittenEinsum", "equation_of", "is_pair", "is_written_layer", "kernel_name", "layer_for",
           "product_of", "piece_of", "run_in_layout", "set_aside", "stored_equation", "stored_kernel"]

KERNEL = "kernel"
_WRITTEN = "_lrjax_written"  # set on a layer made by layer_for
_STASHED = "_lrjax_stashed_kernel"  # a kernel set aside while a pair may take its name (init)
_STEPS = ("mul", "div", "convert_element_type", "copy", "copy_p", "reshape", "squeeze",
          "transpose", "rev")


class NotALayer(Exception):
    """A parameter's use that no Flax layer computes (the message says why)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Product:
    """A parameter's one product: the equation ``eqn`` computing it, the ``steps`` from the
    stored parameter to its operand there (computed by the equations ``chain``, as
    ``(equation, the parameter's position)``), and the position of the data operand.

    A parameter whose pieces along one axis are products of the same data, alike (big_vision's
    Gemma gating: ``jnp.dot(x, w[0])``, ``jnp.dot(x, w[1])``), is one product of the whole
    parameter, that axis kept in its output (``sliced``: the kernel axis; ``squeezed``: the
    pieces are single indices without it; ``slices``: ``(equation, start, limit)`` of each
    piece's product, ``eqn`` the first's; ``chain`` holds every piece's).

    One-index pieces each multiplying other data alike (a loop over experts, ``x_i @ w[i]``)
    are ``stacked``: one product of the whole parameter by the pieces' data stacked on a new
    leading axis, the sliced axis a batch axis of data, kernel and output (each piece's
    product its output's index there).

    A conv in another layout than Flax's has ``layout``: the transposes of its data to channels
    last and of the layer's channels-last output back to its own layout (its kernel's to
    ``HWIO`` is the last of its ``steps``)."""
    eqn: Any
    steps: tuple
    chain: tuple
    data: int
    sliced: int | None = None
    squeezed: bool = False
    slices: tuple = ()
    layout: tuple | None = None
    stacked: bool = False

    @property
    def waits(self) -> dict:
        """``{id of each stacked piece's equation: all pieces' data}`` (``replay.waiting``)."""
        data = [e.invars[self.data] for e, *_ in self.slices]
        return {id(e): data for e, *_ in self.slices} if self.stacked else {}


def _home(layer: nn.Module):
    """The scope holding a written layer's kernel: its module's (the layer's own, or its
    parent when the layer is named by its kernel and bound inside the module's)."""
    nested = getattr(layer, "named_by_kernel", False) and layer.scope.parent is not None
    return layer.scope.parent if nested else layer.scope


def is_pair(value) -> bool:
    """Whether a variable tree entry holds a pair's variables (``vertical``, ``horizontal``,
    an optional ``mid_norm``) in place of a kernel."""
    return hasattr(value, "items") and {"vertical", "horizontal"} <= set(value) <= {
        "vertical", "horizontal", "mid_norm"}


def stored_kernel(layer: nn.Module):
    """``layer``'s kernel variable as stored (a written layer's: its module's parameter, in
    its stored shape); ``None`` when there is none (split, or not made yet)."""
    home, name = (_home(layer), layer.stored) if isinstance(layer, _RENAMED) else \
        (layer.scope, KERNEL)
    if not home.has_variable("params", name):
        return layer.__dict__.get(_STASHED)
    value = home.get_variable("params", name)
    return None if is_pair(value) else value


def _written_param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    """The layer's kernel: its module's stored parameter (in a shape of its own when the
    module's code reshapes it, t5x's flattened ``DenseGeneral`` kernel) as ``steps`` make it."""
    if name != KERNEL:
        return nn.Module.param(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    value = stored_kernel(self)  # (stored before the layer runs)
    if value is None:
        value = nn.Module.param(self, self.stored, init_fn, *init_args, unbox=unbox,
                                **init_kwargs)
    value = nn.meta.unbox(value) if unbox else value
    for step in self.steps:  # (a reparametrization may read the module's other parameters)
        value = step(value, *(nn.meta.unbox(_home(self).get_variable("params", name))
                              for name in getattr(step, "companions", ())))
    return value


class WrittenDense(nn.Dense):
    """``nn.Dense`` whose kernel is its module's parameter ``stored`` as ``steps`` make it (a
    product written by hand in a module's own code; its variables are the module's)."""
    stored: str = KERNEL
    steps: tuple = ()
    named_by_kernel: bool = False

    param = _written_param


class WrittenDenseGeneral(nn.DenseGeneral):
    """``nn.DenseGeneral`` whose kernel is its module's parameter ``stored`` as ``steps`` make
    it."""
    stored: str = KERNEL
    steps: tuple = ()
    named_by_kernel: bool = False

    param = _written_param


class WrittenEinsum(nn.Einsum):
    """``nn.Einsum`` whose kernel is its module's parameter ``stored`` as ``steps`` make it."""
    stored: str = KERNEL
    steps: tuple = ()
    named_by_kernel: bool = False

    param = _written_param


class WrittenConv(nn.Conv):
    """``nn.Conv`` whose kernel is its module's parameter ``stored`` as ``steps`` make it."""
    stored: str = KERNEL
    steps: tuple = ()
    named_by_kernel: bool = False

    param = _written_param


_RENAMED = (WrittenDense, WrittenDenseGeneral, WrittenEinsum, WrittenConv)


def kernel_name(layer: nn.Module) -> str:
    """The name of the variable holding ``layer``'s kernel in its scope (a written product's:
    its module's parameter)."""
    return getattr(layer, "stored", KERNEL) if isinstance(layer, _RENAMED) else KERNEL


def is_written_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` is the Flax layer a module's own product runs as."""
    return bool(layer.__dict__.get(_WRITTEN))


_INDEXED: list = [None, {}]  # the last jaxpr looked into, and {variable: its uses} in it


def _uses(jaxpr, var) -> list:
    """The equations of ``jaxpr`` using ``var`` (``[None]``: an output), indexed once."""
    if var in jaxpr.outvars:
        return [None]
    if _INDEXED[0] is not jaxpr:
        index: dict = {}
        for e in jaxpr.eqns:
            for v in dict.fromkeys(v for v in e.invars if not isinstance(v, jcore.Literal)):
                index.setdefault(v, []).append(e)
        _INDEXED[:] = [jaxpr, index]
    return list(_INDEXED[1].get(var, ()))


def _constant(closed, v):
    """A scalar operand's value (a literal, or a concrete constant of one element)."""
    if isinstance(v, jcore.Literal):
        return v.val
    consts = dict(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    value = consts.get(v)
    if value is None or isinstance(value, jax.core.Tracer) or np.size(value) != 1:
        raise NotALayer("its kernel is combined with data")
    return np.asarray(value)


_DEPENDING: list = [None, (), set()]  # the last jaxpr, inputs and what depends on them


def _depending(jaxpr, inputs) -> set:
    """The variables of ``jaxpr`` computed from any of ``inputs`` (the last answer kept)."""
    if _DEPENDING[0] is jaxpr and list(map(id, _DEPENDING[1])) == list(map(id, inputs)):
        return _DEPENDING[2]
    found = set(inputs)
    for e in jaxpr.eqns:
        if any(not isinstance(v, jcore.Literal) and v in found for v in e.invars):
            found.update(e.outvars)
    _DEPENDING[:] = [jaxpr, tuple(inputs), found]
    return found


def product_of(closed, var, inputs, experts: bool = False, companions=None) -> Product:
    """The :class:`Product` of ``closed`` (a closed jaxpr) that ``var``, a parameter, goes to
    through steps, when a Flax layer computes it (the module's docstring) on data computed
    from ``inputs`` (the call's arrays among ``closed``'s inputs: a product with a constant,
    t5x's relative-position table contracted with a one-hot of positions, is a lookup);
    else :class:`NotALayer`. A kernel normalized first (:mod:`lrjax.reparametrized`, with
    ``companions``) is that code's first step. ``experts``: a ``lax.ragged_dot`` by the parameter is one too
    (:class:`lrjax.ragged.RaggedDot` computes it), and so are its one-index pieces along an
    axis each multiplying other data alike (a loop over experts, ``x_i @ w[i]``: the einsum of
    the pieces' data stacked, :attr:`Product.stacked`)."""
    try:
        return _product_of(closed, var, inputs, experts)
    except NotALayer:
        found = reparametrization(closed, var, companions)
        if found is None:
            raise
    value, step, chain = found
    product = _product_of(closed, value, inputs, experts)
    return dataclasses.replace(product, steps=(step, *product.steps),
                               chain=(*chain, *product.chain))


def _product_of(closed, var, inputs, experts: bool) -> Product:
    jaxpr, steps, chain = closed.jaxpr, [], []
    while True:
        uses = _uses(jaxpr, var)
        cuts = [u is not None and u.primitive.name in ("slice", "split", "unstack") for u in uses]
        if cuts and all(cuts) and (len(uses) > 1 or uses[0].primitive.name != "slice"):
            whole = _sliced(closed, var, uses, inputs, experts)  # (after steps of the whole)
            return dataclasses.replace(whole, steps=(*steps, *whole.steps),
                                       chain=(*chain, *whole.chain))
        if len(uses) != 1 or uses[0] is None:
            raise NotALayer("its kernel is used otherwise than in one product")
        eqn = uses[0]
        if eqn.primitive.name not in _STEPS:
            break
        position = [i for i, v in enumerate(eqn.invars) if v is var]
        if len(position) != 1 or (eqn.primitive.name == "div" and position[0] != 0):
            raise NotALayer(f"its kernel goes to {eqn.primitive.name}")
        others = [None if i == position[0] else _constant(closed, v)
                  for i, v in enumerate(eqn.invars)]
        steps.append(Step(eqn.primitive, dict(eqn.params), tuple(others), position[0]))
        chain.append((eqn, position[0]))
        var = eqn.outvars[0]
    at = [i for i, v in enumerate(eqn.invars) if v is var]
    if len(eqn.invars) < 2 or len(at) != 1 or at[0] > 1:
        raise NotALayer("its kernel is not one operand of a product")
    data = 1 - at[0]
    operand = eqn.invars[data]
    if isinstance(operand, jcore.Literal) or operand not in _depending(jaxpr, inputs):
        raise NotALayer("its product's other operand is computed from no input (a lookup)")
    x, params, kernel = eqn.invars[data].aval, eqn.params, var.aval
    if eqn.outvars[0].aval.dtype != jax.numpy.result_type(x.dtype, kernel.dtype):
        raise NotALayer("a product computed in another dtype (preferred_element_type)")
    found = Product(eqn, tuple(steps), tuple(chain), data)
    if eqn.primitive.name == "conv_general_dilated":
        if data != 0 or params["batch_group_count"] != 1 or set(params["lhs_dilation"]) != {1} and (
                set(params["window_strides"]) != {1} or params["feature_group_count"] != 1):
            raise NotALayer("a conv batch-grouped, or input-dilated with strides or groups")
        return _in_flax_layout(found, len(x.shape))

    if eqn.primitive.name == "dot_general":
        contracted, batched = params["dimension_numbers"]
        if len(batched[0]) > 1:
            raise NotALayer("a batch of products over several axes (the kernel's and the "
                            "data's batch axes)")
        if not 0 < len(contracted[at[0]]) < len(kernel.shape) - len(batched[0]):
            raise NotALayer("a product keeping none of the kernel's axes")
        return found
    if eqn.primitive.name == "ragged_dot_general" and experts:
        if data != 0 or not is_ragged_product(eqn):
            raise NotALayer("a ragged_dot of other dimension numbers than lax.ragged_dot's")
        return found
    raise NotALayer(f"its kernel goes to {eqn.primitive.name}")


def _in_flax_layout(product: Product, ndim: int) -> Product:
    """A conv ``product`` as Flax's layer computes it (channels last, ``HWIO``): in another
    layout (a PyTorch port's ``NCHW`` / ``OIHW``, ``lax.conv``'s default) its kernel transposed
    to ``HWIO`` as one more step, and the data and output transposes in ``layout``."""
    lhs, rhs, out = (tuple(s) for s in product.eqn.params["dimension_numbers"])
    to_nhwc = (lhs[0], *lhs[2:], lhs[1])
    to_hwio = (*rhs[2:], rhs[1], rhs[0])
    back = [0] * ndim
    for i, axis in enumerate((out[0], *out[2:], out[1])):
        back[axis] = i
    if to_nhwc == tuple(range(ndim)) and to_hwio == tuple(range(ndim)) and \
            tuple(back) == tuple(range(ndim)):
        return product
    steps = product.steps if to_hwio == tuple(range(ndim)) else (*product.steps, Step(
        jax.lax.transpose_p, {"permutation": to_hwio}, (None,), 0))
    return dataclasses.replace(product, steps=steps, layout=(to_nhwc, tuple(back)))


def _pieces(closed, var, uses):
    """``[(axis, start, limit, output, chain, squeezed)]`` of the parameter ``var`` cut by its
    ``uses`` (``slice``s, a ``split``, an ``unstack``) along one axis each: ``output`` the
    piece's variable, ``squeezed`` when it is one index without that axis (``w[0]``,
    ``jnp.unstack``), ``chain`` the equations to it as ``(equation, the parameter's
    position)``."""
    shape, found = var.aval.shape, []
    for use in uses:
        name = use.primitive.name
        if name == "slice":
            start, limit, strides = (use.params[k] for k in ("start_indices", "limit_indices",
                                                             "strides"))
            cut = [a for a in range(len(shape)) if (start[a], limit[a]) != (0, shape[a])]
            if len(cut) != 1 or (strides is not None and set(strides) != {1}):
                raise NotALayer("its kernel is sliced along several axes or strided")
            found.append((cut[0], start[cut[0]], limit[cut[0]], use.outvars[0], use))
        elif name == "split":
            offsets = np.cumsum([0, *use.params["sizes"]])
            found += [(use.params["axis"], int(a), int(b), out, use) for a, b, out in
                      zip(offsets[:-1], offsets[1:], use.outvars, strict=True)]
        elif name == "unstack":
            found += [(use.params["axis"] % len(shape), i, i + 1, out, use)
                      for i, out in enumerate(use.outvars)]
        else:
            raise NotALayer(f"its kernel goes to {name} besides its slices")
    pieces = []
    for axis, start, limit, out, use in found:
        chain, squeezed = [(use, 0)], use.primitive.name == "unstack"
        after = _uses(closed.jaxpr, out)
        if not squeezed and limit - start == 1 and len(after) == 1 and after[0] is not None \
                and after[0].primitive.name == "squeeze" and \
                tuple(after[0].params["dimensions"]) == (axis,):
            chain.append((after[0], 0))
            out, squeezed = after[0].outvars[0], True
        pieces.append((axis, start, limit, out, tuple(chain), squeezed))
    return pieces


def _sliced(closed, var, uses, inputs, experts: bool = False) -> Product:
    """The one :class:`Product` of the parameter ``var`` whose ``uses`` cut it along one axis
    into pieces (``w[0]``, ``w[:, :h]``, ``jnp.split``, ``jnp.unstack``) that tile it, each
    (through scalings and casts) a ``dot_general`` of the same data, alike: the whole
    parameter computes what they did, a one-index piece squeezed away keeping the axis in the
    layer's output, a range being a range of its output; with ``experts``, ``stacked`` ones."""
    pieces = _pieces(closed, var, uses)
    axes, squeezed = {p[0] for p in pieces}, {p[5] for p in pieces}
    spans = sorted((start, limit) for _, start, limit, *_ in pieces)
    ends = [0] + [limit for _, limit in spans]
    if len(axes) != 1 or len(squeezed) != 1 or [a for a, _ in spans] != ends[:-1] or \
            ends[-1] != var.aval.shape[min(axes)]:
        raise NotALayer("its kernel's pieces do not tile one of its axes, each cut alike")
    axis, squeezed = min(axes), squeezed.pop()
    parts = {}
    for _, start, limit, out, chain, _ in pieces:
        part = product_of(closed, out, inputs)
        parts[start] = (part, limit, chain + part.chain)
    first = parts[0][0]

    def alike(part) -> bool:
        return part.eqn.primitive.name == "dot_general" and part.data == first.data and \
            part.eqn.invars[part.data] is first.eqn.invars[first.data] and \
            part.eqn.params == first.eqn.params and _signature(part) == _signature(first)

    contracted = first.eqn.params["dimension_numbers"][0][1 - first.data]
    if first.eqn.params["dimension_numbers"][1][0]:
        raise NotALayer("its kernel's pieces are each a batch of products")
    products = [part for part, _, _ in parts.values()]
    stacked = not all(alike(p) for p in products) or (not squeezed and axis in contracted)
    if stacked and not (experts and squeezed and _apart(closed.jaxpr, products)):
        raise NotALayer("its kernel's pieces are not the same product of the same data (a "
                        "range of an axis it contracts, or other data)")
    return Product(first.eqn, first.steps, tuple(c for _, _, chain in parts.values()
                                                 for c in chain),
                   first.data, sliced=axis, squeezed=squeezed,
                   slices=tuple((parts[a][0].eqn, a, parts[a][1]) for a in sorted(parts)),
                   stacked=stacked)


def _ancestors(jaxpr, variables) -> set[int]:
    """The ids of the equations of ``jaxpr`` that ``variables`` are computed from."""
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    found, todo = set(), list(variables)
    while todo:
        eqn = producer.get(todo.pop())
        if eqn is not None and id(eqn) not in found:
            found.add(id(eqn))
            todo.extend(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return found


def _apart(jaxpr, parts) -> bool:
    """Whether ``parts`` (pieces' products) are the same product of other data each, no
    piece's data computed from a piece's product: one product of their data stacked."""
    first = parts[0]
    if any(p.eqn.primitive.name != "dot_general" or p.data != first.data or
           p.eqn.params != first.eqn.params or _signature(p) != _signature(first) or
           p.eqn.invars[p.data].aval != first.eqn.invars[first.data].aval or
           isinstance(p.eqn.invars[p.data], jcore.Literal) for p in parts):
        return False
    upstream = _ancestors(jaxpr, [p.eqn.invars[p.data] for p in parts])
    return not any(id(p.eqn) in upstream for p in parts)


def _signature(product: Product):
    """A slice's steps as comparable values; a reshape or transpose is none (it would move the
    sliced axis): :class:`NotALayer`."""
    if any(s.primitive.name not in ("mul", "div", "convert_element_type", "copy", "copy_p")
           for s in product.steps):
        raise NotALayer("a slice of its kernel is reshaped or transposed")
    return [s.key for s in product.steps]


def piece_of(product: Product, output, start: int, limit: int):
    """A piece's product (``start:limit`` of the sliced axis) from the output of the whole
    parameter's layer (:func:`layer_for`)."""
    kernel, out = equation_of(product).split(",")[1].split("->")
    axis = out.index(kernel[product.sliced])
    if product.squeezed:
        return jax.lax.index_in_dim(output, start, axis, keepdims=False)
    return jax.lax.slice_in_dim(output, start, limit, axis=axis)


def _dense_axes(product: Product) -> int | None:
    """``k`` when ``product`` contracts the data's last ``k`` axes with the kernel's first
    ``k`` (the kernel second): a dense layer's product; else ``None``."""
    eqn = product.eqn
    if eqn.primitive.name != "dot_general" or product.data != 0:
        return None
    contracted, batched = eqn.params["dimension_numbers"]
    if batched[0]:
        return None
    k, ndim = len(contracted[0]), len(eqn.invars[0].aval.shape)
    first = tuple(contracted[0]) == tuple(range(ndim - k, ndim))
    return k if first and tuple(contracted[1]) == tuple(range(k)) else None


def equation_of(product: Product) -> str:
    """The einsum ``data,kernel->out`` of ``product``'s ``dot_general``, ``out`` in the
    product's own order (its batch axis, then the first operand's kept axes, then the
    second's)."""
    eqn, data = product.eqn, product.data
    contracted, batched = eqn.params["dimension_numbers"]
    x = list(string.ascii_lowercase[:len(eqn.invars[data].aval.shape)])
    kernel_ndim = len(eqn.invars[1 - data].aval.shape)
    fresh = iter(string.ascii_uppercase)
    k = [None] * kernel_ndim
    for xa, ka in zip((*contracted[data], *batched[data]),
                      (*contracted[1 - data], *batched[1 - data]), strict=True):
        k[ka] = x[xa]
    k = [c if c is not None else next(fresh) for c in k]
    summed, shared = list(contracted[1 - data]), list(batched[1 - data])
    if product.squeezed:  # the whole parameter: its sliced axis kept
        k.insert(product.sliced, next(fresh))
        summed = [a + (a >= product.sliced) for a in summed]
    kept_x = [c for i, c in enumerate(x) if i not in (*contracted[data], *batched[data])]
    kept_k = [c for i, c in enumerate(k) if i not in (*summed, *shared)]
    out = [x[a] for a in batched[data]] + (kept_x + kept_k if data == 0 else kept_k + kept_x)
    if product.stacked:  # the pieces' data stacked: the sliced axis leads data and output
        letter = k[product.sliced]
        x, out = [letter, *x], [letter, *(c for c in out if c != letter)]
    return f"{''.join(x)},{''.join(k)}->{''.join(out)}"


def stored_equation(product: Product) -> str:
    """:func:`equation_of` with the kernel's letters in its stored layout: the transposes among
    ``product``'s steps undone (its other steps neither move nor rename axes)."""
    lhs, rest = equation_of(product).split(",")
    kernel, out = rest.split("->")
    for step in reversed(product.steps):
        if step.primitive.name == "transpose":
            stored = [""] * len(kernel)
            for i, axis in enumerate(step.params["permutation"]):
                stored[axis] = kernel[i]
            kernel = "".join(stored)
    return f"{lhs},{kernel}->{out}"


def layer_for(product: Product, kernel, scope, name: str, *, named_by_kernel: bool = False
              ) -> nn.Module:
    """The Flax layer (no bias) computing ``product`` with the parameter ``name`` of the
    module whose ``scope`` it is bound to, as the product's steps make it; in an init, its
    kernel is the one the module's ``param`` made (``kernel``: its value, for its dtype).

    ``named_by_kernel``: the layer is bound to a scope named ``name`` inside ``scope`` (the
    module's scope is shared with others, ``nn.share_scope``: Gemma's feed-forward holds two
    products), its path ``{module path}/{name}``; a pair in its place replaces the variable
    ``name`` by ``name/vertical``, ``name/horizontal``."""
    eqn, steps = product.eqn, product.steps
    params, shape = eqn.params, tuple(eqn.invars[1 - product.data].aval.shape)  # (as used)
    if product.layout is not None:  # (HWIO, as the layer uses it)
        shape = tuple(shape[a] for a in steps[-1].params["permutation"])
    if product.sliced is not None:  # the whole parameter (its steps scale or cast it)
        shape = (*shape[:product.sliced], product.slices[-1][2],  # (inserted, or widened)
                 *shape[product.sliced + (not product.squeezed):])
    dtype = nn.meta.unbox(kernel).dtype

    def made(key, wanted, dtype=dtype):  # (a pair in its place inits its own factors; the
        return nn.initializers.lecun_normal()(key, wanted, dtype)  # layer's own kernel is
    # stored before it runs: linen_products)

    renamed = {"stored": name, "steps": steps} if name != KERNEL or steps or \
        named_by_kernel else {}
    if named_by_kernel:
        renamed["named_by_kernel"] = True
        scope = scope.push(name, reuse=True)
    computed = {v.aval.dtype for v in eqn.invars[:2]}  # (one: a kernel cast to the data's)
    common = dict(use_bias=False, dtype=computed.pop() if len(computed) == 1 else None,
                  param_dtype=dtype, precision=params["precision"], kernel_init=made,
                  parent=scope, **renamed)  # (its pair computes in that dtype too)
    k = None if product.squeezed else _dense_axes(product)
    if eqn.primitive.name == "dot_general" and k == 1 and len(shape) == 2:
        layer = (WrittenDense if renamed else nn.Dense)(shape[1], **common)
    elif eqn.primitive.name == "dot_general" and k is not None:  # (t5x's, MaxText's)
        layer = (WrittenDenseGeneral if renamed else nn.DenseGeneral)(
            shape[k:], axis=tuple(range(-k, 0)), **common)
    elif eqn.primitive.name == "dot_general":  # (Gemma's: any axes)
        layer = (WrittenEinsum if renamed else nn.Einsum)(shape, equation_of(product), **common)
    else:
        layer = (WrittenConv if renamed else nn.Conv)(
            shape[-1], shape[:-2], strides=tuple(params["window_strides"]),
            padding=[tuple(int(v) for v in p) for p in params["padding"]],
            kernel_dilation=tuple(params["rhs_dilation"]),
            input_dilation=tuple(params["lhs_dilation"]),
            feature_group_count=params["feature_group_count"], **common)
    object.__setattr__(layer, _WRITTEN, True)
    return layer


def run_in_layout(layer, product: Product, data):
    """``layer`` (the Flax layer :func:`layer_for` made) on ``data`` as ``product`` computed it:
    a conv in another layout than Flax's gets its data transposed to channels last and its
    output back."""
    if product.layout is None:
        return layer(data)
    to_nhwc, back = product.layout
    return jax.numpy.transpose(layer(jax.numpy.transpose(data, to_nhwc)), back)


def set_aside(layer: nn.Module, kernel) -> None:
    """Hold ``kernel`` for ``layer`` (named by its kernel) while its variable is removed from
    its module's scope, so that a pair may take its name in an init; ``None``: release it."""
    if kernel is None:
        layer.__dict__.pop(_STASHED, None)
    else:
        object.__setattr__(layer, _STASHED, kernel)
