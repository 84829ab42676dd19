"""The layers a surgery can split, framework-neutral: :class:`ConvSite` and their variable layouts.

Every linear layer is one matrix product between an input-channel group and an output group, so
one closed form serves all of them (the paper's, at ``d = 1`` the truncated SVD). A site records
the layer's geometry as a 2-D conv (:class:`lrjax.costs.ConvShape`), which is what the cost model,
the rank rules and :func:`lrjax.decompose.vh_decompose` read:

==============  =====================================  ===========================================
kind            the layer                              geometry as a conv
==============  =====================================  ===========================================
``kxk``         ``nn.Conv`` / ``nnx.Conv``, window      itself; vertical ``kh x 1`` then horizontal
                larger than 1x1                        ``1 x kw``
``1x1``         a 1x1 ``nn.Conv`` / ``nnx.Conv`` (any  itself; two 1x1 convs ``C -> K -> N`` (the
                stride, groups)                        first takes the stride and padding)
``dense``       ``nn.Dense``, ``nn.DenseGeneral``,      a 1x1 conv over ``rows x 1`` pixels, ``rows``
                ``nnx.Linear``, ``nnx.LinearGeneral``, the input's positions per example (tokens,
                ``nn.Einsum`` (:func:`einsum_split`)   pixels; 1 for a classifier's input)
``transposed``  ``nn.ConvTranspose`` /                 a conv on the input dilated by the strides
                ``nnx.ConvTranspose`` (SAME, VALID or  (``ConvShape.transposed``); vertical ``kh x 1``
                explicit padding); a conv with         then horizontal ``1 x kw`` transposed convs
                ``input_dilation`` (its strides)
==============  =====================================  ===========================================

A 1-D conv is costed and factored as the ``(k, 1)`` conv of its 2-D view and a pointwise N-D
conv as a 1x1 conv (:func:`conv_view`); their factors keep the layer's own kernel rank
(``(k, C/groups, K)`` and ``(1, K/groups, N)``).

Variable layout of a split layer, in the layer's own scope: ``vertical/kernel`` (the first
factor, no bias), ``horizontal/kernel`` and ``horizontal/bias`` (the layer's own bias). For convs
the factors are HWIO kernels ``(kh, 1, C/groups, K)`` and ``(1, kw, K/groups, N)``; for dense
layers ``(*in_dims, K)`` and ``(K, *out_dims)``, in the layer's own kernel layout
(``nn.Dense``: ``(C, K)`` and ``(K, N)``). A transposed conv's kernel ``(kh, kw, C, N)`` is the
HWIO kernel of the conv it computes; with ``transpose_kernel=True`` its kernel ``(kh, kw, N, C)``
is read flipped and transposed (as ``lax.conv_transpose`` does), and so are its factors
``(kh, 1, K, C)`` and ``(1, kw, N, K)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import costs, decompose
from lrjax.conv_views import nd_patches, vertical_geometry
from lrjax.einsums import EinsumSplit, batch_position, called_equation, einsum_split
from lrjax.moments import transposed_patch_moments

__all__ = ["KINDS", "ConvSite", "EinsumSplit", "batch_position", "einsum_site", "einsum_split",
           "called_equation",
           "contracted_axes", "dense_shape", "dense_rows", "input_moments",
           "unless_stacked", "device_array", "redefined", "computes_as", "reparametrizes",
           "subclass_reason", "wrapped_reason", "path_of", "variable_key", "keep_read_elsewhere"]

# the kinds of layer a site can be, with the label reports use
KINDS = {"kxk": "k x k convs", "1x1": "1x1 convs", "dense": "dense layers",
         "transposed": "transposed convs"}


@dataclasses.dataclass(frozen=True)
class ConvSite:
    """One linear layer of a model (a conv or a dense layer).

    Attributes:
      path: full module path joined with ``/`` (the layer's name everywhere in lrjax).
      shape: geometry for costs (``shape.name == path``); ``None`` for layers that are not 2-D
        convs or dense layers (then ``skip`` says why).
      rank: the pair's rank when the layer already is one (a ``LowRankConv``, or a layer a
        ``LowRankModel`` decomposes); ``None`` otherwise.
      skip: why the layer cannot be decomposed (``None``: it can).
      dense_dims: ``(in_dims, out_dims)`` of a dense layer's kernel ``(*in_dims, *out_dims)``
        (``((C,), (N,))`` for ``nn.Dense``); ``None`` for convs.
      kernel_axes: for an einsum whose kernel interleaves contracted and output axes, the
        permutation that brings the kernel variable to ``(*in_dims, *out_dims)``; else ``None``.
      equation: an einsum's equation as it was called (``None`` for other layers).
      transpose_kernel: a transposed conv whose kernel variable is ``(kh, kw, N, C)`` (1-D:
        ``(k, N, C)``), read flipped (``nn.ConvTranspose(transpose_kernel=True)``).
      parametrization: for a linen subclass that redefines ``param`` (weight standardization),
        a function from the layer's stored parameters ``{"kernel": ..., "bias": ...}`` to the
        ones its computation uses, which the closed form factors; ``None``: used as stored.
      parametrization_flops: XLA's flops per example of that parametrization (work the model
        does on every call, which a split saves: the pair's factors are plain weights).
      param_cast_flops: XLA's flops per example, per parameter, of casting the layer's
        parameters to the dtype it computes in (``dtype=jnp.bfloat16`` with float32 parameters:
        one convert per parameter on every call); what a split changes with the parameter
        count (the pair casts its factors). 0: no cast.
      conv_dims: a conv's own number of spatial dims (:func:`conv_view`): 1 for a 1-D conv
        (kernel ``(k, C/groups, N)``, costed as ``(k, 1)``), 3 or more for a pointwise N-D conv
        (kernel ``(1, ..., 1, C, N)``, costed as 1x1 on its last two spatial dims).
      nd_geometry: ``(window, strides, padding, dilation)`` of an N-D conv with a window or
        stride (:func:`lrjax.conv_views.nd_geometry`), costed and factored as the 2-D conv of
        :func:`lrjax.conv_views.conv_view`: its calibration reads its own patches, its factors'
        variables are in the layer's rank (``(k1, ..., 1, C, K)``, ``(1, ..., k_last, K, N)``);
        else ``None``.
      stack: how many iterations of a scan run the layer (linen's ``nn.scan``, NNX's
        ``nnx.scan`` over ``nnx.vmap``-made blocks; or members of an ``nn.vmap``), each with its
        own slice of a kernel variable stacked on one axis, ``stack_axis`` (the leading one, or
        MaxText's ``param_scan_axis``; 1: not stacked). The stack is costed
        and decomposed as one grouped conv of ``stack`` times the layer's groups (each
        iteration's matrix a group: ``shape`` holds ``stack`` times the channels), so a rank
        counts every iteration's intermediate channels, as a grouped conv's counts every
        group's, and one rank per iteration is shared by all of them.
      scanned: the kernel variable holds the iterations' axis at ``stack_axis`` even where
        ``stack`` is 1 (a scan of one iteration: ``nn.scan(length=1)``, a one-block
        ``nnx.vmap`` stack), as :attr:`stacked` tells.
      batched: the stack is an einsum's batch of kernels (:class:`EinsumSplit`'s ``batch``
        letter, at ``stack_axis``): one call runs every matrix, each on its slice of the input.
      written: a product a module's own code computes with a parameter it declares, run as
        this layer (:mod:`lrjax.linen_products`).
      kernel_name: the name of the variable holding the layer's kernel in its scope (a written
        product's: its module's parameter, e.g. ``"weight"``).
      companions: the other parameters of a written product's module that its kernel's
        normalization reads (a weight normalization's gain), which its pair replaces too.
      named_by_kernel: a written product of a module sharing its parent's scope
        (``nn.share_scope``) or computing several, named by its kernel: ``path`` is the kernel variable's own
        (:attr:`kernel_key`), its pair's variables take its place.
      written_spec: a conv, a ``ragged_dot`` or an einsum on a kernel cast to its data's dtype
        that an NNX module's own code computes with its parameter (:mod:`lrjax.nnx_products`),
        as that module's call was found to compute it, to run again as an ``nnx.Conv``, a
        :class:`lrjax.ragged.RaggedDot` (its ``equation`` the batched einsum it is costed as)
        or an ``nnx.Einsum(dtype=...)``; ``None`` otherwise (a plain einsum's is its
        ``equation``).
      share: for a layer left as it is whose work was counted in the traced pass (a product
        the model's own code computes, :mod:`lrjax.own_code`), its share of the whole net's
        multiply-adds; ``None`` otherwise.
    """

    path: str
    shape: costs.ConvShape | None
    rank: int | None = None
    skip: str | None = None
    dense_dims: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    kernel_axes: tuple[int, ...] | None = None
    equation: str | None = None
    transpose_kernel: bool = False
    parametrization: Callable[[dict], dict] | None = dataclasses.field(default=None, compare=False)
    parametrization_flops: float = 0.0
    param_cast_flops: float = 0.0
    conv_dims: int = 2
    stack: int = 1
    stack_axis: int = 0
    nd_geometry: tuple | None = None
    share: float | None = None
    written: bool = False
    kernel_name: str = "kernel"
    companions: tuple[str, ...] = ()
    named_by_kernel: bool = False
    batched: bool = False
    written_spec: tuple | None = None
    scanned: bool = False

    @property
    def stacked(self) -> bool:
        """Whether the kernel variable holds iterations (or a batch of kernels) on
        ``stack_axis``, one or more."""
        return self.stack > 1 or self.scanned

    @property
    def lifted(self) -> bool:
        """A stack a lifted transform runs (each call sees one iteration's slice), not a batch
        of kernels (one call runs them all)."""
        return self.stacked and not self.batched

    @property
    def candidate(self) -> bool:
        """Whether the layer can be replaced by a pair (supported, not a pair already)."""
        return self.skip is None and self.rank is None and self.shape is not None

    @property
    def kernel_key(self) -> tuple[str, ...]:
        """The layer's kernel variable as keys of the ``params`` tree."""
        key = variable_key(self.path)
        return key if self.named_by_kernel else (*key, self.kernel_name)

    @property
    def where(self) -> str:
        """The layer as error messages name it (a stacked one says so)."""
        if self.batched:
            return (f"layer {self.path!r} (a batch of {self.stack} kernels, as groups; its rank "
                    f"counts all of them)")
        return f"layer {self.path!r}" + (
            f" (stacked: {self.stack} iterations of a scan, as groups; its rank counts all of "
            f"them)" if self.stack > 1 else "")

    @property
    def kind(self) -> str | None:
        """``"kxk"``, ``"1x1"``, ``"dense"`` or ``"transposed"`` (see :data:`KINDS`); ``None``
        without a shape."""
        if self.dense_dims is not None:
            return "dense"
        if self.shape is None:
            return None
        if self.shape.transposed:
            return "transposed"
        return "1x1" if tuple(self.shape.kernel_size) == (1, 1) else "kxk"

    @property
    def full_macs(self) -> float:
        """Multiply-adds per example of the layer as it is: its product at full rank, plus its
        parametrization's flops counted as half a multiply-add each."""
        return costs.conv_cost(self.shape).macs + self.parametrization_flops / 2

    @property
    def kernel_variable_shape(self) -> tuple[int, ...]:
        """The shape of the layer's own ``kernel`` variable (stacked: with the iterations at
        ``stack_axis``)."""
        shape = list(self._slice_variable_shape())
        if self.stacked:
            shape.insert(self.stack_axis, self.stack)
        return tuple(shape)

    def _slice_variable_shape(self) -> tuple[int, ...]:
        if self.dense_dims is not None:
            dims = (*self.dense_dims[0], *self.dense_dims[1])
            if self.kernel_axes is None:
                return dims
            shape = [0] * len(dims)
            for position, axis in enumerate(self.kernel_axes):
                shape[axis] = dims[position]
            return tuple(shape)
        kh, kw, c, n = self.shape.kernel_shape
        n //= self.stack
        channels = (n, c) if self.transpose_kernel else (c, n)
        return (*self._spatial(kh, kw), *channels)

    def _spatial(self, kh: int, kw: int) -> tuple[int, ...]:
        """The layer's own kernel window for the 2-D view's ``(kh, kw)``."""
        if self.conv_dims > 2:
            return self.nd_geometry[0] if self.nd_geometry else (1,) * self.conv_dims
        return (kh,) if self.conv_dims == 1 else (kh, kw)

    def check_kernel_shape(self, shape) -> None:
        """Raise ``ValueError`` naming both shapes unless ``shape`` is the layer's kernel's."""
        if tuple(shape) != self.kernel_variable_shape:
            raise ValueError(f"the kernel of layer {self.path!r} has shape {tuple(shape)}; the "
                             f"model's layer expects {self.kernel_variable_shape}")

    def to_hwio(self, kernel) -> np.ndarray:
        """The layer's ``kernel`` variable as an HWIO conv kernel ``(kh, kw, C/groups, N)``.

        Raises:
          ValueError: a kernel whose shape is not the layer's, naming both.
        """
        kernel = np.asarray(kernel, np.float32)
        self.check_kernel_shape(kernel.shape)
        if self.stacked:  # each iteration's kernel a group of output channels
            return np.concatenate([self._slice_hwio(k) for k in
                                   np.moveaxis(kernel, self.stack_axis, 0)], axis=-1)
        return self._slice_hwio(kernel)

    def _slice_hwio(self, kernel: np.ndarray) -> np.ndarray:
        kh, kw, c, n = self.shape.kernel_shape
        if self.kernel_axes is not None:
            kernel = np.transpose(kernel, self.kernel_axes)
        if self.transpose_kernel:  # (its window flipped, its channel axes swapped)
            kernel = np.ascontiguousarray(np.swapaxes(
                kernel[(slice(None, None, -1),) * (kernel.ndim - 2)], -2, -1))
        return kernel.reshape(kh, kw, c, n // self.stack)

    def factor_variables(self, factors: decompose.Factors) -> tuple[jax.Array, jax.Array]:
        """``(vertical/kernel, horizontal/kernel)`` variables of the pair from HWIO factors
        (JAX arrays; reshaped on the host when the factors are NumPy arrays); a stack's with the
        iterations at its ``stack_axis`` (its factors' groups, split)."""
        if self.stacked:
            slices = zip(np.split(np.asarray(factors.vertical), self.stack, axis=-1),
                         np.split(np.asarray(factors.horizontal), self.stack, axis=-1),
                         strict=True)
            vertical, horizontal = zip(*(self._slice_factors(v, h) for v, h in slices),
                                       strict=True)
            return tuple(device_array(np.stack(f, axis=batch_position(self.stack_axis,
                                                                      f[0].ndim)))
                         for f in (vertical, horizontal))
        return tuple(map(device_array, self._slice_factors(factors.vertical,
                                                           factors.horizontal)))

    def _slice_factors(self, vertical, horizontal) -> tuple:
        if self.dense_dims is not None:
            in_dims, out_dims = self.dense_dims
            rank = vertical.shape[-1]
            vertical = vertical.reshape(*in_dims, rank)
            horizontal = horizontal.reshape(rank, *out_dims)
        elif self.transpose_kernel:  # as nn.ConvTranspose(transpose_kernel=True) reads them:
            if self.nd_geometry is not None:  # (in the layer's own rank first)
                vertical, horizontal = self._nd_factors(vertical, horizontal)
            vertical, horizontal = (np.swapaxes(np.flip(np.asarray(f), tuple(range(f.ndim - 2))),
                                                -2, -1) for f in (vertical, horizontal))
            if self.conv_dims == 1:  # (k, K, C) and (1, N, K)
                vertical, horizontal = vertical[:, 0], horizontal[0]
        elif self.nd_geometry is not None:
            vertical, horizontal = self._nd_factors(vertical, horizontal)
        elif self.conv_dims != 2:  # a k-conv then a pointwise one, in the layer's own rank
            vertical = vertical.reshape(*self._spatial(*vertical.shape[:2]), *vertical.shape[2:])
            horizontal = horizontal.reshape(*(1,) * self.conv_dims, *horizontal.shape[2:])
        return vertical, horizontal

    def _nd_factors(self, vertical, horizontal) -> tuple:
        """An N-D layer's factors in its own rank: the leading dims', then the last's."""
        window, lead = self.nd_geometry[0], (1,) * (self.conv_dims - 1)
        return (vertical.reshape(*window[:-1], 1, *vertical.shape[2:]),
                horizontal.reshape(*lead, window[-1], *horizontal.shape[2:]))

    def restacked(self, stack: int) -> ConvSite:
        """This layer's site as run by ``stack`` iterations of a scan (see ``stack``; 1: one
        iteration's, its kernel without the iterations' axis)."""
        def scaled(value: int) -> int:
            return value // self.stack * stack

        shape = dataclasses.replace(self.shape, in_channels=scaled(self.shape.in_channels),
                                    out_channels=scaled(self.shape.out_channels),
                                    groups=scaled(self.shape.groups))
        return dataclasses.replace(self, shape=shape, stack=stack, scanned=False)

    def renamed(self, path: str, scale: float = 1.0) -> ConvSite:
        """This layer's site named ``path`` (its kernel then read at ``path``'s keys), its
        per-example work scaled by ``scale`` (a module run on ``scale`` times the model's
        examples)."""
        scaled = None if self.shape is None else self.shape.times(scale)
        shape = None if scaled is None else dataclasses.replace(scaled, name=path, runs=tuple(
            dataclasses.replace(r, name=path) for r in scaled.runs))
        return dataclasses.replace(self, path=path, shape=shape,
                                   param_cast_flops=self.param_cast_flops * scale,
                                   parametrization_flops=self.parametrization_flops * scale)


# what a subclass may define and still run its Flax base type's computation: the dataclass and
# constructor machinery (field defaults are not methods), and in linen ``param``, which
# reparametrizes the stored weights (weight standardization, as BiT's ``StdConv``): the closed
# form then factors the weights ``param`` returns (:attr:`ConvSite.parametrization`)
_CONSTRUCTION = frozenset({"__init__", "__eq__", "__hash__", "__repr__"})


def redefined(cls: type, base_type: type) -> list[str]:
    """The methods of ``base_type`` that its subclass ``cls`` redefines (sorted), leaving out
    the dataclass and constructor machinery and dataclass field defaults."""
    fields = getattr(base_type, "__dataclass_fields__", {})
    names = set()
    for klass in cls.__mro__:
        if klass is base_type:
            break
        for name, value in vars(klass).items():
            if name in _CONSTRUCTION or name in fields or not hasattr(base_type, name):
                continue
            if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                names.add(name)
    return sorted(names)


def computes_as(layer, base_types: Sequence[type]) -> type | None:
    """The type of ``base_types`` whose computation ``layer`` runs, or None.

    Its own type, or the type a subclass derives from when the subclass redefines none of its
    methods (new fields, other defaults and new helper methods change nothing the layer
    computes), except, for linen layers, ``param``: then the computation is the base type's on
    the weights ``param`` returns (:func:`reparametrizes`). A pair's own halves
    (``Factor*``) compute as their base type too; callers that must not split them exclude them.
    """
    for base in base_types:
        if type(layer) is base:
            return base
    for base in base_types:
        if isinstance(layer, base):
            allowed = {"param"} if hasattr(base, "param") else set()  # linen
            return base if set(redefined(type(layer), base)) <= allowed else None
    return None


def reparametrizes(layer, base_type: type) -> bool:
    """Whether a linen layer is a subclass of ``base_type`` that redefines ``param`` (its
    computation reads weights derived from the stored ones)."""
    return type(layer) is not base_type and "param" in redefined(type(layer), base_type)


def wrapped_reason(wrapper, folded_by: str | None = None) -> str:
    """The skip reason of a layer run by a wrapper that re-parametrizes its weights (Flax's
    ``WeightNorm``, ``SpectralNorm``, linen and NNX), which ``folded_by`` (the decomposition
    function, if any) folds."""
    return (f"its weights are re-parametrized by the {type(wrapper).__name__} around it "
            "(the stored kernel is not the one it computes with): its own computation is kept"
            + (f" ({folded_by} folds the wrapper into its weights and splits it)" if folded_by
               else ""))


def subclass_reason(layer, base_type: type) -> str:
    """The skip reason of a subclass that does not compute as ``base_type``, naming what it
    redefines."""
    names = ", ".join(redefined(type(layer), base_type))
    return (f"{type(layer).__name__} (a subclass of {base_type.__name__} that redefines "
            f"{names}: its own computation is kept)")


def unless_stacked(site: ConvSite, kernel_shape, any_axis: bool = True) -> ConvSite:
    """``site``, or ``site`` left as is with the reason when its kernel variable's shape
    (``kernel_shape``; ``None``: not known) has leading axes the layer does not see: a layer
    stacked by a lifted transform (``nn.scan``, ``nn.vmap``, ``nnx.scan`` over ``nnx.vmap``-made
    layers), whose call sees one slice; but a layer whose kernel has one axis more (a scan's
    iterations: first, as ``nn.scan`` stacks them, or at another place, as MaxText and
    big_vision's CapPa scan with ``param_scan_axis = 1``; where the first and another axis of
    the same length could be it, the first; where only later ones could, none) is the
    :meth:`ConvSite.restacked` site, its ``stack_axis`` that axis (a layer that reparametrizes
    its weights, or a written one whose code scales, transposes or reshapes its kernel, reads
    each iteration's weights so: its parametrization vmapped; a reshaped one, flaxformer's and
    t5x's kernels stored flattened, is told by its size). ``any_axis=False``: the first axis
    only (NNX's stacks)."""
    if not site.candidate or kernel_shape is None:
        return site
    shape, expected = tuple(kernel_shape), site.kernel_variable_shape
    if site.batched and shape != expected:
        return dataclasses.replace(site, skip=(
            f"kernel {shape}: a batch of kernels {expected} stacked again by a lifted transform "
            f"(scan / vmap): left as it is"))
    if shape == expected or (site.parametrization is not None and  # reshaped by its code
                             np.prod(shape) == np.prod(expected)):
        return site
    axes = [a for a in range(len(shape) if any_axis else 1)
            if shape[:a] + shape[a + 1:] == expected or (  # (reshaped by its code: its size)
                site.parametrization is not None and
                np.prod(shape[:a] + shape[a + 1:]) == np.prod(expected))]
    if axes and (axes[0] == 0 or len(axes) == 1):  # (else two axes of its length, neither first)
        stacked = dataclasses.replace(site.restacked(shape[axes[0]]), stack_axis=axes[0],
                                      scanned=True)
        if site.parametrization is None:
            return stacked
        return dataclasses.replace(stacked, parametrization=functools.partial(
            _each_iteration, site.parametrization, axes[0]))
    if axes:
        return dataclasses.replace(site, skip=(
            f"kernel {shape} stacked by a lifted transform (scan / vmap) for a {expected} layer "
            f"on one of its axes {axes}, which their lengths cannot tell apart: left as it is"))
    return dataclasses.replace(site, skip=(
        f"kernel {shape} stacked over leading axes by a lifted transform (scan / vmap) for a "
        f"{expected} layer: stacked layers are left as they are"))


def _each_iteration(parametrization, axis: int, params: dict) -> dict:
    """A stacked layer's ``parametrization`` of each iteration's stored weights (``axis`` of
    every parameter of its scope: a lifted transform stacks them all), stacked there."""
    return jax.vmap(parametrization, in_axes=axis, out_axes=axis)(params)


def parametrization_key(parametrization) -> tuple:
    """What a parametrization computes, besides its weights' shapes: a
    ``functools.partial`` of a function on a layer (its type), or of that per iteration."""
    stacked = parametrization.func is _each_iteration
    inner = parametrization.args[0] if stacked else parametrization
    steps = getattr(inner.args[0], "steps", ())  # (a written layer's: what each computes)
    return stacked, inner.func, type(inner.args[0]), tuple(step.key for step in steps)


def device_array(x, dtype=None) -> jax.Array:
    """``x`` (a NumPy or JAX array) as a JAX array of ``dtype`` (default: its own), copied to
    the device by ``jax.device_put``. ``jnp.asarray`` on a NumPy array compiles an identity
    program per shape (JAX 0.10): about 25 ms each on CPU, which a surgery over dozens of
    kernel and factor shapes would pay on every first call."""
    if isinstance(x, jax.Array) and (dtype is None or x.dtype == dtype):
        return x
    return jax.device_put(np.asarray(x, dtype))


def einsum_site(path: str, input_shape, split: EinsumSplit, kernel_shape, use_bias: bool,
                **fields) -> ConvSite:
    """The site of an einsum layer split by ``split`` called on an input of ``input_shape``
    (``fields``: more :class:`ConvSite` fields); with a batch letter, the
    :meth:`ConvSite.restacked` site of its matrices (``batched``), costed as groups."""
    in_dims, out_dims = split.dims(kernel_shape)
    if not split.batch:
        return ConvSite(path, dense_shape(path, input_shape, in_dims, out_dims, use_bias),
                        dense_dims=(in_dims, out_dims), kernel_axes=split.kernel_axes, **fields)
    length = int(kernel_shape[split.batch_axis])
    lead = (1, *input_shape) if split.batch_input_axis == 0 else tuple(input_shape)
    shape = dense_shape(path, lead, (length, *in_dims), out_dims, use_bias)
    one = ConvSite(path, dataclasses.replace(shape, in_channels=math.prod(in_dims)),
                   dense_dims=(in_dims, out_dims), kernel_axes=split.kernel_axes, **fields)
    return dataclasses.replace(one.restacked(length), stack_axis=split.batch_axis, batched=True)


def dense_shape(path: str, input_shape, in_dims, out_dims, use_bias: bool) -> costs.ConvShape:
    """The conv geometry of a dense layer contracting ``in_dims`` of an input of
    ``input_shape`` (leading dim: the batch) into ``out_dims``: a 1x1 conv on ``rows x 1``."""
    c, n = math.prod(in_dims), math.prod(out_dims)
    rows = max(math.prod(int(d) for d in input_shape[1:]) // c, 1) if len(input_shape) > 1 else 1
    return costs.ConvShape(name=path, input_hw=(rows, 1), in_channels=c, out_channels=n,
                           kernel_size=(1, 1), padding="VALID", use_bias=use_bias,
                           images=int(input_shape[0]) if len(input_shape) > 1 else 1)


def with_param_casts(site: ConvSite, layer) -> ConvSite:
    """``site`` with :attr:`ConvSite.param_cast_flops` of one call (1 per parameter) when the
    layer (linen or NNX) computes in a dtype other than its parameters'."""
    dtype, param_dtype = getattr(layer, "dtype", None), getattr(layer, "param_dtype", None)
    if not site.candidate or dtype is None or param_dtype is None or \
            jnp.dtype(dtype) == jnp.dtype(param_dtype):
        return site
    return dataclasses.replace(site, param_cast_flops=1.0)


def path_of(keys) -> str:
    """Keys of a variable tree as a layer path, joined by ``/``; a ``/`` inside a key (a linen
    module named ``'conformer/stacked_layers_0'``, as google-deepmind/gemma's Gemma 4 audio
    encoder names one) is written ``\\/``, so that :func:`variable_key` reads it back."""
    return "/".join(str(k).replace("/", "\\/") for k in keys)


def variable_key(path: str) -> tuple[str, ...]:
    """A layer path as keys of a variable tree (``""``: the model is the layer itself; see
    :func:`path_of`)."""
    if not path:
        return ()
    return tuple(part.replace("\\/", "/") for part in re.split(r"(?<!\\)/", path))


def contracted_axes(layer) -> tuple[int, ...]:
    """The input axes a dense layer contracts (``axis``: ``nn.DenseGeneral``,
    ``nnx.LinearGeneral``; the last one otherwise)."""
    axis = getattr(layer, "axis", -1)
    return (axis,) if isinstance(axis, int) else tuple(axis)


def dense_rows(x: jax.Array, axes) -> jax.Array:
    """A dense layer's input as ``(M, 1, 1, C)``: the contracted ``axes`` (in order) moved last
    and flattened, every other position a row."""
    axes = tuple(a % x.ndim for a in ((axes,) if isinstance(axes, int) else axes))
    rest = [a for a in range(x.ndim) if a not in axes]
    c = math.prod(x.shape[a] for a in axes)
    return jnp.transpose(x, (*rest, *axes)).reshape(-1, 1, 1, c)


# the most patch entries an N-D conv's calibration materialises at once (1 GiB of float32)
ND_PATCH_ENTRIES = 1 << 28


def _nd_moments(x: jax.Array, geometry, layer: costs.ConvShape):
    """:func:`input_moments` of an N-D conv: its patches (:func:`nd_patches`) a slice of the
    examples at a time, so that no more than :data:`ND_PATCH_ENTRIES` exist at once (a video
    net's 3x3x3 conv on 16 frames of 56x56 has ~87 M entries per example at 64 channels)."""
    x = x.reshape((-1, *x.shape[-len(geometry[0]) - 1:]))
    rows = int(layer.output_hw[0]) * int(layer.input_hw[1])  # the vertical conv's outputs
    per_example = max(rows * layer.kernel_size[0] * layer.in_channels, 1)
    step = max(1, ND_PATCH_ENTRIES // per_example)
    sums, count = None, 0.0
    for start in range(0, x.shape[0], step):
        part = decompose.patch_moments(nd_patches(x[start:start + step], *vertical_geometry(
            geometry)), (1, 1), padding="VALID", groups=layer.groups)
        sums = part[0] if sums is None else sums + part[0]
        count = count + part[1]
    return sums, count


def input_moments(site: ConvSite, x: jax.Array, axes=-1) -> tuple[jax.Array, jax.Array]:
    """Sum and count of ``p p^T`` over the first factor's input patches of ``site`` in one call's
    input ``x`` (:func:`lrjax.decompose.patch_moments`): the statistic of calibrated factors.
    ``axes``: the contracted axes of a dense layer's input."""
    layer = site.shape
    if site.batched:  # each matrix a group: its rows' slices at the batch letter's axis
        batch = einsum_split(site.equation).batch_input_axis
        return decompose.patch_moments(dense_rows(x, (batch, *axes)), (1, 1), padding="VALID",
                                       groups=site.stack)
    if site.kind == "dense":
        return decompose.patch_moments(dense_rows(x, axes), (1, 1), padding="VALID")
    if site.nd_geometry is not None and layer.transposed:  # an N-D transposed conv: its
        window, steps, pads, dilation = site.nd_geometry  # vertical conv's patches on the input
        n = len(window)  # dilated along the leading dims, its explicit padding
        x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] * (x.ndim - n - 1) + [
            (0, 0, s - 1) for s in steps[:-1]] + [(0, 0, 0)] * 2)
        return _nd_moments(x, (window, (1,) * n, pads, dilation), layer)
    if site.nd_geometry is not None:  # its vertical conv's own patches, as (rows, 1, 1, C V'),
        return _nd_moments(x, site.nd_geometry, layer)  # a few examples at a time
    if site.conv_dims == 1:  # (..., L, C) as (..., L, 1, C); CAUSAL: padded before, as Flax does
        before = layer.input_hw[0] - x.shape[-2]
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(before, 0), (0, 0)])[..., None, :]
    x = x.reshape((-1, *x.shape[-3:]))
    if layer.transposed:  # the vertical conv reads the input dilated along its rows
        return transposed_patch_moments(x, layer.kernel_size[0], layer.strides[0],
                                        layer.conv_padding[0], layer.dilation[0])
    if site.kind == "1x1":  # the first 1x1 conv takes both strides: only those columns count
        x = x[:, :, ::layer.strides[1]]
    return decompose.patch_moments(x, layer.kernel_size, strides=layer.strides,
                                   padding=layer.padding, dilation=layer.dilation,
                                   groups=layer.groups)


def keep_read_elsewhere(found: dict[str, ConvSite], elsewhere: dict[str, str]) -> None:
    """Leave as they are, in ``found`` (``{path: site}``), the written products of modules that
    ran another method too (``elsewhere``: ``{module path: method}``): a tied embedding's
    ``attend`` reads the table its ``__call__`` multiplies by, which a pair would replace."""
    for path, site in found.items():
        module = path.rsplit("/", 1)[0] if site.named_by_kernel else path
        if site.written and site.candidate and module in elsewhere:
            found[path] = ConvSite(path, None, skip=(
                f"a product its module's own code computes, whose method "
                f"{elsewhere[module]!r} runs too and may read the same parameters (a tied "
                "embedding's attend): its own computation is kept"))
