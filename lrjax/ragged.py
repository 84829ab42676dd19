"""Products of ``lax.ragged_dot``: the rows of the data in consecutive groups (each group the tokens
routed to one expert), each group multiplied by its own matrix of a ``(G, C, N)`` kernel: the
experts of Gemma 4's ``MoERagged`` (google-deepmind/gemma) and of its NNX port in google/tunix.

:class:`RaggedDot` is such a product as an NNX layer: its kernel the user's parameter, as stored,
read through the layout steps the user's code takes (tunix's ``(E, 2, H, F)`` gating kernel
transposed and reshaped to ``(E, F, 2H)``); :class:`LowRankRaggedNNX` its split, two ragged
products over the same groups, ``(G, C, K)`` then ``(G, K, N)``, each group's matrix factored in
the closed form.

lrjax sees such a layer as the einsum :data:`EQUATION` of its input dispatched by group
(:func:`dispatched`: ``(G, M, C)``, each row in its group's slot, zeros elsewhere; its moments
taken one group at a time without making it, :func:`grouped_moments`): a batch of kernels
(:class:`lrjax.einsums.EinsumSplit`), each calibrated on its own group's rows and costed as
``G`` times ``M x C x N`` multiply-adds. That is what XLA counts and computes on CPU, where
``ragged_dot`` lowers to every row's product with every group's matrix, the input masked by group
(4 flops per element of the ``(G, M, C)`` input, :data:`MASK_MACS`: the pair's second product
masks its ``(G, M, K)`` input, counted in its cost, :attr:`lrjax.costs.ConvShape.mid_macs`), as
the ONNX and LiteRT exports compute it too (:func:`lrjax.litert_math.dense_ragged_dot`). Its
group offsets (a cumulative sum of the group sizes, ``G (G - 1)`` flops a call), which the pair's
second product computes again, are left out: 3e-5 of a 4-expert toy block's flops, less than
1e-8 of a Gemma 4 MoE layer's. On GPU and TPU a ragged product is a grouped matmul of a ``G``-th
of that work, and the split saves about the same fraction of it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lrjax import sites

__all__ = ["EQUATION", "RaggedDot", "LowRankRaggedNNX", "Grouped", "dispatched",
           "grouped_moments", "is_ragged_product",
           "layout_steps", "apply_steps", "used_shape_of", "used_names", "used_parameters", "site"]

# the batched einsum a ragged product is costed, calibrated and split as: g the groups
EQUATION = "gmc,gcn->gmn"
# XLA:CPU's work per element of a ragged product's input beyond the product, in multiply-adds:
# the input masked by group (two compares, an and, a select: 4 flops)
MASK_MACS = 2

_LAYOUT = ("transpose", "reshape", "copy", "copy_p")


def is_ragged_product(eqn) -> bool:
    """Whether ``eqn`` is ``lax.ragged_dot``'s product of ``(M, C)`` rows in groups by a
    ``(G, C, N)`` kernel (its default dimension numbers; no group offset)."""
    if eqn.primitive.name != "ragged_dot_general" or len(eqn.invars) != 3:
        return False
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (contracted, batch) = numbers.dot_dimension_numbers
    return (len(lhs.shape) == 2 and len(rhs.shape) == 3 and eqn.params.get("group_offset") is None
            and tuple(map(tuple, contracted)) == ((1,), (1,)) and not any(map(tuple, batch))
            and tuple(numbers.lhs_ragged_dimensions) == (0,)
            and tuple(numbers.rhs_group_dimensions) == (0,))


def layout_steps(steps) -> tuple | None:
    """``steps`` (:class:`lrjax.written_products.Step`\\s from a stored parameter to a ragged
    product's kernel) as values: ``("transpose", permutation)``, ``("reshape", shape)``;
    ``None`` when one does other work (a scaling, a cast: the pair would compute otherwise)."""
    out = []
    for step in steps:
        name = step.primitive.name
        if name not in _LAYOUT:
            return None
        if name == "transpose":
            out.append(("transpose", tuple(int(a) for a in step.params["permutation"])))
        elif name == "reshape":
            out.append(("reshape", tuple(int(d) for d in step.params["new_sizes"])))
    return tuple(out)


def apply_steps(kernel, steps: tuple):
    """``kernel`` through :func:`layout_steps`' ``steps``."""
    for name, value in steps:
        kernel = jnp.transpose(kernel, value) if name == "transpose" else \
            jnp.reshape(kernel, value)
    return kernel


def used_shape_of(shape: tuple, steps: tuple) -> tuple[int, ...]:
    """The shape :func:`apply_steps` gives a kernel of ``shape`` (no trace: the steps say it)."""
    shape = tuple(int(d) for d in shape)
    for name, value in steps:
        shape = tuple(shape[a] for a in value) if name == "transpose" else tuple(value)
    return shape


def used_names(names: tuple, steps: tuple, shape: tuple) -> tuple:
    """The axis names (sharding) of a stored kernel of ``shape`` carried to the kernel its
    product uses: moved by the transposes among ``steps``; a reshape keeps the names of the
    leading axes it leaves as they are, none after (a merged ``(2, H)`` axis is unnamed); names
    of another rank than the kernel's, none."""
    if len(names) != len(shape):  # (names for another rank: none carried)
        return (None,) * len(used_shape_of(shape, steps))
    names, shape = list(names), list(shape)
    for name, value in steps:
        if name == "transpose":
            names, shape = [names[a] for a in value], [shape[a] for a in value]
            continue
        keep = 0
        while keep < min(len(shape), len(value)) and shape[keep] == value[keep]:
            keep += 1
        names, shape = names[:keep] + [None] * (len(value) - keep), list(value)
    return tuple(names)


def used_parameters(steps: tuple, params: dict) -> dict:
    """A ragged layer's stored ``{"kernel": ...}`` as its product uses it: the
    :attr:`lrjax.sites.ConvSite.parametrization` of its site (``steps``: :func:`layout_steps`)."""
    return {**params, "kernel": apply_steps(params["kernel"], steps)}


def dispatched(x: jax.Array, group_sizes: jax.Array, groups: int) -> jax.Array:
    """``x`` ``(M, C)``, rows in consecutive groups of ``group_sizes``, as ``(groups, M, C)``: each
    row in its group's slot, zeros in the others (rows past the groups' total in none)."""
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
    mask = jax.nn.one_hot(group, groups, dtype=x.dtype)  # (M, G); past the total: zeros
    return jnp.transpose(mask)[:, :, None] * x[None]


@dataclasses.dataclass(frozen=True)
class Grouped:
    """A ragged product's input as lrjax sees it: ``rows`` ``(M, C)`` in consecutive groups of
    ``group_sizes``, standing for their :func:`dispatched` ``(G, M, C)`` buffer (its
    ``shape``) without making it (``G`` times the rows: 46 GB for a 128-expert layer's 32k
    routed tokens of width 2816)."""
    rows: jax.Array
    group_sizes: jax.Array
    groups: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.groups, *self.rows.shape)


