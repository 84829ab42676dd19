"""The rarer math a model's own code uses, exported and checked against JAX in each runtime:
trigonometry and ``atan2`` (zeros of either sign included), ``cbrt``, ``is_finite``, logical and
bitwise ``not`` / ``xor``, ``argmin``, ``prod`` / ``all`` / ``any``, cumulative max / min / product
/ log-sum-exp, ``sort`` / ``argsort`` (ties kept in order) / ``median``, ``top_k``, scatters that
add, subtract, take the max, the min or the product, gathers at clamped constant indices, min
pooling, ``reduce_precision``, ``optimization_barrier``, interior padding and padding of 6 axes, on
a conv's output (stored NCHW in the ONNX graph) and on the input; LiteRT through
:mod:`lrjax.litert_math`'s rewrites."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import export, litert_math


class MathOps(nn.Module):

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3))(x)
        r, t = jnp.round(h), jnp.tanh(h)  # r: ties, +0 and -0
        out = {
            "trig": jnp.tan(t) + jnp.arcsin(0.9 * t) + jnp.arccos(0.9 * t) + jnp.arctan(h)
            + jnp.sinh(t) + jnp.cosh(t) + jnp.arcsinh(h) + jnp.arctanh(0.9 * t)
            + jnp.arccosh(1 + jnp.abs(h)),
            "atan2": jnp.arctan2(r, jnp.round(h[..., ::-1])) + jnp.arctan2(x[..., :1], x[..., 1:2]),
            "cbrt": jnp.cbrt(h),
            "finite": jnp.where(jnp.isfinite(1 / r), h, 0.0),
            "logic": (jnp.logical_xor(h > 0, r > 0) | ~(h < -1)).astype(jnp.float32),
            "invert": jnp.invert(jnp.argmax(h, -1)).astype(jnp.float32),
            "argmin": jnp.argmin(h, axis=1).astype(jnp.float32),
            "reductions": jnp.prod(t, axis=(1, 2)) + jnp.all(h > -2, axis=(1, 2))
            + jnp.any(h > 1, axis=(1, 2)),
            "cumulative": jax.lax.cummax(h, 1) + jax.lax.cummin(h, 2, reverse=True)
            + jax.lax.cumprod(t, 1),
            "dilated": jax.lax.pad(h, 0.5, [(0, 0, 0), (1, -1, 1), (0, 0, 2), (0, 0, 0)]),
            "dilated_input": jax.lax.pad(x, -1.0, [(0, 0, 0), (0, 0, 1), (2, 1, 1), (0, 0, 0)]),
        }
        out.update(sorted=jnp.sort(h, axis=1), argsort=jnp.argsort(r, axis=-1),
                   median=jnp.median(h, axis=-1), logsumexp=jax.nn.logsumexp(h, axis=-1),
                   top_k=jax.lax.top_k(h, 3)[0] + jax.lax.top_k(r + 0.0, 3)[1],  # ties, no -0
                   cumlogsumexp=jax.lax.cumlogsumexp(h, 2)
                   + jax.lax.cumlogsumexp(h, 1, reverse=True),
                   # repeated indices accumulate, one past the end is dropped; a segment sum
                   scatter_add=h.at[:, :, np.array([4, 0, 4, 9])].add(h[:, :, :4]),
                   segment_sum=jax.ops.segment_sum(jnp.swapaxes(h, 0, 2), np.arange(7) % 3, 3),
                   per_example=jax.vmap(lambda row, i: row.at[:, i].add(1.0))(  # batching axes
                       h, jnp.argmax(h[:, 0, :, 0], axis=-1)),
                   subtract=h.at[:, np.array([1, 1, 5])].subtract(h[:, :3]),
                   extremes=h.at[:, :, np.array([4, 0, 4, 9])].max(h[:, :, :4] * 3)
                   + h.at[:, np.array([1, 1, 5])].min(h[:, :3] - 1)
                   + h.at[:, np.array([2, 2])].multiply(h[:, :2] + 2),
                   segment_max=jax.ops.segment_max(jnp.swapaxes(h, 0, 2), np.arange(7) % 3, 3),
                   min_pool=jax.lax.reduce_window(h, jnp.inf, jax.lax.min, (1, 2, 3, 1),
                                                  (1, 1, 2, 1), "SAME"),
                   barrier=jax.lax.optimization_barrier((h, t))[1],
                   clipped=jnp.take(h, np.array([-1, 9, 3]), axis=2, mode="clip"),
                   percentiles=jnp.percentile(h, np.array([10.0, 90.0]), axis=-1),
                   # upfirdn2d's zero insertion (StyleGAN2's, score_sde's): a 6-D pad
                   zero_insert=jnp.pad(h.reshape(-1, 6, 1, 7, 1, 4), [(0, 0), (0, 0), (0, 1),
                                                                      (0, 0), (0, 1), (0, 0)]),
                   bfloat16=jax.lax.reduce_precision(x * 1.001, 8, 7),  # (rounding would
                   float16=jax.lax.reduce_precision(x * 0.999, 5, 10),  # magnify conv noise)
                   own_bits=jax.lax.reduce_precision(x * 0.998, 8, 23))
        return out


def _model():
    x = jax.random.normal(jax.random.key(0), (2, 6, 7, 3)) * 2
    model = MathOps()
    return model, model.init(jax.random.key(1), x), x


@pytest.mark.slow  # each primitive has its quick case in test_onnx_convert.CASES
def test_rarer_math_exports_to_onnx_and_matches_jax(tmp_path):
    model, variables, x = _model()
    path = str(tmp_path / "math.onnx")
    result = export.to_onnx(model, variables, x, path)
    assert result.checked_batches == (2, 3)
    want = model.apply(variables, x)
    session = export.onnx_session(path)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"input": np.asarray(x)}), strict=True))
    assert sorted(got) == sorted(want)  # one graph output per entry, by its key
    for key, value in want.items():
        np.testing.assert_allclose(got[key], np.asarray(value, np.float32), rtol=1e-5,
                                   atol=1e-5, err_msg=key)
    # the edge cases the inputs hold: ties, both zeros, the atan2 axes
    r = np.round(np.asarray(nn.Conv(4, (3, 3)).apply(
        {"params": variables["params"]["Conv_0"]}, x)))
    assert (r == 0).any() and np.signbit(r[r == 0]).any() and not np.signbit(r[r == 0]).all()
    assert (np.diff(np.sort(r, axis=-1), axis=-1) == 0).any()


@pytest.mark.slow
def test_rarer_math_exports_to_litert(tmp_path):
    model, variables, x = _model()
    result = export.to_tflite(model, variables, x, str(tmp_path / "math.tflite"))
    assert result.max_abs_error <= 1e-5 * max(1.0, result.scale)


def test_transposes_of_more_than_six_axes_are_written_for_litert_with_their_runs_merged():
    """LiteRT's TRANSPOSE takes 6 axes at most ("'tfl.transpose' op failed to verify that
    operand 0 is at most 6-D": swirl-dynamics' ViViT decoder unpatchifies ``(B, T, H, W, t, h,
    w, C)`` to ``(B, T, t, H, h, W, w, C)``): the same transpose of the view whose runs of axes
    it keeps together are merged; one with 7 runs is left as it is
    (:func:`lrjax.litert_math.merged_transpose`)."""
    x = jax.random.normal(jax.random.key(3), (2, 2, 3, 2, 2, 1, 3, 4))
    for permutation, merged in (((0, 1, 4, 2, 5, 3, 6, 7), 6), ((1, 0, 2, 3, 4, 5, 7, 6), 5),
                                ((0, 2, 4, 6, 1, 3, 5, 7), None)):
        (eqn,) = jax.make_jaxpr(lambda x, p=permutation: jnp.transpose(x, p))(x).eqns
        rewritten = litert_math.rewrite(eqn, (x,))
        if merged is None:
            assert rewritten is None
            continue
        np.testing.assert_array_equal(rewritten[0], jnp.transpose(x, permutation))
        traced = jax.make_jaxpr(lambda x, e=eqn: litert_math.rewrite(e, (x,)))(x)
        assert [len(e.params["permutation"]) for e in traced.eqns
                if e.primitive.name == "transpose"] == [merged]


class Unpatchify(nn.Module):
    """A video net's decoder in short: a pointwise conv to ``t * h * w * C`` features per token,
    then its patches put back in place by an 8-D transpose."""

    @nn.compact
    def __call__(self, x):
        b, t, h, w, _ = x.shape
        y = nn.Conv(2 * 2 * 2 * 3, (1, 1, 1))(x).reshape(b, t, h, w, 2, 2, 2, 3)
        return jnp.transpose(y, (0, 1, 4, 2, 5, 3, 6, 7)).reshape(b, 2 * t, 2 * h, 2 * w, 3)


@pytest.mark.slow  # (a LiteRT conversion)
def test_an_unpatchifying_video_decoder_exports_to_litert(tmp_path):
    model, x = Unpatchify(), jax.random.normal(jax.random.key(4), (2, 2, 3, 3, 8))
    variables = model.init(jax.random.key(0), x)
    result = export.to_tflite(model, variables, (x,), str(tmp_path / "unpatchify.tflite"))
    assert result.max_abs_error <= 1e-5 * max(1.0, result.scale)


def test_pads_of_more_than_five_axes_are_written_for_litert_with_their_unpadded_runs_merged():
    """LiteRT's PAD takes 5 axes at most: a 6-D pad (upfirdn2d's zero insertion) is the same pad
    on the view whose runs of unpadded axes are merged; one with 6 padded runs is left as it is
    (:func:`lrjax.litert_math.merged_pad`)."""
    x = jax.random.normal(jax.random.key(2), (2, 3, 1, 4, 1, 5))
    for config, merged in (([(0, 0, 0), (0, 0, 0), (0, 1, 0), (0, 0, 0), (0, 1, 0), (0, 0, 0)], 5),
                           ([(1, 0, 0), (0, 0, 0), (0, 2, 1), (0, 0, 0), (0, 0, 0), (0, 0, 0)], 4),
                           ([(1, 0, 0), (0, 1, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (2, 0, 0)], None)):
        (eqn,) = jax.make_jaxpr(lambda x, c=config: jax.lax.pad(x, 0.5, c))(x).eqns
        rewritten = litert_math.rewrite(eqn, (x, jnp.float32(0.5)))
        if merged is None:
            assert rewritten is None
            continue
        np.testing.assert_array_equal(rewritten[0], jax.lax.pad(x, 0.5, config))
        traced = jax.make_jaxpr(lambda x, e=eqn: litert_math.rewrite(e, (x, jnp.float32(0.5))))(x)
        pads = [e for e in traced.eqns if e.primitive.name == "pad"]
        assert [len(e.params["padding_config"]) for e in pads] == [merged]
