"""lrjax.decompose against an independent NumPy reference, under jit, over many shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax.lapack
from lrjax import decompose as D
from lrjax import iterative
from tests.helpers import grid

# (kernel HWIO shape, rank, groups)
CASES = [
    ((3, 3, 8, 16), 5, 1),
    ((3, 3, 4, 4), 12, 1),  # full rank
    ((5, 3, 6, 10), 7, 1),  # kh != kw
    ((1, 5, 7, 3), 4, 1),
    ((1, 1, 8, 12), 3, 1),  # 1x1
    ((3, 3, 4, 8), 6, 2),  # grouped
    ((5, 5, 3, 8), 8, 4),  # 4 groups, C = 12
]
METHODS = ["svd", "gram"]


def numpy_reference(w_hwio, rank, groups):
    """The authors' recipe: per group, OIHW -> (I, H, W, O) -> (C*kh, kw*N), NumPy SVD."""
    w = np.asarray(w_hwio, np.float64).transpose(3, 2, 0, 1)  # OIHW
    n = w.shape[0]
    ng, kg = n // groups, rank // groups
    recon, tails = [], 0.0
    for g in range(groups):
        wg = w[g * ng:(g + 1) * ng]  # (Ng, Cg, kh, kw)
        o, i, h, ww = wg.shape
        m = wg.transpose(1, 2, 3, 0).reshape(i * h, ww * o)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        mk = (u[:, :kg] * s[:kg]) @ vt[:kg]
        recon.append(mk.reshape(i, h, ww, o).transpose(3, 0, 1, 2))
        tails += np.sum(s[kg:] ** 2)
    full = np.concatenate(recon, axis=0).transpose(2, 3, 1, 0)  # back to HWIO
    return full, np.sqrt(tails) / np.linalg.norm(w)


