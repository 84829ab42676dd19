"""Einsum equations as one matrix product: which letters an einsum layer contracts, which it
produces, and the two equations of its split (:class:`EinsumSplit`); the equation a layer is
called with, its ellipsis written out (:func:`called_equation`). Pure string algebra, below every
module that builds or costs a layer."""

from __future__ import annotations

import dataclasses

__all__ = ["EinsumSplit", "batch_position", "batched_dense_equation", "called_equation", "einsum_split",
           "contracted_axes"]


@dataclasses.dataclass(frozen=True)
class EinsumSplit:
    """An einsum ``lhs,rhs->out`` (``rhs`` the kernel) as one matrix product between its
    contracted letters and its kernel's output letters, split in two through a new letter; with
    a ``batch`` letter (in input, kernel and output: a batch of kernels, one matrix per index,
    a mixture of experts' ``'BSEM,EMH->BSEH'``) one such product per index, each split alike.

    Attributes:
      first, second: the two factors' equations (``lhs,C z->free z`` and ``free z,z O->out``;
        a batch letter in both factors' kernels, where it is in the layer's).
      contracted, produced: the kernel's contracted and output letters, in kernel order.
      kernel_axes: one matrix's kernel axes (the batch letter's left out) in
        ``(*contracted, *produced)`` order, or ``None`` if already so.
      input_axes: positions in ``lhs`` of the contracted letters, in kernel order.
      kernel: the kernel's letters (``rhs``).
      batch: the batch letter (``""``: none); batch_axis: its position in the kernel,
        batch_input_axis: in ``lhs`` (``None`` without one).
    """

    first: str
    second: str
    contracted: str
    produced: str
    kernel_axes: tuple[int, ...] | None
    input_axes: tuple[int, ...]
    kernel: str
    batch: str = ""
    batch_axis: int | None = None
    batch_input_axis: int | None = None

    def dims(self, kernel_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(contracted dims, produced dims)`` of a kernel of ``kernel_shape`` (one matrix's,
        with a batch letter)."""
        size = dict(zip(self.kernel, (int(d) for d in kernel_shape), strict=True))
        return (tuple(size[c] for c in self.contracted), tuple(size[c] for c in self.produced))

    def factor_shapes(self, kernel_shape, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The two factors' kernel shapes at ``rank`` (each matrix's rank, with a batch letter):
        ``(*contracted dims, K)`` and ``(K, *produced dims)``, the batch's length at
        :func:`batch_position` in each."""
        contracted, produced = self.dims(kernel_shape)
        first, second = (*contracted, rank), (rank, *produced)
        if not self.batch:
            return first, second
        length = (int(kernel_shape[self.batch_axis]),)
        return _with_batch(first, length, self.batch_axis), _with_batch(second, length,
                                                                         self.batch_axis)


def batch_position(axis: int, ndim: int) -> int:
    """Where a stack's (or a batch letter's) axis goes in a factor of ``ndim`` axes per slice:
    the layer's own kernel's position ``axis``, or last when the factor has fewer axes."""
    return min(axis, ndim)


def _with_batch(axes, batch, axis: int):
    """A factor's ``axes`` (letters or sizes) with ``batch`` inserted at :func:`batch_position`."""
    at = batch_position(axis, len(axes))
    return axes[:at] + batch + axes[at:]


def batched_dense_equation(ndim: int, axis, n_features: int) -> str | None:
    """The einsum a dense layer with one batch axis computes (linen's
    ``nn.DenseGeneral(batch_dims=(0,))``, NNX's ``nnx.LinearGeneral(batch_axis={0: B})``: one
    matrix per index of the input's first axis) on an input of ``ndim`` axes, contracting
    ``axis`` (an int or a sequence, negative counted from the end) into ``n_features`` output
    axes: ``abcd,acdef->abef`` for ``ndim=4, axis=(2, 3), n_features=2``. ``None`` when
    ``axis`` holds the batch axis (Flax refuses it)."""
    contracted = contracted_axes(ndim, axis)
    if 0 in contracted:
        return None
    letters = "".join(chr(ord("a") + i) for i in range(ndim + n_features))
    lhs, out = letters[:ndim], letters[ndim:]
    free = "".join(c for i, c in enumerate(lhs[1:], 1) if i not in contracted)
    return f"{lhs},a{''.join(lhs[i] for i in contracted)}{out}->a{free}{out}"


def contracted_axes(ndim: int, axis) -> list[int]:
    """A dense layer's contracted input axes, ``axis`` (an int or a sequence, negative counted
    from the end) of an input of ``ndim`` axes, non-negative and sorted."""
    return sorted({a % ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,))})


