"""Exact low-rank vertical/horizontal decomposition of conv kernels (Tai et al. 2016, Thm. 1).

All kernels use Flax's HWIO layout: ``(kh, kw, C // groups, N)``. A ``kh x kw`` conv is replaced by

* a *vertical* conv, kernel ``(kh, 1, C // groups, K)``, no bias, and
* a *horizontal* conv, kernel ``(1, kw, K // groups, N)``, carrying the original bias,

both with ``feature_group_count=groups``. ``K`` (``rank``) is the total number of intermediate
channels, ``K // groups`` per group, as in the authors' configs.

For each group the kernel is reshaped to the ``(C_g * kh) x (kw * N_g)`` matrix
``M[(c, i), (j, n)] = W[i, j, c, n]``; its truncated SVD ``U diag(s) Q^T`` gives the optimal factors
``V = U_K sqrt(s_K)`` and ``H = Q_K sqrt(s_K)`` (Eckart-Young): the error
``||W - W_K||_F = sqrt(sum_{k > K} s_k^2)`` is the smallest any such pair can reach.

Every function here but the many-layer drivers (``decompose_net``, ``spectra_and_factors``) and
the host-side ``factor_errors`` is pure and jit-able with ``rank``/``groups``/``method`` static.
Shape checks run at trace time; the NaN/Inf check runs only where the kernel's values are
concrete. On the CPU backend the drivers compute the same closed form on host threads with
LAPACK (:mod:`lrjax.lapack`), without compiling; elsewhere they run the jitted functions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import lapack, moments
from lrjax.costs import check_kernel_shape, check_rank, max_rank
from lrjax.moments import COV_EPS, checked_cov, patch_moments, whitening, whitening_on_host

__all__ = [
    "factor_errors", "spectrum_and_factors", "spectra_and_factors", "Factors", "max_rank",
    "kernel_to_matrices", "vh_decompose", "patch_moments", "whitening", "truncate",
    "weighted_relative_error", "decompose_net", "reconstruct", "singular_values", "relative_errors",
    "relative_error", "fold_batch_norm",
]

# Below this many rows of the smaller Gram side, a plain SVD is as fast as the Gram route.
_GRAM_MIN_DIM = 256

# The jitted decompositions are solver and GEMM calls plus reshapes and scalings: XLA's backend
# optimisation passes buy them nothing at run time and cost about a third of their compile time
# on CPU (a first decomposition of VGG-16, 13 programs, 2.95 s -> 2.6 s in a fresh process).
_DECOMPOSE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class Factors(NamedTuple):
    """The two kernels of a vertical/horizontal pair (HWIO)."""

    vertical: jax.Array  # (kh, 1, C // groups, K)
    horizontal: jax.Array  # (1, kw, K // groups, N)


def _check_kernel(kernel, groups: int) -> tuple[int, int, int, int]:
    """Validate shape (always) and values (when concrete); returns ``(kh, kw, C_g, N)``."""
    shape = check_kernel_shape(np.shape(kernel), groups)
    if not isinstance(kernel, jax.core.Tracer):
        values = np.asarray(kernel)
        finite = np.isfinite(values)
        if not finite.all():
            raise ValueError(
                f"kernel of shape {shape} contains {finite.size - finite.sum()} NaN/Inf value(s)"
            )
    return shape


def kernel_to_matrices(kernel: jax.Array, *, groups: int = 1) -> jax.Array:
    """Reshape an HWIO kernel to the paper's per-group matrices.

    Args:
      kernel: ``(kh, kw, C_g, N)``.
      groups: feature group count.

    Returns:
      ``(groups, C_g * kh, kw * N_g)`` with entry ``[g, (c, i), (j, n)] = W[i, j, c, g * N_g + n]``.
    """
    _check_kernel(kernel, groups)
    return _to_matrices(jnp.asarray(kernel), groups)


def _to_matrices(kernel, groups):
    """:func:`kernel_to_matrices` by array methods: a NumPy kernel gives NumPy matrices."""
    kh, kw, cg, n = np.shape(kernel)
    ng = n // groups
    w = kernel.reshape(kh, kw, cg, groups, ng).transpose(3, 2, 0, 1, 4)  # (g, c, i, j, n)
    return w.reshape(groups, cg * kh, kw * ng)


def _resolve_method(method: str, m: int, n: int) -> str:
    if method == "auto":
        return "gram" if min(m, n) >= _GRAM_MIN_DIM else "svd"
    if method not in ("svd", "gram"):
        raise ValueError(f"method must be 'auto', 'svd' or 'gram'; got {method!r}")
    return method


def _truncated_factors(mats: jax.Array, k: int, method: str) -> tuple[jax.Array, jax.Array]:
    """Top-k left factors ``A`` (g, m, k) and right factors ``B`` (g, n, k) with ``A B^T = M_k``.

    Each column pair is scaled by ``sqrt(s)`` so that the singular value is split equally.
    """
    a, b, _ = _factors_and_values(mats, k, method)
    return a, b


def _factors_and_values(mats: jax.Array, k: int, method: str):
    """:func:`_truncated_factors` and every singular value ``(g, min(m, n))``, descending."""
    m, n = mats.shape[-2:]
    if _resolve_method(method, m, n) == "svd":
        u, s, vt = jnp.linalg.svd(mats, full_matrices=False)
        root = jnp.sqrt(s[..., :k])
        a = u[..., :, :k] * root[..., None, :]
        b = jnp.swapaxes(vt[..., :k, :], -1, -2) * root[..., None, :]
        return a, b, s
    # Eigen-solve of the smaller Gram matrix: M M^T = U diag(s^2) U^T. The factors are written as a
    # projection, A B^T = U_k U_k^T M, so the product is exact even where s is tiny.
    transpose = m > n
    x = jnp.swapaxes(mats, -1, -2) if transpose else mats
    hi = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=hi)
    evals, evecs = jnp.linalg.eigh(gram)  # ascending
    u = evecs[..., :, ::-1][..., :, :k]
    values = jnp.sqrt(jnp.clip(evals[..., ::-1], 0.0, None))
    s = values[..., :k]
    proj = jnp.matmul(jnp.swapaxes(x, -1, -2), u, precision=hi)  # (.., other, k) = Q_k s_k
    tiny = jnp.finfo(s.dtype).tiny ** 0.5
    root = jnp.where(s > tiny, jnp.sqrt(s), 1.0)
    left = u * root[..., None, :]
    right = proj / root[..., None, :]
    return ((right, left) if transpose else (left, right)) + (values,)


def _host_factors_and_values(mats: np.ndarray, k: int, method: str, values: bool = True,
                             vectors: bool = True, roots: np.ndarray | None = None,
                             covs: np.ndarray | None = None):
    """:func:`_factors_and_values` of NumPy matrices (whitened, ``roots @ mats``, if given) by
    LAPACK on this thread (:mod:`lrjax.lapack`): no compile, the GIL released (the CPU route of
    :func:`decompose_net`, :func:`spectra_and_factors`). Without ``values`` (``None`` returned)
    and for ``k`` up to 0.3 of the Gram matrix's size, only the top ``k`` eigenpairs are solved
    (``syevr``); without ``vectors``, only the singular values (LAPACK's two-stage solver). A
    wide ``R M`` is never formed: its Gram matrix is ``R (M M^T) R^T``, its right factor
    ``M^T (R^T U)`` (a VGG classifier conv, 3584 x 28672: half the time). A tall one needs no
    root: given ``covs`` (``S = R^T R``), its Gram matrix is ``M^T S M`` and the factors
    ``M V_K``, ``V_K`` are the calibrated ones, unwhitened (a 7744 -> 512 dense layer: no
    7744^3 Cholesky factorization and inverse)."""
    m, n = mats.shape[-2:]
    method = "gram" if covs is not None else _resolve_method(method, m, n)
    mats = mats.astype(np.promote_types(mats.dtype, np.float32), copy=False)
    if roots is not None and (method == "svd" or m > n):
        mats, roots = np.matmul(roots, mats.astype(roots.dtype)), None

    def gram(x, g):  # of the (whitened) matrix, on its smaller side; x @ x.T is a BLAS syrk
        if m > n:
            return x.T @ x if covs is None else x.T @ (covs[g] @ x.astype(covs.dtype))
        return x @ x.T if roots is None else (roots[g] @ (x @ x.T).astype(roots.dtype)) @ roots[g].T

    if not vectors:
        if method == "svd":
            return None, None, np.stack([np.linalg.svd(x, compute_uv=False) for x in mats])
        return None, None, np.stack([np.sqrt(np.clip(lapack.eigvalsh(gram(x, g))[::-1], 0.0, None))
                                     for g, x in enumerate(mats)])
    out = []
    for g, x in enumerate(mats):  # one group at a time: 2-D products
        if method == "svd":
            u, s, vt = np.linalg.svd(x, full_matrices=False)
            root = np.sqrt(s[:k])
            out.append((u[:, :k] * root, vt[:k].T * root, s))
            continue
        transpose = m > n
        square = np.ascontiguousarray(gram(x, g))  # a new array, which the solver overwrites
        x = x.T if transpose else x
        # top k only up to 0.3 of the size: syevr's partial solve beats syevd's whole one up to
        # there (m = 4608: 4.6 s at m/4, 8.6 s at m/2, 6.2 s for all; vectors less orthogonal)
        top = not values and 10 * k <= 3 * square.shape[0]
        evals, evecs = lapack.eigh_top(square, k) if top else lapack.eigh(square)  # ascending
        u = np.ascontiguousarray(evecs[:, ::-1][:, :k])
        s_all = np.sqrt(np.clip(evals[::-1], 0.0, None))
        s = s_all[:k]
        tiny = np.finfo(s.dtype).tiny ** 0.5
        root = np.where(s > tiny, np.sqrt(s), 1.0).astype(s.dtype)
        u_in = u if roots is None else (roots[g].T @ u).astype(x.dtype)  # (R x)^T u = x^T R^T u
        left, right = u * root, (x.T @ u_in) / root  # A B^T = U_k U_k^T M, as on the device
        out.append(((right, left) if transpose else (left, right)) + (s_all,))
    a, b, s = (np.stack(parts) for parts in zip(*out, strict=True))
    return a, b, (s if values else None)


def _host_array(x) -> np.ndarray:
    """``x`` as a NumPy array in the dtype JAX computes in (float32 for float64 without x64).
    Called on the calling thread: JAX's x64 setting can be thread-local (``jax.enable_x64``)."""
    x = np.asarray(x)
    return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)


