"""Calibration statistics of the closed form: the second moment of a layer's vertical input
patches (:func:`patch_moments`) and the whitening it defines (:func:`whitening`); calibration
data checked (:func:`calibration_batches`).

Calibrated factors (:func:`lrjax.decompose.vh_decompose` with ``input_cov``) minimise a layer's
output error on data instead of its kernel error; these are the statistics they read. Pure and
jit-able; re-exported by :mod:`lrjax.decompose`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import costs, lapack

__all__ = ["patch_moments", "transposed_patch_moments", "whitening", "whitening_on_host",
           "regularized_on_host", "checked_cov",
           "calibration_batches", "static_argument", "static_argnums", "MAX_CALIBRATED_INPUT",
           "COV_EPS", "ridge", "calibrated_paths", "uncalibrated_note", "undersampled_note",
           "RunSums"]

# the whitening's ridge: eps * tr(S) / m is added to a patch covariance S's diagonal
COV_EPS = 1e-3

# Calibration leaves out layers whose first factor reads more values than this per sample
# (VGG-16's fc6: 25088): their input covariance would be m x m (2.5 GB for fc6) and its
# factorization O(m^3), for a statistic that a few hundred samples barely constrain (a dense
# layer gets one sample per example); they keep the data-free closed form, and the report says so
MAX_CALIBRATED_INPUT = 8192


def checked_cov(input_cov, groups: int, size: int | None) -> jax.Array:
    """``input_cov`` as ``(groups, m, m)`` (a JAX array or tracer stays one, anything else
    becomes a NumPy array); ``ValueError`` naming a wrong shape, or NaN/Inf values in a concrete
    one."""
    cov = input_cov if isinstance(input_cov, jax.Array) else np.asarray(input_cov)
    if cov.ndim == 2:
        cov = cov[None]
    m = cov.shape[-1]
    if cov.ndim != 3 or cov.shape != (groups, m, m) or (size is not None and m != size):
        want = f"({groups}, {size}, {size})" if size is not None else f"({groups}, m, m)"
        raise ValueError(f"input_cov must have shape {want} (groups, C_g * kh, C_g * kh); got "
                         f"{tuple(np.shape(input_cov))}")
    if not isinstance(cov, jax.core.Tracer) and not np.isfinite(np.asarray(cov)).all():
        raise ValueError(f"input_cov of shape {tuple(cov.shape)} contains NaN/Inf values")
    return cov


def whitening(input_cov: jax.Array, *, groups: int = 1, size: int | None = None,
              eps: float = COV_EPS) -> tuple[jax.Array, jax.Array]:
    """``(S^{1/2}, S^{-1/2})`` of a regularised patch covariance, ``(groups, m, m)`` each.

    ``S`` is ``input_cov + eps * tr(input_cov) / m * I`` (symmetrised), computed by an eigen-solve
    in the covariance's dtype (pass float64 with ``jax_enable_x64`` for the most accuracy).
    """
    cov = checked_cov(input_cov, groups, size)
    m = cov.shape[-1]
    if not jnp.issubdtype(cov.dtype, jnp.floating):
        cov = cov.astype(jnp.float32)
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    scale = jnp.trace(cov, axis1=-2, axis2=-1) / m
    scale = jnp.where(scale > 0, scale, 1.0)
    cov = cov + (eps * scale)[:, None, None] * jnp.eye(m, dtype=cov.dtype)
    evals, evecs = jnp.linalg.eigh(cov)
    floor = (eps * scale)[:, None]
    evals = jnp.maximum(evals, floor)  # eigh of an ill-conditioned matrix: clip rounding below eps
    hi = jax.lax.Precision.HIGHEST
    root = jnp.matmul(evecs * jnp.sqrt(evals)[:, None, :], jnp.swapaxes(evecs, -1, -2),
                      precision=hi)
    inv_root = jnp.matmul(evecs / jnp.sqrt(evals)[:, None, :], jnp.swapaxes(evecs, -1, -2),
                          precision=hi)
    return root, inv_root


def _regularized(input_cov, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """A checked ``(groups, m, m)`` covariance symmetrised with the ridge of :func:`whitening`
    added, in NumPy (its dtype, at least float32), and ``tr(S) / m`` per group."""
    cov = np.asarray(input_cov)  # its dtype, at least float32 (callers pass JAX's working one)
    cov = cov.astype(np.promote_types(cov.dtype, np.float32), copy=False)
    m = cov.shape[-1]
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    scale = ridge(cov, eps=1.0).astype(cov.dtype)
    return cov + (eps * scale)[:, None, None] * np.eye(m, dtype=cov.dtype), scale


def ridge(input_cov, *, eps: float = COV_EPS) -> np.ndarray:
    """``eps * tr(S) / m`` of each group of a ``(groups, m, m)`` (or ``(m, m)``) covariance
    (``eps`` where the trace is not positive): the ridge :func:`whitening` adds to it."""
    cov = np.asarray(input_cov)
    scale = np.trace(cov, axis1=-2, axis2=-1) / cov.shape[-1]
    return eps * np.where(scale > 0, scale, 1.0)


def regularized_on_host(input_cov, *, eps: float = COV_EPS) -> np.ndarray:
    """The regularised covariance ``S`` of :func:`whitening` of a checked ``(groups, m, m)`` one,
    in NumPy: what a layer's calibrated factors need where its matrix is taller than wide (the
    right singular vectors of ``R M`` are the eigenvectors of ``M^T S M``; no root)."""
    return _regularized(input_cov, eps)[0]


def whitening_on_host(input_cov, *, eps: float = COV_EPS) -> tuple[np.ndarray, np.ndarray]:
    """A whitening ``(R, R^{-1})`` with ``R^T R = S`` of a checked ``(groups, m, m)`` covariance,
    ``S`` regularised as in :func:`whitening`, in NumPy by LAPACK on this thread
    (:mod:`lrjax.lapack`; no compile): the CPU route of
    :func:`lrjax.decompose.spectra_and_factors`.

    ``R`` is the Cholesky factor (computed in float64), not the symmetric root: any ``R`` with
    ``R^T R = S`` gives the same calibrated factors and spectrum (``||R Z|| = ||S^{1/2} Z||``
    for every ``Z``, so ``R (W - W_K)`` is minimised by the same ``W_K``), for a quarter of an
    eigen-solve's time. A covariance that is not numerically positive definite gets the
    symmetric root of :func:`whitening` (eigenvalues below ``eps`` clipped)."""
    cov, scale = _regularized(input_cov, eps)
    roots = []
    for group, floor in zip(cov, eps * scale, strict=True):
        try:
            root = lapack.cholesky_root(np.array(group, np.float64, order="C"))
            roots.append(tuple(r.astype(cov.dtype) for r in root))
        except np.linalg.LinAlgError:
            evals, evecs = lapack.eigh(np.ascontiguousarray(group))
            evals = np.sqrt(np.maximum(evals, floor))  # as whitening(): rounding below eps
            roots.append(((evecs * evals) @ evecs.T, (evecs / evals) @ evecs.T))
    return tuple(np.stack(parts) for parts in zip(*roots, strict=True))


def patch_moments(x: jax.Array, kernel_size, *, strides=1, padding="SAME", dilation=1,
                  groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Sum of ``p p^T`` over the vertical input patches of a conv's input, and their count.

    The vertical conv of a pair sees, at each (output row, input column), the ``kh`` input rows
    it covers: the patch ``p[(c, i)] = x_padded[n, h * sh + i * dh, w, c]``, ordered like the rows
    of :func:`lrjax.decompose.kernel_to_matrices`. This is the statistic of the
    calibration-aware factors (:func:`lrjax.decompose.vh_decompose`'s ``input_cov`` is
    ``sums / count``). Computed as ``kh^2`` channel products of shifted row views, without
    materialising the patches. Pure and jit-able.

    Args:
      x: the conv's input ``(N, H, W, C)`` (NHWC).
      kernel_size, strides, padding, dilation: the conv's (``nn.Conv`` forms; ``CIRCULAR`` and
        ``REFLECT`` pad the rows as ``nn.Conv`` does).
      groups: feature group count.

    Returns:
      ``(sums (groups, C_g * kh, C_g * kh) float32, count)``.
    """
    if x.ndim != 4:
        raise ValueError(f"patch_moments needs an NHWC input; got shape {x.shape}")
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    sh = strides if isinstance(strides, int) else tuple(strides)[0]
    dh = dilation if isinstance(dilation, int) else tuple(dilation)[0]
    n, h, w, c = x.shape
    if c % groups:
        raise ValueError(f"input channels {c} (shape {x.shape}) are not divisible by "
                         f"groups={groups}")
    x = x.astype(jnp.float32)
    mode = padding.upper() if isinstance(padding, str) else None
    if mode in ("CIRCULAR", "REFLECT"):
        span = (kh - 1) * dh + 1
        x = jnp.pad(x, ((0, 0), ((span - 1) // 2, span // 2), (0, 0), (0, 0)),
                    mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[mode])
    else:
        (top, bottom), _ = costs.explicit_padding(padding, (h, w), (kh, kw), (sh, 1), (dh, 1))
        x = jnp.pad(x, ((0, 0), (top, bottom), (0, 0), (0, 0)))
    rows = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
    if rows < 1:
        raise ValueError(f"input of shape {(n, h, w, c)} is too small for kernel {kernel_size}")
    cg = c // groups
    views = [jax.lax.slice_in_dim(x, i * dh, i * dh + (rows - 1) * sh + 1, sh, axis=1)
             .reshape(-1, groups, cg) for i in range(kh)]
    hi = jax.lax.Precision.HIGHEST
    count = jnp.asarray(views[0].shape[0], jnp.float32)
    if kh > TAP_PRODUCTS_UP_TO:  # the patches themselves, a block of rows at a time
        return _materialised(views, groups, cg * kh, hi), count
    blocks = [[jnp.einsum("rgc,rgd->gcd", views[i], views[j], precision=hi) for j in range(kh)]
              for i in range(kh)]
    # blocks[i][j][g, c, d] -> (g, c, i, d, j): rows (c, i), columns (d, j)
    sums = jnp.stack([jnp.stack(row, axis=-1) for row in blocks], axis=2)
    sums = sums.reshape(groups, cg * kh, cg * kh)
    return sums, count


# the tallest window whose patch moments are summed as kh^2 products of row views (a compile
# time growing as kh^2: a 1-D conv of 128 taps, a learned audio filterbank, took minutes);
# taller ones materialise their patches, at most PATCH_ROWS_ENTRIES values at once
TAP_PRODUCTS_UP_TO = 8
PATCH_ROWS_ENTRIES = 1 << 26


def _materialised(views, groups: int, width: int, precision) -> jax.Array:
    """``sum p p^T`` per group of the patches ``p[(c, i)] = views[i][r, g, c]``, built a block
    of rows at a time."""
    total, step = views[0].shape[0], max(1, PATCH_ROWS_ENTRIES // max(groups * width, 1))
    sums = jnp.zeros((groups, width, width), jnp.float32)
    for start in range(0, total, step):
        patches = jnp.stack([v[start:start + step] for v in views], axis=-1)  # (r, g, c, i)
        patches = patches.reshape(patches.shape[0], groups, width)
        sums = sums + jnp.einsum("rgp,rgq->gpq", patches, patches, precision=precision)
    return sums


def transposed_patch_moments(x: jax.Array, kh: int, stride: int, padding: tuple[int, int],
                             dilation: int = 1) -> tuple[jax.Array, jax.Array]:
    """:func:`patch_moments` of a transposed conv's vertical factor: its ``kh x 1`` patches of
    the input dilated along rows by ``stride`` (``stride - 1`` zeros between rows) and padded by
    ``padding`` ``(top, bottom)``, without the zeros. An output row ``r`` reads input data only
    at the taps ``i`` with ``(r - top + i * dilation) % stride == 0``: the rows of one residue
    of ``r - top`` share those taps, which read consecutive rows of the undilated input; each
    residue's block of the moments is their product (the other blocks are zero). About
    ``stride^2`` times less work than the dilated input's patches (a 128-tap, stride-32
    learned audio synthesis filterbank: ~1000x). Pure and jit-able.

    Args:
      x: the transposed conv's input ``(N, H, W, C)`` (not dilated).

    Returns:
      ``(sums (1, C * kh, C * kh) float32, count)``, rows ``(c, i)`` as :func:`patch_moments`.
    """
    n, length, w, c = x.shape
    top, bottom = (int(p) for p in padding)
    rows = (length - 1) * stride + 1 + top + bottom - (kh - 1) * dilation
    if rows < 1:
        raise ValueError(f"input of shape {x.shape} dilated by {stride} is too small for "
                         f"kernel {kh}")
    x = x.astype(jnp.float32)
    sums = jnp.zeros((kh, kh, c, c), jnp.float32)  # (i, j, c, d)
    for residue in range(stride):
        taps = [i for i in range(kh) if (residue + i * dilation) % stride == 0]
        first = (residue + top) % stride  # the first output row of this residue
        if not taps or first >= rows:
            continue
        steps = (rows - 1 - first) // stride + 1
        starts = [(first - top + i * dilation) // stride for i in taps]  # undilated rows
        before, after = max(0, -min(starts)), max(0, max(starts) + steps - length)
        padded = jnp.pad(x, ((0, 0), (before, after), (0, 0), (0, 0)))
        patches = jnp.stack([padded[:, a + before:a + before + steps].reshape(-1, c)
                             for a in starts], axis=-1)  # (rows, c, taps)
        block = jnp.einsum("rci,rdj->ijcd", patches, patches,
                           precision=jax.lax.Precision.HIGHEST)
        sums = sums.at[np.ix_(taps, taps)].add(block)  # its taps' rows and columns
    sums = jnp.transpose(sums, (2, 0, 3, 1))  # (c, i, d, j)
    return sums.reshape(1, c * kh, c * kh), jnp.asarray(n * w * rows, jnp.float32)


class KeywordInputs(dict):
    """The keyword inputs of a calibration batch (a call such as Flax's nlp_seq example's
    ``model.apply(v, inputs=x, train=False)``): the last of the batch's positional arguments,
    traced with them; :func:`split_keywords` takes it off for the call."""


jax.tree_util.register_pytree_with_keys(
    KeywordInputs,
    lambda d: ([(jax.tree_util.DictKey(k), d[k]) for k in sorted(d)], tuple(sorted(d))),
    lambda keys, values: KeywordInputs(zip(keys, values, strict=True)))


def keyword_inputs(example_kwargs) -> dict:
    """The keyword arguments of an example call that are inputs: arrays (or pytrees of arrays)
    with a leading (batch) axis, not keys."""
    def batched(value):
        leaves = jax.tree.leaves(value)
        return bool(leaves) and all(
            isinstance(a, (jax.Array, np.ndarray)) and np.ndim(a) >= 1
            and not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) for a in leaves)

    return {k: v for k, v in (example_kwargs or {}).items() if k != "rngs" and batched(v)}


def split_keywords(args: tuple, kwargs: Mapping | None = None) -> tuple[tuple, dict]:
    """A calibration batch's positional arguments and the call's keyword arguments
    (``kwargs``, with the batch's :class:`KeywordInputs` in place of the example's)."""
    if args and isinstance(args[-1], KeywordInputs):
        return tuple(args[:-1]), {**(kwargs or {}), **args[-1]}
    return tuple(args), dict(kwargs or {})


def calibration_batches(calibration, example_args: tuple | None = None,
                        example_kwargs: Mapping | None = None) -> list[tuple]:
    """Calibration data as a list of positional-argument tuples, checked.

    Args:
      calibration: one batch of model inputs (an array, a dict for a model that takes one, or a
        tuple of positional arguments, or the one argument of a model that takes a tuple or a
        pytree of its own, such as a dataclass of arrays), or an
        iterable (a list, a generator) of such batches. For a call whose inputs are keyword
        arguments (``example_kwargs`` holding arrays: ``model.apply(v, inputs=x, train=False)``)
        a batch gives them as a dict ``{"inputs": x}`` (after its positional arrays, if any,
        as the tuple's last item), or as the array alone where there is one and no positional
        array; they come back as a :class:`KeywordInputs`, the tuple's last item.
      example_args: the model's example call's positional arguments: each batch must give as
        many, each with the same structure and the same shapes but for the leading (batch)
        dim; or only its arrays, when the call also takes static values (``model.apply(v, x,
        False)``: batches of ``x`` alone), which are then the example's.
      example_kwargs: the example call's keyword arguments.

    Raises:
      ValueError: no batch, a batch with NaN/Inf values (naming its index and shape), or a
        batch that does not fit ``example_args`` (naming both).
    """
    one = (jax.Array, np.ndarray, tuple, Mapping)  # (or a pytree of the user's, not iterable:
    batches = [calibration] if isinstance(calibration, one) or not isinstance(  # openpi's
        calibration, Iterable) else list(calibration)  # Observation dataclass)
    if not batches:
        raise ValueError("calibration is empty: give a batch or an iterable of batches")
    keyword = keyword_inputs(example_kwargs)
    example = example_args
    if keyword and example_args is not None:
        example = (*example_args, KeywordInputs(keyword))
    out = []
    for i, batch in enumerate(batches):
        given = batch if isinstance(batch, tuple) else (batch,)  # (as messages show it)
        if keyword:
            batch = _keyword_batch(batch, keyword, example_args or ())
        args = _with_static(batch if isinstance(batch, tuple) else (batch,), example)
        if isinstance(batch, tuple) and example is not None and \
                _layout(args) != _layout(example) and \
                _layout((batch,)) == _layout(example):  # the model's one argument is a tuple
            args = (batch,)  # (NaFlex's (patches, types, rows, columns))
        for a in jax.tree.leaves(args):
            if isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.inexact) \
                    and not np.isfinite(np.asarray(a)).all():
                raise ValueError(f"calibration batch {i} (shape {np.shape(a)}) contains NaN/Inf "
                                 "values")
        if example is not None and _layout(args) != _layout(example):
            raise ValueError(
                f"calibration batch {i} is {_describe(given)}; the model's example call takes "
                f"{_describe(example)} (give each batch as the model's positional "
                "arguments, a tuple when there are several; any batch size"
                + (f"; its keyword inputs as a dict, {{{', '.join(map(repr, keyword))}: ...}}"
                   if keyword else "") + ")")
        out.append(args)
    return out


def _keyword_batch(batch, keyword: Mapping, example_args: tuple):
    """A batch for a call with keyword inputs, its keyword part made a :class:`KeywordInputs`:
    a dict of them (alone, or a tuple's last item), or one array standing for the one keyword
    input of a call without positional arrays."""
    if isinstance(batch, Mapping) and set(batch) == set(keyword):
        return (KeywordInputs(batch),)
    if isinstance(batch, tuple) and batch and isinstance(batch[-1], Mapping) and \
            set(batch[-1]) == set(keyword):
        return (*batch[:-1], KeywordInputs(batch[-1]))
    if len(keyword) == 1 and all(static_argument(a) for a in example_args) and \
            isinstance(batch, (jax.Array, np.ndarray)):
        return (KeywordInputs({next(iter(keyword)): batch}),)
    return batch


def static_argument(arg) -> bool:
    """A positional argument holding no array (``False``, ``"eval"``, ``None``)."""
    return not any(hasattr(leaf, "shape") for leaf in jax.tree.leaves(arg))


def static_argnums(batches, offset: int = 1) -> tuple[int, ...]:
    """``jax.jit``'s ``static_argnums`` for calls ``fn(first, *batch)`` on these calibration
    batches (``offset`` arguments before the batch's): the flag in ``model.apply(v, x, False)``
    that the model branches on, not traced."""
    return tuple(offset + i for i, a in enumerate(batches[0]) if static_argument(a)) \
        if batches else ()


def _with_static(args: tuple, example_args: tuple | None) -> tuple:
    """A batch of the example call's arrays only, with its static arguments put back."""
    if example_args is None or len(args) == len(example_args):
        return args
    static = [static_argument(a) for a in example_args]
    if not any(static) or len(args) != static.count(False):
        return args
    given = iter(args)
    return tuple(a if s else next(given) for a, s in zip(example_args, static, strict=True))


def _layout(args: tuple):
    """Structure and per-example shapes of positional arguments (arrays' leading dim dropped)."""
    leaves, tree = jax.tree.flatten(args)
    return tree, [tuple(np.shape(a)[1:]) if np.ndim(a) else None for a in leaves]


def _describe(args: tuple) -> str:
    shapes = jax.tree.map(_shown, args, is_leaf=lambda a: not isinstance(a, (tuple, list, dict)))
    return f"{len(args)} positional argument(s) {shapes}"


def _shown(a):
    """An argument as messages show it: an array by its shape, a container by its parts, any
    other value as it prints, by its type's name when that runs long (an NNX ``Rngs``)."""
    if isinstance(a, (jax.Array, np.ndarray)):
        return tuple(a.shape) if a.ndim else a
    return a if len(repr(a)) <= 60 else _Named(type(a).__name__)


class _Named(str):
    def __repr__(self):
        return str(self)


def calibrated_paths(candidates) -> tuple[list[str], str | None]:
    """The paths of the candidate sites (:class:`lrjax.sites.ConvSite`) to calibrate: those
    whose first factor's input (``C_g * kh`` values: a dense layer's input width; one
    iteration's for a stacked layer, each calibrated on its own inputs) is at most
    :data:`MAX_CALIBRATED_INPUT`; and a report note naming the others (``None`` if none)."""
    width = {s.path: s.shape.kernel_shape[2] * s.shape.kernel_shape[0] for s in candidates}
    wide = [f"{p} ({m})" for p, m in width.items() if m > MAX_CALIBRATED_INPUT]
    note = (f"data-free factors for layers whose inputs are wider than {MAX_CALIBRATED_INPUT} "
            f"values (no input covariance: {', '.join(wide)})") if wide else None
    return [p for p, m in width.items() if m <= MAX_CALIBRATED_INPUT], note


def uncalibrated_note(note: str | None, paths, covs) -> str | None:
    """``note`` (from :func:`calibrated_paths`) with the ``paths`` calibration never reached
    (no statistics in ``covs``: they keep the data-free factors) named too."""
    missing = sorted(set(paths) - set(covs))
    if not missing:
        return note
    return "; ".join(filter(None, (note, f"{missing}: data-free factors (calibration never "
                                         "ran them)")))


def undersampled_note(counts: Mapping, candidates) -> str | None:
    """A report note naming the calibrated layers that saw fewer input vectors (``counts``:
    ``{path: vectors}``, per iteration for a stacked layer) than their first factor has inputs
    (``C_g * kh``): a dense layer on per-example vectors (a DiT's conditioning) calibrated on a
    few examples. Their factors fit the directions the data spans; the others are kept only
    through the small regulariser (:func:`ridge`). ``None`` if none."""
    width = {s.path: s.shape.kernel_shape[2] * s.shape.kernel_shape[0] for s in candidates}
    few = [f"{p} ({int(np.min(n))} for {width[p]})" for p, n in counts.items()
           if p in width and np.min(n) < width[p]]
    if not few:
        return None
    shown = ", ".join(few[:4]) + (f" and {len(few) - 4} more" if len(few) > 4 else "")
    return (f"calibrated on fewer input vectors than inputs (directions the calibration data "
            f"does not span are kept only through a small regulariser: give more examples): "
            f"{shown}")


class RunSums:
    """Host-side sums of calibration moments handed out of loops, one call per run of a layer
    (``jax.debug.callback(sums.add, path, s, n, key, ndim)``): every run of a layer summed, and
    a stacked layer's runs (its kernel variable has the iterations first) summed per iteration,
    the iteration found from the first :data:`KEY` values of the kernel slice that ran (in call
    order where those are ambiguous).

    Args:
      kernels: ``{path: stored kernel variable}`` (a stacked one with the iterations first).
    """

    KEY = 8  # values of a kernel slice that identify which iteration of a stack ran

    def __init__(self, kernels: Mapping[str, np.ndarray]):
        self._kernels = {p: np.asarray(k) for p, k in kernels.items()}
        self._sums, self._counts, self._runs = {}, {}, {}

    @classmethod
    def key(cls, kernel) -> tuple:
        """``(key, ndim)`` of the kernel slice a run reads (``ndim`` 0: none, one slot)."""
        if kernel is None:
            return np.zeros(1, np.float32), 0
        return kernel.ravel()[:cls.KEY], kernel.ndim

    def add(self, path, s, n, key, ndim) -> None:
        """One run's moments ``(s, n)`` (:func:`lrjax.sites.input_moments`) of layer ``path``."""
        s, kernel = np.asarray(s, np.float64), self._kernels.get(path)
        slots = 1 if kernel is None or int(ndim) in (0, kernel.ndim) else kernel.shape[0]
        slot = 0
        if slots > 1:
            gaps = np.abs(kernel.reshape(slots, -1)[:, :self.KEY] - np.asarray(key)).sum(1)
            slot = int(np.argmin(gaps)) if np.sum(gaps == gaps.min()) == 1 else \
                self._runs.get(path, 0) % slots
            self._runs[path] = self._runs.get(path, 0) + 1
        g = s.shape[0]
        total = self._sums.setdefault(path, np.zeros((slots * g, *s.shape[1:])))
        total[slot * g:(slot + 1) * g] += s
        self._counts.setdefault(path, np.zeros(slots))[slot] += float(n)

    def counts(self) -> dict[str, float]:
        """``{path: input vectors}`` each layer's runs gave (a stacked layer's: the fewest of
        any of its iterations)."""
        return {path: float(np.min(count)) for path, count in self._counts.items()}

    def totals(self) -> dict[str, tuple[np.ndarray, float]]:
        """``{path: (second moments times input vectors, input vectors)}`` (:meth:`covariances`,
        :meth:`counts`), as a pass of one run per layer sums them."""
        counts = self.counts()
        return {path: (cov * counts[path], counts[path])
                for path, cov in self.covariances().items()}

    def covariances(self) -> dict[str, np.ndarray]:
        """``{path: (groups, m, m)}`` second moments of the layers every slot of which ran."""
        out = {}
        for path, total in self._sums.items():
            count = self._counts[path]
            if np.all(count > 0):
                out[path] = total / np.repeat(count, total.shape[0] // len(count))[:, None, None]
        return out