def einsum_split(equation: str) -> EinsumSplit | str:
    """The :class:`EinsumSplit` of an ``nn.Einsum`` / ``nnx.Einsum`` equation, or why it cannot
    be split (more than one letter shared by input, kernel and output; an ellipsis not
    written out (:func:`called_equation` does, for the input's rank); repeated letters; no
    contracted or no produced letter)."""
    text = equation.replace(" ", "")
    if "..." in text or "->" not in text or text.count(",") != 1:
        return f"einsum {equation!r}: only explicit two-operand equations without '...' split"
    operands, out = text.split("->")
    lhs, rhs = operands.split(",")
    if any(len(set(t)) != len(t) for t in (lhs, rhs, out)):
        return f"einsum {equation!r}: a repeated letter (a trace or diagonal)"
    batch = "".join(c for c in rhs if c in lhs and c in out)
    if len(batch) > 1:
        return (f"einsum {equation!r}: kernel letters {batch!r} are batch dims (one batch "
                f"letter splits, as a stack of kernels)")
    one = rhs.replace(batch, "") if batch else rhs  # one matrix's letters
    contracted = "".join(c for c in one if c in lhs)
    produced = "".join(c for c in one if c in out)
    if batch and not (contracted and produced):
        return (f"einsum {equation!r}: kernel letter {batch!r} is a batch dim and the rest "
                f"{one!r} is no matrix (no {'output' if contracted else 'input'} letter): "
                f"nothing to split")
    if not contracted or not produced or len(contracted) + len(produced) != len(one) or \
            any(c not in rhs and c not in out for c in lhs):
        return f"einsum {equation!r}: not one product of input axes into output axes"
    z = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA"
             if c not in text)
    free = "".join(c for c in lhs if c not in contracted)
    first, second = contracted + z, z + produced
    if batch:
        first, second = (_with_batch(f, batch, rhs.index(batch)) for f in (first, second))
    order = tuple(one.index(c) for c in contracted + produced)
    return EinsumSplit(f"{lhs},{first}->{free}{z}", f"{free}{z},{second}->{out}",
                       contracted, produced,
                       None if order == tuple(range(len(one))) else order,
                       tuple(lhs.index(c) for c in contracted), rhs, batch,
                       rhs.index(batch) if batch else None,
                       lhs.index(batch) if batch else None)


def called_equation(own: str | None, args, kwargs, ndim: int | None = None) -> str | None:
    """The equation an einsum layer (``nn.Einsum``, ``nnx.Einsum``) is called with: the call's
    (``args``: the arguments after the input; ``einsum_str=``), else its own ``own``; spaces
    removed. With the input's ``ndim``, an ellipsis over the input's leading axes
    (``'...d,dk->...k'``) is written out in letters of its own (``'abd,dk->abk'``) for that
    rank."""
    equation = (args[0] if args else kwargs.get("einsum_str")) or own
    if equation is None:
        return None
    equation = equation.replace(" ", "")
    return _without_ellipsis(equation, ndim) if ndim is not None else equation


def _without_ellipsis(equation: str, ndim: int) -> str:
    """``equation`` with its input's and output's ``...`` written out for an input of ``ndim``
    axes; as it is when the kernel has one, the output lacks it, or the rank does not fit."""
    if "->" not in equation or equation.count(",") != 1:
        return equation
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    if "..." not in lhs or "..." in rhs or out.count("...") != 1 or lhs.count("...") != 1:
        return equation
    count = ndim - (len(lhs) - 3)
    if count < 0:
        return equation
    spare = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
             if c not in equation][:count]
    if len(spare) < count:
        return equation
    axes = "".join(spare)
    return f"{lhs.replace('...', axes)},{rhs}->{out.replace('...', axes)}"