def _host_decompose(kernel, rank: int | None, groups: int, method: str, input_cov=None,
                    cov_eps: float = COV_EPS, values: bool = False):
    """:func:`vh_decompose` of :func:`_host_array` inputs on the host (NumPy factors in the
    kernel's dtype); with ``values``, ``(singular values, factors)`` as
    :func:`spectrum_and_factors` (``rank=None``: the largest; ``0``: the values alone, factors
    ``None``)."""
    kh, kw, cg, n = _check_kernel(kernel, groups)
    mats = _to_matrices(kernel, groups)
    root = covs = None
    m, cols = cg * kh, kw * (n // groups)
    if input_cov is not None and m > cols and _resolve_method(method, m, cols) == "gram":
        covs = moments.regularized_on_host(checked_cov(input_cov, groups, m), eps=cov_eps)
    elif input_cov is not None:
        root, inv_root = whitening_on_host(checked_cov(input_cov, groups, m), eps=cov_eps)
    k = min(m, cols) if rank is None else rank // groups
    a, b, s = _host_factors_and_values(mats, k, method, values, vectors=k > 0, roots=root,
                                       covs=covs)
    if a is not None and root is not None:
        a = np.matmul(inv_root, a)
    factors = None if a is None else _to_hwio(a, b, kernel.shape, kernel.dtype)
    return (s.astype(np.float32), factors) if values else factors


def vh_decompose(
    kernel: jax.Array, rank: int, *, groups: int = 1, method: str = "auto",
    input_cov: jax.Array | None = None, cov_eps: float = COV_EPS,
) -> Factors:
    """Closed-form optimal rank-``rank`` vertical/horizontal factors of a conv kernel.

    Data-free (``input_cov=None``) the factors minimise the kernel error ``||W - W_K||_F``
    (Tai et al.'s Theorem 1). With ``input_cov`` they minimise the expected *output* error under a
    stationarity approximation: a layer's output is ``y = sum_j P_j M_j``, ``P_j`` the vertical input
    patches (``C_g * kh`` values, ordered like the matrix rows) at horizontal shift ``j``; if the
    patch statistics do not depend on ``j``, ``E||sum_j P_j (M_j - M'_j)||^2`` is approximately
    ``||S^{1/2} (M - M')||_F^2`` with ``S = E[p p^T]``. Its rank-K optimum is
    ``M' = S^{-1/2} [S^{1/2} M]_K`` (a truncated SVD of the whitened matrix, mapped back), still in
    closed form. ``S`` is regularised to ``S + cov_eps * tr(S) / m * I`` (``m = C_g * kh``) so
    that directions the data never excites keep a small weight. ``S = I`` gives back the
    data-free factors.

    Args:
      kernel: HWIO kernel ``(kh, kw, C // groups, N)``.
      rank: total number of intermediate channels ``K``; ``1 <= K <= max_rank``, divisible by
        ``groups``. Static under ``jit``.
      groups: feature group count of the conv (each group is decomposed separately).
      method: ``"svd"`` (``jnp.linalg.svd``), ``"gram"`` (eigen-solve of the smaller Gram matrix,
        about twice as fast on CPU for large layers; same optimum to float tolerance) or ``"auto"``
        (``"gram"`` when the smaller side of the per-group matrix has >= 256 rows).
      input_cov: optional second moment of the vertical input patches, ``(groups, C_g * kh,
        C_g * kh)`` (or ``(C_g * kh, C_g * kh)`` when ``groups == 1``), as :func:`patch_moments`
        returns it (divided by its count).
      cov_eps: relative regularisation of ``input_cov``.

    Returns:
      ``Factors(vertical (kh, 1, C // groups, K), horizontal (1, kw, K // groups, N))`` in the
      kernel's dtype. The vertical conv has no bias; the horizontal conv takes the original bias.

    Raises:
      ValueError: kernel not 4-D, rank out of range or not divisible by ``groups``, channels not
        divisible by ``groups``, ``input_cov`` of the wrong shape, or NaN/Inf values in a concrete
        kernel or covariance.
    """
    kh, kw, cg, n = _check_kernel(kernel, groups)
    rank = check_rank(rank, (kh, kw, cg, n), groups=groups)
    if input_cov is not None:
        input_cov = checked_cov(input_cov, groups, cg * kh)
    return _vh_decompose(kernel, rank, groups=groups, method=method, input_cov=input_cov,
                         cov_eps=cov_eps)


@functools.partial(jax.jit, static_argnames=("rank", "groups", "method", "cov_eps"))
def _vh_decompose(kernel, rank, *, groups, method, input_cov, cov_eps) -> Factors:
    """:func:`vh_decompose` on checked arguments, jitted: one compile per shape and rank
    instead of one per operation when called eagerly."""
    kh, kw, cg, n = kernel.shape
    kg = rank // groups
    mats = _to_matrices(kernel, groups)
    if input_cov is None:
        a, b = _truncated_factors(mats, kg, method)
    else:
        root, inv_root = whitening(input_cov, groups=groups, size=cg * kh, eps=cov_eps)
        hi = jax.lax.Precision.HIGHEST
        a, b = _truncated_factors(jnp.matmul(root, mats.astype(root.dtype), precision=hi), kg,
                                  method)
        a = jnp.matmul(inv_root, a, precision=hi)
    return _to_hwio(a, b, (kh, kw, cg, n), kernel.dtype)


@functools.partial(jax.jit, static_argnames=("groups", "method", "cov_eps"),
                   compiler_options=_DECOMPOSE_COMPILER_OPTIONS)
def spectrum_and_factors(kernel: jax.Array, *, groups: int = 1, input_cov: jax.Array | None = None,
                         cov_eps: float = COV_EPS, method: str = "auto") -> tuple[jax.Array, Factors]:
    """One decomposition of a kernel: the singular values of its (whitened, with ``input_cov``)
    matrices and the closed-form factors at the largest rank, from which every smaller rank's
    factors are slices (:func:`truncate`). What a rank rule reads (the spectrum) and what it
    applies (the factors) then cost one SVD per layer. Jitted (one compile per shape).

    Args:
      kernel, groups, input_cov, cov_eps, method: as for :func:`vh_decompose`.

    Returns:
      ``(singular values (groups, min(C_g * kh, kw * N_g)) float32, descending,
      Factors at rank max_rank)``.
    """
    kh, kw, cg, n = _check_kernel(kernel, groups)
    kg = min(cg * kh, kw * (n // groups))
    mats = _to_matrices(kernel, groups)
    if input_cov is None:
        a, b, values = _factors_and_values(mats, kg, method)
    else:
        root, inv_root = whitening(input_cov, groups=groups, size=cg * kh, eps=cov_eps)
        hi = jax.lax.Precision.HIGHEST
        a, b, values = _factors_and_values(
            jnp.matmul(root, mats.astype(root.dtype), precision=hi), kg, method)
        a = jnp.matmul(inv_root, a, precision=hi)
    return values.astype(jnp.float32), _to_hwio(a, b, (kh, kw, cg, n), kernel.dtype)


def truncate(factors: Factors, rank: int, *, groups: int = 1) -> Factors:
    """The rank-``rank`` factors contained in higher-rank ones: the first ``rank / groups``
    directions of each group.

    Truncated SVD factors are nested, so ``truncate(vh_decompose(W, R), K)`` equals
    ``vh_decompose(W, K)`` (up to sign conventions), with or without ``input_cov``. Slices of the
    arrays given: JAX arrays give JAX arrays, NumPy arrays NumPy arrays (no compile).
    """
    vertical, horizontal = factors
    k_total = vertical.shape[-1]
    if rank % groups or not 1 <= rank <= k_total:
        raise ValueError(f"cannot truncate factors of rank {k_total} to rank {rank} with "
                         f"groups={groups}")
    kg_old, kg = k_total // groups, rank // groups
    kh, _, cg, _ = vertical.shape
    v = vertical.reshape(kh, 1, cg, groups, kg_old)[..., :kg].reshape(kh, 1, cg, rank)
    h = horizontal[:, :, :kg, :]  # (1, kw, K_g, N): each group's input channels are its own
    return Factors(v, h)


def weighted_relative_error(kernel: jax.Array, approx: jax.Array, input_cov: jax.Array, *,
                            groups: int = 1) -> jax.Array:
    """``||S^{1/2} (M - M')||_F / ||S^{1/2} M||_F``: the calibration-weighted error of an
    approximation (the output-error proxy that calibrated factors minimise, with ``S`` as given,
    unregularised)."""
    mats = _to_matrices(jnp.asarray(kernel, jnp.float32), groups)
    diff = mats - _to_matrices(jnp.asarray(approx, jnp.float32), groups)
    cov = jnp.asarray(input_cov, jnp.float32)
    cov = cov[None] if cov.ndim == 2 else cov
    hi = jax.lax.Precision.HIGHEST
    num = jnp.einsum("gmk,gmn,gnk->", diff, cov, diff, precision=hi)
    den = jnp.einsum("gmk,gmn,gnk->", mats, cov, mats, precision=hi)
    return jnp.sqrt(jnp.maximum(num, 0.0) / jnp.where(den > 0, den, 1.0))


def _to_hwio(a, b, kernel_shape, dtype) -> Factors:
    """Matrix factors ``a (g, C_g * kh, K_g)`` [(c, i), k] and ``b (g, kw * N_g, K_g)`` [(j, n), k]
    to HWIO vertical ``(kh, 1, C_g, K)`` and horizontal ``(1, kw, K_g, N)`` kernels."""
    kh, kw, cg, n = kernel_shape
    groups, _, kg = a.shape  # array methods only: NumPy factors stay NumPy
    vertical = a.reshape(groups, cg, kh, kg).transpose(2, 1, 0, 3).reshape(kh, 1, cg, groups * kg)
    horizontal = b.reshape(groups, kw, n // groups, kg).transpose(1, 3, 0, 2)
    horizontal = horizontal.reshape(1, kw, kg, n)
    return Factors(vertical.astype(dtype), horizontal.astype(dtype))


@functools.partial(jax.jit, static_argnames=("rank", "groups", "method"),
                   compiler_options=_DECOMPOSE_COMPILER_OPTIONS)
def _vh_decompose_jit(kernel, rank, groups, method, input_cov=None):
    return vh_decompose(kernel, rank, groups=groups, method=method, input_cov=input_cov)


@lapack.small_pages()
def decompose_net(
    kernels: Mapping[str, jax.Array],
    ranks: Mapping[str, int],
    *,
    groups: Mapping[str, int] | None = None,
    input_covs: Mapping[str, jax.Array] | None = None,
    method: str = "auto",
    workers: int | None = None,
) -> dict[str, Factors]:
    """Decompose many layers at once: ``{name: vh_decompose(kernels[name], ranks[name])}``.

    On the CPU backend the same closed form runs on the host, by LAPACK (:mod:`lrjax.lapack`:
    the top ``K`` eigenpairs of each Gram matrix), with no XLA program to compile: a first call
    costs what later ones do. The layers run on ``workers`` host threads (default: the number of
    cores) with BLAS/LAPACK limited to one thread each for the duration of the call: LAPACK's
    eigen-solvers scale poorly across cores, so layer-level parallelism is about 1.4x faster on
    2 cores. On accelerators each layer runs through one cached ``jit`` of :func:`vh_decompose`
    (one compile per shape and rank), dispatched asynchronously in order.

    Args:
      kernels: HWIO kernel of each layer.
      ranks: total rank of each layer to decompose; layers absent from ``ranks`` are skipped.
      groups: feature group count by layer name (default 1).
      input_covs: a layer's input covariance (:func:`vh_decompose`'s ``input_cov``) by name:
        its factors are the calibrated ones.
      method: as for :func:`vh_decompose`.
      workers: host threads on CPU.

    Returns:
      ``{name: Factors}`` (JAX arrays) for every layer in ``ranks``.
    """
    missing = sorted(set(ranks) - set(kernels))
    if missing:
        raise ValueError(f"ranks name layers with no kernel: {missing}")
    groups = dict(groups or {})
    for name in ranks:  # validate everything before any work starts
        _check_kernel(kernels[name], groups.get(name, 1))
        check_rank(ranks[name], np.shape(kernels[name]), groups=groups.get(name, 1),
                   where=f"layer {name!r}")
    # largest first, so the slowest layers do not end up last on one thread
    order = sorted(ranks, key=lambda n: -int(np.prod(np.shape(kernels[n]))))
    covs = {n: c for n, c in (input_covs or {}).items() if c is not None and n in ranks}
    if jax.default_backend() == "cpu":
        host = {n: _host_array(kernels[n]) for n in order}
        host_covs = {n: _host_array(c) for n, c in covs.items()}
        return _on_host_threads(lambda n: _host_decompose(
            host[n], ranks[n], groups.get(n, 1), method, host_covs.get(n)), order, workers)
    return {n: _vh_decompose_jit(kernels[n], ranks[n], groups.get(n, 1), method, covs.get(n))
            for n in order}


def _on_host_threads(fn, order, workers=None) -> dict:
    """``{name: fn(name)}`` on ``workers`` host threads with one BLAS thread each (LAPACK's
    eigen-solvers scale poorly across cores), NumPy results moved to the device."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"), \
            ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        done = dict(pool.map(lambda name: (name, fn(name)), order))
    return {name: jax.tree.map(jax.device_put, out) for name, out in done.items()}


def spectra_and_factors(kernels: Mapping[str, jax.Array], *,
                        groups: Mapping[str, int] | None = None,
                        input_covs: Mapping[str, jax.Array] | None = None,
                        method: str = "auto", workers: int | None = None,
                        values_only: Collection[str] = ()) -> dict:
    """:func:`spectrum_and_factors` of many layers (largest first; on CPU on host threads by
    LAPACK without compiling, as :func:`decompose_net`, calibrated or not):
    ``{name: (singular values, Factors at max rank)}``. On CPU the layers in ``values_only``
    get their singular values alone (factors ``None``; LAPACK's two-stage eigenvalue solver),
    for layers whose factors may never be needed."""
    groups, covs = dict(groups or {}), dict(input_covs or {})
    order = sorted(kernels, key=lambda n: -int(np.prod(np.shape(kernels[n]))))
    if jax.default_backend() == "cpu":
        host = {n: _host_array(kernels[n]) for n in order}
        host_covs = {n: _host_array(covs[n]) for n in order if covs.get(n) is not None}
        return _on_host_threads(lambda n: _host_decompose(
            host[n], 0 if n in values_only else None, groups.get(n, 1), method,
            host_covs.get(n), values=True), order, workers)
    return {n: spectrum_and_factors(kernels[n], groups=groups.get(n, 1), input_cov=covs.get(n),
                                    method=method) for n in order}


def reconstruct(vertical: jax.Array, horizontal: jax.Array, *, groups: int = 1) -> jax.Array:
    """The rank-K kernel ``(kh, kw, C // groups, N)`` that the vertical/horizontal pair computes.

    Args:
      vertical: ``(kh, 1, C // groups, K)``.
      horizontal: ``(1, kw, K // groups, N)``.
      groups: feature group count of both convs.
    """
    vs, hs = tuple(np.shape(vertical)), tuple(np.shape(horizontal))
    if len(vs) != 4 or vs[1] != 1:
        raise ValueError(f"vertical must have shape (kh, 1, C/groups, K); got {vs}")
    if len(hs) != 4 or hs[0] != 1:
        raise ValueError(f"horizontal must have shape (1, kw, K/groups, N); got {hs}")
    kh, _, cg, k = vs
    _, kw, kg, n = hs
    if groups < 1 or k % groups or n % groups or k // groups != kg:
        raise ValueError(
            f"vertical {vs} and horizontal {hs} are inconsistent with groups={groups}"
        )
    ng = n // groups
    v = jnp.reshape(vertical[:, 0], (kh, cg, groups, kg))  # [i, c, g, k]
    h = jnp.reshape(horizontal[0], (kw, kg, groups, ng))  # [j, k, g, n]
    w = jnp.einsum("icgk,jkgn->ijcgn", v, h, precision=jax.lax.Precision.HIGHEST)
    return jnp.reshape(w, (kh, kw, cg, n))


def factor_errors(kernel, factors: Factors, *, groups: int = 1,
                  input_cov=None) -> tuple[float, float | None]:
    """The relative kernel error ``||W - W_K|| / ||W||`` of factors and, with ``input_cov``,
    their calibration-weighted error (:func:`weighted_relative_error`), computed on the host in
    NumPy: what reports print, without a compile per layer shape. The residual is formed in
    float64, in blocks of about 4 MB (rows, or columns with ``input_cov``): fresh allocations of
    large arrays cost more than the arithmetic on some hosts, and blocks of a few columns make
    BLAS crawl. The covariance's products (``O(m^2 n)``) run in float32, summed in float64."""
    kernel = np.asarray(kernel)
    kh, kw, cg, n = kernel.shape
    ng = n // groups
    vertical = np.asarray(factors.vertical, np.float64)
    horizontal = np.asarray(factors.horizontal, np.float64)
    kg = vertical.shape[-1] // groups
    # the pair's matrix factors: a [(c, i), k] and b [(j, n), k] per group, product a b^T
    a = np.transpose(np.reshape(vertical[:, 0], (kh, cg, groups, kg)), (2, 1, 0, 3))
    a = a.reshape(groups, cg * kh, kg)
    b = np.transpose(np.reshape(horizontal[0], (kw, kg, groups, ng)), (2, 0, 3, 1))
    b = b.reshape(groups, kw * ng, kg)
    mats = _to_matrices(kernel, groups)  # (g, m, cols), the kernel's dtype
    cov = None if input_cov is None else np.asarray(input_cov, np.float64)
    cov = cov[None] if cov is not None and cov.ndim == 2 else cov
    sums = np.zeros(4)  # ||D||^2, ||M||^2, tr(D^T S D), tr(M^T S M)
    m, cols = mats.shape[-2:]
    if cov is None:  # blocks of rows: each a BLAS-3 product over every column
        rows = max(1, min(m, 2**19 // (groups * cols)))
        bt = np.ascontiguousarray(np.swapaxes(b, -1, -2))
        product = np.empty((groups, rows, cols))
        for start in range(0, m, rows):
            block = mats[:, start:start + rows].astype(np.float64)
            diff = product[:, :block.shape[1]]
            np.matmul(a[:, start:start + rows], bt, out=diff)
            np.subtract(block, diff, out=diff)
            sums[:2] += np.sum(np.square(diff)), np.sum(np.square(block))
    else:  # the covariance couples the rows: blocks of columns
        cov = cov.astype(np.float32)  # its products in float32, summed in float64
        step = max(1, min(cols, 2**19 // (groups * m)))
        for start in range(0, cols, step):
            block = mats[..., start:start + step].astype(np.float64)
            diff = block - np.matmul(a, np.swapaxes(b[:, start:start + step], -1, -2))
            sums[:2] += np.sum(np.square(diff)), np.sum(np.square(block))
            both = np.concatenate([diff, block], axis=-1).astype(np.float32)
            weighted = both * np.matmul(cov, both)
            width = diff.shape[-1]
            sums[2:] += (np.sum(weighted[..., :width], dtype=np.float64),
                         np.sum(weighted[..., width:], dtype=np.float64))
    relative = float(np.sqrt(sums[0]) / max(np.sqrt(sums[1]), np.finfo(float).tiny))
    if cov is None:
        return relative, None
    return relative, float(np.sqrt(max(sums[2], 0.0) / sums[3])) if sums[3] > 0 else 0.0


def singular_values(kernel: jax.Array, *, groups: int = 1) -> jax.Array:
    """Singular values of each group's ``(C_g * kh) x (kw * N_g)`` matrix, descending.

    Returns:
      ``(groups, min(C_g * kh, kw * N_g))``.
    """
    return jnp.linalg.svd(kernel_to_matrices(kernel, groups=groups), compute_uv=False)


def relative_errors(kernel: jax.Array, *, groups: int = 1) -> jax.Array:
    """Relative error ``||W - W_K||_F / ||W||_F`` of the optimal rank-K kernel for every K at once.

    Computed from one SVD: ``err(K)^2 = sum_g sum_{k > K/groups} s_{g,k}^2``, with tail sums taken
    from the small end (no cancellation).

    Returns:
      ``(R + 1,)`` with ``R = max_rank // groups``; entry ``k`` is the error at total rank
      ``K = k * groups`` (entry 0 is 1, entry R is 0).
    """
    s2 = jnp.square(singular_values(kernel, groups=groups)).sum(axis=0)  # (R,)
    tails = jnp.cumsum(s2[::-1])[::-1]  # tails[k] = sum_{j >= k} s2[j]
    tails = jnp.concatenate([tails, jnp.zeros((1,), s2.dtype)])
    total = tails[0]
    return jnp.sqrt(tails / jnp.where(total > 0, total, 1.0))


def relative_error(kernel: jax.Array, approx: jax.Array) -> jax.Array:
    """``||kernel - approx||_F / ||kernel||_F`` (0 for a zero kernel reconstructed exactly)."""
    if np.shape(kernel) != np.shape(approx):
        raise ValueError(f"shapes differ: {np.shape(kernel)} vs {np.shape(approx)}")
    num = jnp.linalg.norm(jnp.ravel(kernel - approx))
    den = jnp.linalg.norm(jnp.ravel(kernel))
    return num / jnp.where(den > 0, den, 1.0)


def fold_batch_norm(kernel, bias, scale, offset, mean, var, eps: float = 1e-5):
    """Fold a BatchNorm that follows a conv into the conv's kernel and bias.

    ``BN(conv(x) + b) = conv'(x) + b'`` with ``kernel' = kernel * g`` and
    ``b' = (b - mean) * g + offset``, where ``g = scale / sqrt(var + eps)`` per output channel.

    Args:
      kernel: HWIO ``(kh, kw, C_g, N)``.
      bias: ``(N,)`` or ``None`` (no bias).
      scale, offset: BatchNorm ``scale`` and ``bias`` ``(N,)``; ``None`` means 1 and 0.
      mean, var: running statistics ``(N,)``.
      eps: BatchNorm epsilon.

    Returns:
      ``(kernel', bias')`` with the kernel's shape and ``(N,)``.
    """
    shape = tuple(np.shape(kernel))
    if len(shape) != 4:
        raise ValueError(f"kernel must be 4-D HWIO; got shape {shape}")
    n = shape[-1]
    scale = jnp.ones((n,), kernel.dtype) if scale is None else scale
    offset = jnp.zeros((n,), kernel.dtype) if offset is None else offset
    bias = jnp.zeros((n,), kernel.dtype) if bias is None else bias
    for name, v in (("bias", bias), ("scale", scale), ("offset", offset), ("mean", mean),
                    ("var", var)):
        if tuple(np.shape(v)) != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match kernel {shape}; "
                             f"got {tuple(np.shape(v))}")
    g = scale * jax.lax.rsqrt(var + eps)
    return kernel * g, (bias - mean) * g + offset