def grouped_moments(grouped: Grouped, site, axes) -> tuple[jax.Array, jax.Array]:
    """What :func:`lrjax.sites.input_moments` gives of ``site`` (a ragged product's batch of
    kernels) on ``grouped``'s dispatched buffer: each group's sum of ``x x^T`` over its own rows,
    ``(G, C, C)`` float32, and the buffer's row count ``M``; one group at a time."""
    return _grouped_moments(grouped.rows, grouped.group_sizes, grouped.groups)


@functools.partial(jax.jit, static_argnums=2)
def _grouped_moments(rows, group_sizes, groups: int):
    x = rows.astype(jnp.float32)
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x.shape[0]), side="right")

    def one(g):
        mine = jnp.where((group == g)[:, None], x, 0.0)
        return jnp.matmul(mine.T, x, precision=jax.lax.Precision.HIGHEST)

    return jax.lax.map(one, jnp.arange(groups)), jnp.asarray(x.shape[0], jnp.float32)


class RaggedDot(nnx.Module):
    """``lax.ragged_dot(x, kernel, group_sizes)``: ``x`` ``(M, C)`` in consecutive groups, the
    kernel ``(G, C, N)`` as :func:`apply_steps` makes it of the parameter ``kernel`` (stored
    as the user's code stores it; the variable shared, not copied), cast to ``dtype`` if given
    (a mixed-precision model computing in its data's dtype)."""

    def __init__(self, kernel: nnx.Param, steps: tuple = (), precision=None, dtype=None):
        self.kernel = kernel
        self.steps = tuple(steps)
        self.precision = precision
        self.dtype = dtype

    @property
    def param_dtype(self):
        """The kernel variable's dtype (:func:`lrjax.sites.with_param_casts` reads it)."""
        return self.kernel.dtype

    def used_kernel(self) -> jax.Array:
        """The ``(G, C, N)`` kernel the product uses."""
        kernel = apply_steps(self.kernel[...], self.steps)
        return kernel if self.dtype is None else kernel.astype(self.dtype)

    @property
    def used_shape(self) -> tuple[int, ...]:
        """The shape of :meth:`used_kernel`, ``(G, C, N)``."""
        return used_shape_of(self.kernel.shape, self.steps)

    def __call__(self, x, group_sizes):
        return jax.lax.ragged_dot(x, self.used_kernel(), group_sizes, precision=self.precision)


class LowRankRaggedNNX(nnx.Module):
    """A :class:`RaggedDot` as two over the same groups: ``vertical`` ``(G, C, K)`` then
    ``horizontal`` ``(G, K, N)``, one rank per group's matrix (``K``)."""

    kernel_shape: tuple[int, ...] | None = None  # the replaced layer's (set by the surgery)
    kernel_dtype: str = "float32"

    def __init__(self, vertical: RaggedDot, horizontal: RaggedDot):
        self.vertical = vertical
        self.horizontal = horizontal

    def __call__(self, x, group_sizes):
        return self.horizontal(self.vertical(x, group_sizes), group_sizes)


def site(path: str, layer: RaggedDot, shape) -> sites.ConvSite:
    """The site of ``layer`` first called on rows that :func:`dispatched` makes ``shape``
    ``(G, M, C)``: the batch of kernels of :data:`EQUATION` (its stored kernel read through its
    steps: :attr:`lrjax.sites.ConvSite.parametrization`)."""
    found = sites.einsum_site(
        path, shape, sites.einsum_split(EQUATION), layer.used_shape, False, equation=EQUATION,
        written_spec=("ragged", layer.steps, layer.precision, layer.dtype),
        parametrization=functools.partial(used_parameters, layer.steps) if layer.steps else None)
    return dataclasses.replace(found, shape=dataclasses.replace(found.shape, mid_macs=MASK_MACS))
