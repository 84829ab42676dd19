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

Every function here but ``decompose_net`` is pure and jit-able with ``rank``/``groups``/``method``
static. Shape checks run at trace time; the NaN/Inf check runs only where the kernel's values are
concrete.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Factors",
    "max_rank",
    "kernel_to_matrices",
    "vh_decompose",
    "decompose_net",
    "reconstruct",
    "singular_values",
    "relative_errors",
    "relative_error",
    "fold_batch_norm",
]

# Below this many rows of the smaller Gram side, a plain SVD is as fast as the Gram route.
_GRAM_MIN_DIM = 256


class Factors(NamedTuple):
    """The two kernels of a vertical/horizontal pair (HWIO)."""

    vertical: jax.Array  # (kh, 1, C // groups, K)
    horizontal: jax.Array  # (1, kw, K // groups, N)


def _check_shape(shape, groups) -> tuple[int, int, int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4:
        raise ValueError(
            f"kernel must be 4-D HWIO (kh, kw, C/groups, N); got shape {shape}"
        )
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    if min(shape) < 1:
        raise ValueError(f"kernel has an empty dimension: shape {shape}")
    if shape[3] % groups:
        raise ValueError(
            f"output channels N={shape[3]} of kernel shape {shape} are not divisible by "
            f"groups={groups}"
        )
    return shape


def _check_kernel(kernel, groups: int) -> tuple[int, int, int, int]:
    """Validate shape (always) and values (when concrete); returns ``(kh, kw, C_g, N)``."""
    shape = _check_shape(np.shape(kernel), groups)
    if not isinstance(kernel, jax.core.Tracer):
        values = np.asarray(kernel)
        finite = np.isfinite(values)
        if not finite.all():
            raise ValueError(
                f"kernel of shape {shape} contains {finite.size - finite.sum()} NaN/Inf value(s)"
            )
    return shape


def max_rank(kernel_shape, *, groups: int = 1) -> int:
    """The largest total rank for an HWIO kernel shape: ``groups * min(C_g * kh, kw * N_g)``."""
    kh, kw, cg, n = _check_shape(kernel_shape, groups)
    return groups * min(cg * kh, kw * (n // groups))


def _check_rank(rank, shape, groups) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"rank must be a Python int; got {rank!r}")
    top = max_rank(shape, groups=groups)
    if rank < 1 or rank > top:
        raise ValueError(
            f"rank={rank} is out of range [1, {top}] for kernel shape {tuple(shape)} "
            f"with groups={groups}"
        )
    if rank % groups:
        raise ValueError(f"rank={rank} is not divisible by groups={groups}")
    return int(rank)


def kernel_to_matrices(kernel: jax.Array, *, groups: int = 1) -> jax.Array:
    """Reshape an HWIO kernel to the paper's per-group matrices.

    Args:
      kernel: ``(kh, kw, C_g, N)``.
      groups: feature group count.

    Returns:
      ``(groups, C_g * kh, kw * N_g)`` with entry ``[g, (c, i), (j, n)] = W[i, j, c, g * N_g + n]``.
    """
    _check_kernel(kernel, groups)
    return _to_matrices(kernel, groups)


def _to_matrices(kernel, groups):
    kh, kw, cg, n = np.shape(kernel)
    ng = n // groups
    w = jnp.reshape(kernel, (kh, kw, cg, groups, ng))
    w = jnp.transpose(w, (3, 2, 0, 1, 4))  # (g, c, i, j, n)
    return jnp.reshape(w, (groups, cg * kh, kw * ng))


def _truncated_factors(mats: jax.Array, k: int, method: str) -> tuple[jax.Array, jax.Array]:
    """Top-k left factors ``A`` (g, m, k) and right factors ``B`` (g, n, k) with ``A B^T = M_k``.

    Each column pair is scaled by ``sqrt(s)`` so that the singular value is split equally.
    """
    m, n = mats.shape[-2:]
    if method == "auto":
        method = "gram" if min(m, n) >= _GRAM_MIN_DIM else "svd"
    if method == "svd":
        u, s, vt = jnp.linalg.svd(mats, full_matrices=False)
        root = jnp.sqrt(s[..., :k])
        a = u[..., :, :k] * root[..., None, :]
        b = jnp.swapaxes(vt[..., :k, :], -1, -2) * root[..., None, :]
        return a, b
    if method != "gram":
        raise ValueError(f"method must be 'auto', 'svd' or 'gram'; got {method!r}")
    # Eigen-solve of the smaller Gram matrix: M M^T = U diag(s^2) U^T. The factors are written as a
    # projection, A B^T = U_k U_k^T M, so the product is exact even where s is tiny.
    transpose = m > n
    x = jnp.swapaxes(mats, -1, -2) if transpose else mats
    hi = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=hi)
    evals, evecs = jnp.linalg.eigh(gram)  # ascending
    u = evecs[..., :, ::-1][..., :, :k]
    s = jnp.sqrt(jnp.clip(evals[..., ::-1][..., :k], 0.0, None))
    proj = jnp.matmul(jnp.swapaxes(x, -1, -2), u, precision=hi)  # (.., other, k) = Q_k s_k
    tiny = jnp.finfo(s.dtype).tiny ** 0.5
    root = jnp.where(s > tiny, jnp.sqrt(s), 1.0)
    left = u * root[..., None, :]
    right = proj / root[..., None, :]
    return (right, left) if transpose else (left, right)


def vh_decompose(
    kernel: jax.Array, rank: int, *, groups: int = 1, method: str = "auto"
) -> Factors:
    """Closed-form optimal rank-``rank`` vertical/horizontal factors of a conv kernel.

    Args:
      kernel: HWIO kernel ``(kh, kw, C // groups, N)``.
      rank: total number of intermediate channels ``K``; ``1 <= K <= max_rank``, divisible by
        ``groups``. Static under ``jit``.
      groups: feature group count of the conv (each group is decomposed separately).
      method: ``"svd"`` (``jnp.linalg.svd``), ``"gram"`` (eigen-solve of the smaller Gram matrix,
        about twice as fast on CPU for large layers; same optimum to float tolerance) or ``"auto"``
        (``"gram"`` when the smaller side of the per-group matrix has >= 256 rows).

    Returns:
      ``Factors(vertical (kh, 1, C // groups, K), horizontal (1, kw, K // groups, N))`` in the
      kernel's dtype. The vertical conv has no bias; the horizontal conv takes the original bias.

    Raises:
      ValueError: kernel not 4-D, rank out of range or not divisible by ``groups``, channels not
        divisible by ``groups``, or NaN/Inf values in a concrete kernel.
    """
    kh, kw, cg, n = _check_kernel(kernel, groups)
    rank = _check_rank(rank, (kh, kw, cg, n), groups)
    kg = rank // groups
    mats = _to_matrices(kernel, groups)
    a, b = _truncated_factors(mats, kg, method)
    return _to_hwio(a, b, (kh, kw, cg, n), kernel.dtype)


def _to_hwio(a, b, kernel_shape, dtype) -> Factors:
    """Matrix factors ``a (g, C_g * kh, K_g)`` [(c, i), k] and ``b (g, kw * N_g, K_g)`` [(j, n), k]
    to HWIO vertical ``(kh, 1, C_g, K)`` and horizontal ``(1, kw, K_g, N)`` kernels."""
    kh, kw, cg, n = kernel_shape
    groups, _, kg = a.shape
    vertical = jnp.reshape(a, (groups, cg, kh, kg))
    vertical = jnp.transpose(vertical, (2, 1, 0, 3)).reshape(kh, 1, cg, groups * kg)
    horizontal = jnp.reshape(b, (groups, kw, n // groups, kg))
    horizontal = jnp.transpose(horizontal, (1, 3, 0, 2)).reshape(1, kw, kg, n)
    return Factors(vertical.astype(dtype), horizontal.astype(dtype))


@functools.partial(jax.jit, static_argnames=("rank", "groups", "method"))
def _vh_decompose_jit(kernel, rank, groups, method):
    return vh_decompose(kernel, rank, groups=groups, method=method)


def decompose_net(
    kernels: Mapping[str, jax.Array],
    ranks: Mapping[str, int],
    *,
    groups: Mapping[str, int] | None = None,
    method: str = "auto",
    workers: int | None = None,
) -> dict[str, Factors]:
    """Decompose many layers at once: ``{name: vh_decompose(kernels[name], ranks[name])}``.

    Each layer runs through one cached ``jit`` of :func:`vh_decompose` (one compile per shape and
    rank). On the CPU backend the layers run on ``workers`` host threads (default: the number of
    cores) with BLAS/LAPACK limited to one thread each for the duration of the call: LAPACK's
    eigen-solvers scale poorly across cores, so layer-level parallelism is about 1.4x faster on
    2 cores. On accelerators the layers are dispatched asynchronously in order.

    Args:
      kernels: HWIO kernel of each layer.
      ranks: total rank of each layer to decompose; layers absent from ``ranks`` are skipped.
      groups: feature group count by layer name (default 1).
      method: as for :func:`vh_decompose`.
      workers: host threads on CPU.

    Returns:
      ``{name: Factors}`` for every layer in ``ranks``.
    """
    missing = sorted(set(ranks) - set(kernels))
    if missing:
        raise ValueError(f"ranks name layers with no kernel: {missing}")
    groups = dict(groups or {})
    for name in ranks:  # validate everything before any work starts
        _check_kernel(kernels[name], groups.get(name, 1))
        _check_rank(ranks[name], np.shape(kernels[name]), groups.get(name, 1))
    # largest first, so the slowest layers do not end up last on one thread
    order = sorted(ranks, key=lambda n: -int(np.prod(np.shape(kernels[n]))))

    def run(name):
        return name, _vh_decompose_jit(kernels[name], ranks[name], groups.get(name, 1), method)

    if jax.default_backend() != "cpu":
        return dict(map(run, order))
    from threadpoolctl import threadpool_limits

    workers = workers or os.cpu_count() or 1
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        done = dict(pool.map(lambda n: jax.block_until_ready(run(n)), order))
    return {name: done[name] for name in ranks}


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