def random_kernel(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    if request.param == np.float64:
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


@pytest.mark.parametrize("shape,rank,groups,method", grid(CASES, [(m,) for m in METHODS]))
def test_optimal_error_and_shapes(shape, rank, groups, method, dtype):
    w = random_kernel(shape, dtype=dtype)
    dec = jax.jit(functools.partial(D.vh_decompose, rank=rank, groups=groups, method=method))
    v, h = dec(jnp.asarray(w))
    kh, kw, cg, n = shape
    assert v.shape == (kh, 1, cg, rank) and h.shape == (1, kw, rank // groups, n)
    assert v.dtype == h.dtype == dtype
    approx = jax.jit(functools.partial(D.reconstruct, groups=groups))(v, h)
    ref_kernel, ref_err = numpy_reference(w, rank, groups)
    tol = 1e-4 if dtype == np.float32 else 1e-9
    err = float(D.relative_error(w, approx))
    assert err == pytest.approx(ref_err, rel=tol, abs=tol)
    np.testing.assert_allclose(approx, ref_kernel, atol=tol * 20 * np.abs(w).max())
    curve = D.relative_errors(w, groups=groups)
    assert float(curve[rank // groups]) == pytest.approx(ref_err, rel=tol, abs=tol)


@pytest.mark.parametrize("shape,groups", [((3, 3, 4, 6), 1), ((3, 5, 2, 4), 2), ((1, 1, 5, 7), 1)])
@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reconstructs(shape, groups, method):
    w = random_kernel(shape, seed=1)
    top = D.max_rank(shape, groups=groups)
    approx = D.reconstruct(*D.vh_decompose(w, top, groups=groups, method=method), groups=groups)
    np.testing.assert_allclose(approx, w, atol=2e-5 * np.abs(w).max())


def test_sqrt_sigma_split_equally():
    w = random_kernel((3, 3, 5, 7), seed=2)
    v, h = D.vh_decompose(w, 4, method="svd")
    s = np.linalg.svd(np.asarray(D.kernel_to_matrices(w))[0], compute_uv=False)[:4]
    col_v = np.linalg.norm(np.asarray(v).reshape(-1, 4), axis=0)
    col_h = np.linalg.norm(np.asarray(h).transpose(0, 1, 3, 2).reshape(-1, 4), axis=0)
    np.testing.assert_allclose(col_v, np.sqrt(s), rtol=1e-5)
    np.testing.assert_allclose(col_h, np.sqrt(s), rtol=1e-5)


def test_relative_errors_curve():
    w = random_kernel((3, 3, 6, 4), seed=3)
    curve = np.asarray(D.relative_errors(w))
    assert curve.shape == (D.max_rank(w.shape) + 1,)
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-7)
    assert np.all(np.diff(curve) <= 1e-7)
    for k in (1, 5, 12):
        _, ref = numpy_reference(w, k, 1)
        assert curve[k] == pytest.approx(ref, rel=1e-5)
    s = D.singular_values(w)
    assert s.shape == (1, 12) and np.all(np.diff(np.asarray(s[0])) <= 0)


def test_vmap_over_stack():
    ws = np.stack([random_kernel((3, 3, 4, 8), seed=i) for i in range(3)])
    vs, hs = jax.jit(jax.vmap(lambda w: D.vh_decompose(w, 5)))(ws)
    assert vs.shape == (3, 3, 1, 4, 5) and hs.shape == (3, 1, 3, 5, 8)
    for i in range(3):
        _, ref = numpy_reference(ws[i], 5, 1)
        assert float(D.relative_error(ws[i], D.reconstruct(vs[i], hs[i]))) == pytest.approx(
            ref, rel=1e-4)


def test_no_perturbation_or_iterative_run_beats_closed_form():
    w = random_kernel((3, 3, 6, 8), seed=4)
    rank = 6
    v, h = D.vh_decompose(w, rank)
    best = float(D.relative_error(w, D.reconstruct(v, h)))
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(20):
            pv = v + scale * rng.standard_normal(v.shape).astype(np.float32)
            ph = h + scale * rng.standard_normal(h.shape).astype(np.float32)
            assert float(D.relative_error(w, D.reconstruct(pv, ph))) >= best * (1 - 1e-6)
    for seed in range(4):
        res = iterative.als_decompose(w, rank, seed=seed, max_iters=200)
        assert res.factors.vertical.shape == v.shape and res.factors.horizontal.shape == h.shape
        it_err = float(D.relative_error(w, D.reconstruct(*res.factors)))
        assert it_err >= best * (1 - 1e-5)
        assert it_err == pytest.approx(float(res.relative_error), rel=1e-3)
        hist = np.asarray(res.history)[: int(res.iterations)]
        assert np.all(np.diff(hist) <= 1e-6)  # ALS never increases the error


def test_iterative_grouped_and_close_to_optimum():
    w = random_kernel((3, 3, 4, 8), seed=5)
    res = iterative.als_decompose(w, 4, groups=2, max_iters=500, tol=1e-9)
    best = float(D.relative_error(w, D.reconstruct(*D.vh_decompose(w, 4, groups=2), groups=2)))
    got = float(D.relative_error(w, D.reconstruct(*res.factors, groups=2)))
    assert best <= got < best * 1.01


def _conv(x, k, strides, padding, dilation, groups):
    return jax.lax.conv_general_dilated(
        x, k, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST)


def _split(padding):
    if isinstance(padding, str):
        return padding, padding
    rows, cols = padding
    return (rows, (0, 0)), ((0, 0), cols)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 1), (0, 3))])
@pytest.mark.parametrize("dilation,groups", [((1, 1), 1), ((2, 1), 1), ((1, 1), 2)])
def test_conv_equivalence(strides, padding, dilation, groups):
    shape = (3, 5, 4 // groups, 6)
    w = random_kernel(shape, seed=6)
    x = random_kernel((2, 11, 12, 4), seed=7)
    rank = 4
    v, h = D.vh_decompose(w, rank, groups=groups)
    pv, ph = _split(padding)
    pair = _conv(_conv(x, v, (strides[0], 1), pv, (dilation[0], 1), groups),
                 h, (1, strides[1]), ph, (1, dilation[1]), groups)
    lowrank = _conv(x, D.reconstruct(v, h, groups=groups), strides, padding, dilation, groups)
    np.testing.assert_allclose(pair, lowrank, atol=1e-4)
    top = D.max_rank(shape, groups=groups)
    v, h = D.vh_decompose(w, top, groups=groups)
    pair = _conv(_conv(x, v, (strides[0], 1), pv, (dilation[0], 1), groups),
                 h, (1, strides[1]), ph, (1, dilation[1]), groups)
    np.testing.assert_allclose(pair, _conv(x, w, strides, padding, dilation, groups), atol=1e-4)


def test_fold_batch_norm():
    rng = np.random.default_rng(8)
    w = random_kernel((3, 3, 4, 5), seed=8)
    b, scale, offset, mean = (rng.standard_normal(5).astype(np.float32) for _ in range(4))
    var = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    x = random_kernel((2, 7, 7, 4), seed=9)
    y = _conv(x, w, (1, 1), "SAME", (1, 1), 1) + b
    bn = (y - mean) / np.sqrt(var + 1e-3) * scale + offset
    fw, fb = D.fold_batch_norm(w, b, scale, offset, mean, var, eps=1e-3)
    np.testing.assert_allclose(_conv(x, fw, (1, 1), "SAME", (1, 1), 1) + fb, bn, atol=1e-4)
    fw, fb = D.fold_batch_norm(w, None, None, None, mean, var)
    np.testing.assert_allclose(fb, -mean / np.sqrt(var + 1e-5), rtol=1e-5)
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\)"):
        D.fold_batch_norm(w, b, scale, offset, mean[:3], var)


@pytest.mark.parametrize("args,kwargs,match", [
    ((np.zeros((3, 3, 4)), 2), {}, r"4-D HWIO.*\(3, 3, 4\)"),
    ((np.ones((3, 3, 4, 4)), 0), {}, r"rank 0 is invalid: out of range \[1, 12\]"),
    ((np.ones((3, 3, 4, 4)), 13), {}, r"rank 13 is invalid: out of range \[1, 12\]"),
    ((np.ones((3, 3, 2, 4)), 3), {"groups": 2}, r"rank 3 is invalid: not divisible by groups=2"),
    ((np.ones((3, 3, 2, 5)), 2), {"groups": 2}, r"N=5 .* not divisible by groups=2"),
    ((np.full((3, 3, 2, 4), np.nan), 2), {}, r"contains 72 NaN/Inf"),
    ((np.ones((3, 3, 2, 4)), 2.0), {}, r"rank must be an int; got 2.0"),
    ((np.ones((3, 3, 2, 4)), 2), {"method": "qr"}, r"method must be"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.vh_decompose(*args, **kwargs)


def test_shape_errors_raise_at_trace_time():
    dec = jax.jit(functools.partial(D.vh_decompose, rank=20))
    with pytest.raises(ValueError, match=r"rank 20 is invalid: out of range \[1, 12\]"):
        dec(jnp.ones((3, 3, 4, 4)))
    with pytest.raises(ValueError, match="inconsistent with groups=2"):
        D.reconstruct(jnp.ones((3, 1, 2, 4)), jnp.ones((1, 3, 4, 6)), groups=2)


def test_second_call_does_not_recompile():
    dec = jax.jit(D.vh_decompose, static_argnames=("rank", "groups", "method"))
    dec(jnp.asarray(random_kernel((3, 3, 4, 8), seed=1)), rank=4)
    dec(jnp.asarray(random_kernel((3, 3, 4, 8), seed=2)), rank=4)
    assert dec._cache_size() == 1
    dec(jnp.asarray(random_kernel((3, 3, 4, 8), seed=2)), rank=5)
    assert dec._cache_size() == 2


def test_decompose_net_matches_per_layer():
    ks = {"a": random_kernel((3, 3, 4, 8), seed=1), "b": random_kernel((3, 3, 4, 8), seed=2),
          "c": random_kernel((5, 5, 2, 4), seed=3)}
    out = D.decompose_net(ks, {"a": 3, "c": 4}, groups={"c": 2})
    assert list(out) == ["a", "c"]
    for name, g in (("a", 1), ("c", 2)):
        ref = D.vh_decompose(ks[name], {"a": 3, "c": 4}[name], groups=g)
        np.testing.assert_allclose(D.reconstruct(*out[name], groups=g),
                                   D.reconstruct(*ref, groups=g), atol=1e-5)
    with pytest.raises(ValueError, match=r"no kernel: \['z'\]"):
        D.decompose_net(ks, {"z": 2})
    with pytest.raises(ValueError, match="rank 99 is invalid"):
        D.decompose_net(ks, {"a": 99})


@pytest.mark.parametrize("method", METHODS)
def test_cpu_route_is_the_closed_form_without_compiling(method, dtype):
    """On CPU, decompose_net and spectra_and_factors (data-free) run LAPACK on host threads:
    the same optimum as the NumPy reference, in the kernel's dtype, and no XLA compile."""
    kernels = {f"w{i}": random_kernel(shape, seed=i, dtype=dtype)
               for i, (shape, _, _) in enumerate(CASES)}
    ranks = {f"w{i}": rank for i, (_, rank, _) in enumerate(CASES)}
    groups = {f"w{i}": g for i, (_, _, g) in enumerate(CASES)}
    compiles = []

    def listen(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        factors = D.decompose_net(kernels, ranks, groups=groups, method=method)
        spectra = D.spectra_and_factors(kernels, groups=groups, method=method)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    tol = 1e-4 if dtype == np.float32 else 1e-9
    for name, w in kernels.items():  # checked on the host too: float64 residuals, no compile
        rank, g = ranks[name], groups[name]
        _, ref_err = numpy_reference(w, rank, g)  # the optimum, unique: the error pins it
        truncated = D.truncate(spectra[name][1], rank, groups=g)
        for got in (factors[name], truncated):
            assert got.vertical.dtype == got.horizontal.dtype == dtype
            assert D.factor_errors(w, got, groups=g)[0] == pytest.approx(ref_err, rel=tol,
                                                                           abs=tol)
        want = np.linalg.svd(D._to_matrices(w.astype(np.float64), g), compute_uv=False)
        np.testing.assert_allclose(spectra[name][0], want, rtol=1e-4, atol=1e-4 * want.max())


@pytest.mark.parametrize("method", METHODS)
def test_cpu_route_calibrated_matches_the_jitted_one(method):
    """Calibrated spectra on the CPU route (whitening by LAPACK on the host) are the jitted
    spectrum_and_factors': the same whitened spectrum, factors with the same weighted error."""
    kernel = random_kernel((3, 3, 8, 12), seed=3)
    x = jax.random.normal(jax.random.key(4), (4, 10, 10, 16))
    sums, count = D.patch_moments(x, (3, 3), groups=2)
    cov = np.asarray(sums / count)
    values, top = D.spectra_and_factors({"w": kernel}, groups={"w": 2}, input_covs={"w": cov},
                                        method=method)["w"]
    want_values, want_top = D.spectrum_and_factors(kernel, groups=2, input_cov=cov,
                                                   method=method)
    np.testing.assert_allclose(values, want_values, rtol=1e-4, atol=1e-5)
    alone, none = D.spectra_and_factors({"w": kernel}, groups={"w": 2}, input_covs={"w": cov},
                                        method=method, values_only={"w"})["w"]
    assert none is None  # the values alone (as for the largest layers): the same spectrum
    np.testing.assert_allclose(alone, want_values, rtol=1e-4, atol=1e-5)
    for rank in (2, 10):
        got, want = (D.factor_errors(kernel, D.truncate(f, rank, groups=2), groups=2,
                                     input_cov=cov) for f in (top, want_top))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    # a tall matrix (a dense layer 48 -> 20): the CPU route's Gram method needs no whitening
    # root (the eigenvectors of M^T S M), the same spectrum and factors
    tall = random_kernel((1, 1, 48, 20), seed=5)
    x = np.asarray(jax.random.normal(jax.random.key(6), (64, 48))) * np.linspace(0.1, 3, 48)
    cov = x.T @ x / 64
    values, top = D.spectra_and_factors({"w": tall}, input_covs={"w": cov}, method=method)["w"]
    want_values, want_top = D.spectrum_and_factors(tall, input_cov=cov, method=method)
    np.testing.assert_allclose(values, want_values, rtol=1e-4, atol=1e-5 * want_values.max())
    for rank in (3, 12):
        got, want = (D.factor_errors(tall, D.truncate(f, rank), input_cov=cov)
                     for f in (top, want_top))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lapack_eigen_solvers(dtype):
    x = random_kernel((40, 30), dtype=dtype)
    a = x @ x.T + np.diag(np.arange(40, dtype=dtype))  # distinct eigenvalues
    want = np.linalg.eigvalsh(a)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for (values, vectors), k in ((lrjax.lapack.eigh(a.copy()), 40),
                                 (lrjax.lapack.eigh_top(a.copy(), 7), 7)):
        assert values.dtype == vectors.dtype == dtype and vectors.shape == (40, k)
        np.testing.assert_allclose(values, want[-k:], rtol=tol, atol=tol * want[-1])
        np.testing.assert_allclose(a @ vectors, vectors * values, atol=tol * want[-1])
        np.testing.assert_allclose(vectors.T @ vectors, np.eye(k), atol=tol)
    values = lrjax.lapack.eigvalsh(a.copy())  # two-stage, no vectors
    assert values.dtype == dtype
    np.testing.assert_allclose(values, want, rtol=tol, atol=tol * want[-1])
    # the two-stage routine is found in the LAPACK SciPy links (else ?syevd stands in)
    assert lrjax.lapack._two_stage("s" if dtype == np.float32 else "d") is not None
    for bad, match in ((np.ones((3, 4), dtype), r"shape \(3, 4\)"),
                       (np.ones((3, 3), np.int32), "dtype int32"),
                       (np.ones((4, 4), dtype).T[:3, :3], r"shape \(3, 3\)")):
        with pytest.raises(ValueError, match=match):
            lrjax.lapack.eigh(bad)
        with pytest.raises(ValueError, match=match):
            lrjax.lapack.eigvalsh(bad)
    with pytest.raises(ValueError, match="k must be in"):
        lrjax.lapack.eigh_top(a.copy(), 41)


def test_host_whitening_is_a_cholesky_root_with_a_symmetric_fallback():
    x = random_kernel((60, 24), dtype=np.float64)
    cov = (x.T @ x)[None] / 60
    regularised = cov[0] + 1e-3 * np.trace(cov[0]) / 24 * np.eye(24)
    root, inverse = lrjax.moments.whitening_on_host(cov)
    assert root.shape == inverse.shape == (1, 24, 24)
    np.testing.assert_allclose(np.tril(root[0], -1), 0.0)  # the Cholesky factor R, upper
    np.testing.assert_allclose(root[0].T @ root[0], regularised, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(inverse[0] @ root[0], np.eye(24), atol=1e-10)
    # not positive definite even after regularising: the symmetric root, eigenvalues clipped
    root, inverse = lrjax.moments.whitening_on_host(-np.eye(5)[None])
    np.testing.assert_allclose(root[0], root[0].T)
    np.testing.assert_allclose(inverse[0] @ root[0], np.eye(5), atol=1e-6)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        lrjax.lapack.cholesky_root(-np.eye(3))


@pytest.mark.parametrize("method", ["svd", "gram"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_one_decomposition_gives_the_spectrum_and_every_ranks_factors(method, calibrated):
    key = jax.random.key(3)
    kernel = jax.random.normal(key, (3, 3, 8, 12))
    x = jax.random.normal(jax.random.key(4), (4, 10, 10, 16))
    cov = None
    if calibrated:
        sums, count = D.patch_moments(x, (3, 3), groups=2)
        cov = sums / count
    values, top = D.spectrum_and_factors(kernel, groups=2, input_cov=cov, method=method)
    assert values.shape == (2, 18) and top.vertical.shape == (3, 1, 8, 36)
    mats = D.kernel_to_matrices(kernel, groups=2)
    if calibrated:
        root, _ = D.whitening(cov, groups=2)
        mats = jnp.matmul(root, mats, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(values, jnp.linalg.svd(mats, compute_uv=False), rtol=1e-3,
                               atol=1e-4)
    for rank in (2, 10):  # the same product as a decomposition at that rank
        want = D.reconstruct(*D.vh_decompose(kernel, rank, groups=2, input_cov=cov,
                                             method=method), groups=2)
        got = D.reconstruct(*D.truncate(top, rank, groups=2), groups=2)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_factor_errors_match_the_jax_errors():
    kernel = jax.random.normal(jax.random.key(5), (3, 3, 6, 8))
    x = jax.random.normal(jax.random.key(6), (2, 9, 9, 12))
    sums, count = D.patch_moments(x, (3, 3), groups=2)
    factors = D.vh_decompose(kernel, 6, groups=2)
    approx = D.reconstruct(*factors, groups=2)
    relative, weighted = D.factor_errors(kernel, factors, groups=2, input_cov=sums / count)
    assert relative == pytest.approx(float(D.relative_error(kernel, approx)), rel=1e-4)
    assert weighted == pytest.approx(float(D.weighted_relative_error(
        kernel, approx, sums / count, groups=2)), rel=1e-4)
    assert D.factor_errors(kernel, factors, groups=2)[1] is None


def test_small_pages_turns_numpys_hugepage_advice_off_and_restores_it():
    from numpy._core import multiarray

    from lrjax import lapack

    previous = multiarray._set_madvise_hugepage(True)
    try:
        with lapack.small_pages():
            with lapack.small_pages():  # reentrant: the inner block restores nothing
                pass
            assert multiarray._set_madvise_hugepage(False) is False  # still off
        assert multiarray._set_madvise_hugepage(True) is True  # restored

        @lapack.small_pages()
        def advice_inside():
            return multiarray._set_madvise_hugepage(False)

        assert advice_inside() is False and multiarray._set_madvise_hugepage(True) is True
    finally:
        multiarray._set_madvise_hugepage(previous)


def _explicit_moments(x, kh, stride, dilation, top, bottom, groups):
    """``sum p p^T`` per group over the vertical patches ``p[(c, i)]``, built one by one."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (top, bottom), (0, 0), (0, 0)))
    n, h, w, c = x.shape
    cg, rows = c // groups, (h - (kh - 1) * dilation - 1) // stride + 1
    sums = np.zeros((groups, cg * kh, cg * kh))
    for g in range(groups):
        for r in range(rows):
            taps = x[:, r * stride + np.arange(kh) * dilation, :, g * cg:(g + 1) * cg]
            p = np.transpose(taps, (0, 2, 3, 1)).reshape(n * w, cg * kh)  # (c, i) order
            sums[g] += p.T @ p
    return sums, n * w * rows


@pytest.mark.parametrize("kh", [3, 12])
def test_patch_moments_are_the_explicit_patches_second_moments(kh, monkeypatch):
    """Short windows sum ``kh^2`` products of row views; tall ones (a 1-D conv of many taps: a
    learned audio filterbank of 128, whose ``kh^2`` products took minutes to compile) build the
    patches a block of rows at a time: both are the patches' moments."""
    monkeypatch.setattr(lrjax.moments, "PATCH_ROWS_ENTRIES", 200)  # several blocks
    x = jax.random.normal(jax.random.key(0), (2, 40, 3, 4))
    sums, count = D.patch_moments(x, (kh, 1), strides=(2, 1), padding="SAME", dilation=(2, 1),
                                  groups=2)
    span = (kh - 1) * 2 + 1
    total = max((40 + 1) // 2 * 2 - 2 + span - 40, 0)  # SAME, stride 2: (out - 1) * 2 + span - h
    want, n = _explicit_moments(x, kh, 2, 2, total // 2, total - total // 2, groups=2)
    assert float(count) == n
    np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-4, atol=1e-3)


def test_a_tall_windows_moments_are_a_few_products_not_one_per_pair_of_taps():
    """A 128-tap window: before, 128^2 = 16,384 products in the program (a calibration that
    compiled for minutes); now one per block of rows."""
    x = jax.ShapeDtypeStruct((8, 6400, 1, 1), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: D.patch_moments(x, (128, 1), strides=(32, 1),
                                                     padding="VALID"))(x)
    products = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert 1 <= len(products) <= 4


@pytest.mark.parametrize("kh,stride,padding,dilation", [  # (the first three: the slow run)
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [(2, 2, (1, 1), 1), (3, 2, (1, 2), 1),
                                                         (4, 3, (0, 0), 1)]),
    (5, 2, (3, 1), 2), (12, 4, (2, 9), 1), (1, 2, (0, 0), 1)])
def test_transposed_patch_moments_are_the_dilated_inputs_without_its_zeros(kh, stride, padding,
                                                                          dilation):
    """A transposed conv's vertical patches, skipping the zero rows its stride inserts: the
    moments of the dilated input's patches, for any padding, dilation and window."""
    x = jax.random.normal(jax.random.key(1), (2, 7, 3, 4))
    dilated = jax.lax.pad(x, 0.0, [(0, 0, 0), (0, 0, stride - 1), (0, 0, 0), (0, 0, 0)])
    want = D.patch_moments(dilated, (kh, 1), padding=(padding, (0, 0)), dilation=(dilation, 1))
    got = lrjax.moments.transposed_patch_moments(x, kh, stride, padding, dilation)
    assert float(got[1]) == float(want[1])
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-4)


def test_a_strided_transposed_convs_moments_skip_the_work_on_its_zeros():
    """perch's learned synthesis filterbank (128 taps, stride 32, 32 channels): its calibration
    took 60-130 s on the 2-core machine on the dilated input's patches."""
    from lrjax import macs

    x = jax.ShapeDtypeStruct((8, 200, 1, 32), jnp.float32)
    dilated = jax.ShapeDtypeStruct((8, 199 * 32 + 1, 1, 32), jnp.float32)
    ours = macs.traced_macs(lambda x: lrjax.moments.transposed_patch_moments(
        x, 128, 32, (127, 127)), x)["total"]
    theirs = macs.traced_macs(lambda x: D.patch_moments(
        x, (128, 1), padding=((127, 127), (0, 0))), dilated)["total"]
    assert ours * 500 < theirs
