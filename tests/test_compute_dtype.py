"""Models computing in bfloat16 or float16, exported: ``compute_dtype=jnp.float32``
(:func:`lrjax.replay.in_float32`) and the exports' check at the model's own precision."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import export, replay

pytest.importorskip("onnxruntime")


class HalfNet(nn.Module):
    """A small net computing in ``dtype`` (float32 parameters, as Flax's ImageNet example's
    ``half_precision`` builds its ResNet): conv, batch norm, exact GELU, a scan, a data-dependent
    ``jnp.where``, a ``lax.cond`` and a ``while_loop`` (``branches``; ONNX translates neither)
    and a dense head."""

    dtype: object = jnp.bfloat16
    branches: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Conv(8, (1, 1), dtype=self.dtype, name="pointwise")(x)

        def body(carry, column):  # over the channels
            return carry * 0.5 + column, carry

        carry, _ = jax.lax.scan(body, jnp.zeros_like(x[:, 0, 0, 0]), x.mean((1, 2)).T)
        x = jnp.where(x > 0, x, 0.125 * x) + carry[:, None, None, None]
        if self.branches:
            x = jax.lax.cond(carry.mean() > 0, lambda v: v * 2, lambda v: v - 1, x)
            x = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.75),
                                   (0, x))[1]
        return nn.Dense(5, dtype=self.dtype, name="head")(x.mean((1, 2)))


@functools.cache
def _half_net():
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    variables = HalfNet().init(jax.random.key(0), x)
    return x, variables


def test_in_float32_computes_as_the_float32_copy_at_any_batch():
    x, v = _half_net()
    half = functools.partial(HalfNet().apply, v)
    single = functools.partial(HalfNet(dtype=jnp.float32).apply, v)
    upcast = replay.in_float32(half)
    assert half(x).dtype == jnp.bfloat16
    got, want = upcast(x), single(x)
    assert got.dtype == jnp.float32
    # the float32 copy's outputs, up to the constants the trace holds in bfloat16 (GELU's
    # 1/sqrt(2); the others here are exact in bfloat16): far closer than the bfloat16 model's own
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got - want)))
    assert err < 2e-3 * scale
    assert err < 0.2 * float(np.max(np.abs(np.asarray(half(x), np.float32) - want)))
    # no bfloat16 value left anywhere, loops and conditionals included; the batch symbolic
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 8, 8, 3"), jnp.float32)
    jaxpr = jax.make_jaxpr(upcast)(spec)
    assert replay.lowest_precision(jax.make_jaxpr(half)(x)) == jnp.bfloat16
    assert replay.lowest_precision(jaxpr) is None
    assert str(jaxpr.out_avals[0].shape[0]) == "b"
    kinds = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert {"scan", "cond", "while"} <= kinds


def test_in_float32_keeps_float16_models_layers_and_other_dtypes():
    x, v = _half_net()
    half = functools.partial(HalfNet(dtype=jnp.float16).apply, v)
    upcast = replay.in_float32(lambda x: (half(x), jnp.argmax(half(x), -1)))
    logits, top = upcast(x)
    assert logits.dtype == jnp.float32 and top.dtype == jnp.int32
    want = HalfNet(dtype=jnp.float32).apply(v, x)
    np.testing.assert_allclose(logits, want, atol=2e-3 * float(np.max(np.abs(want))))
    # each equation keeps its layer: what names layers from name stacks still can
    stacks = {str(e.source_info.name_stack) for e in jax.make_jaxpr(upcast)(x).jaxpr.eqns}
    assert {"HalfNet/conv", "HalfNet/head"} <= {"/".join(s.split("/")[:2]) for s in stacks}


def test_in_float32_refuses_reinterpreted_bits():
    def bits(x):
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.int16)

    with pytest.raises(replay.ReplayError, match="bitcast_convert_type reinterprets a "
                                                 "bfloat16 value's bits as int16"):
        replay.in_float32(bits)(np.ones((2, 3), np.float32))


@functools.cache
def _decomposed_half():
    """A low-rank HalfNet (``speedup:1.5``, its pointwise conv and head split too)."""
    x, v = _half_net()
    done = lrjax.decompose_linen(HalfNet(branches=False), v, x, rule="speedup:1.5", train=False)
    return done.module, done.variables, x


def test_to_onnx_of_a_bfloat16_model_needs_and_takes_compute_dtype(tmp_path):
    module, variables, x = _decomposed_half()
    path = str(tmp_path / "half.onnx")
    with pytest.raises(export.ExportError, match=r"computes in bfloat16.*compute_dtype=jnp\."
                                                 r"float32"):
        export.to_onnx(module, variables, x, path, train=False)
    with pytest.raises(export.ExportError, match="compute_dtype must be None .* or float32; "
                                                 "got 'int8'"):
        export.to_onnx(module, variables, x, path, train=False, compute_dtype="int8")
    result = export.to_onnx(module, variables, x, path, train=False, compute_dtype=jnp.float32)
    assert result.checked_batches == (2, 3)
    assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale  # against JAX in float32
    session = export.onnx_session(path)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert got.dtype == np.float32
    # the bfloat16 model's outputs, to its own rounding
    half = np.asarray(module.apply(variables, x, train=False), np.float32)
    np.testing.assert_allclose(got, half, atol=2e-2 * float(np.max(np.abs(half))))


@pytest.mark.slow
def test_to_tflite_of_a_bfloat16_model_with_compute_dtype(tmp_path):
    pytest.importorskip("ai_edge_litert")
    module, variables, x = _decomposed_half()
    path = str(tmp_path / "half.tflite")
    with pytest.raises(export.ExportError, match=r"TFLite converter failed at layer .*computes "
                                                 r"in bfloat16.*compute_dtype=jnp\.float32"):
        export.to_tflite(module, variables, x, path, train=False)
    result = export.to_tflite(module, variables, x, path, train=False,
                              compute_dtype=jnp.float32)
    assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale


@pytest.mark.slow  # (2-3 s)
def test_stablehlo_of_a_bfloat16_model_is_checked_at_its_own_precision(tmp_path):
    """The deserialized artifact rounds bfloat16 where its own compilation does, not where
    JAX's did: the check allows 4 units of bfloat16 rounding (a float32 tolerance refused an
    exact export of Flax's ImageNet ResNet-18 with ``dtype=jnp.bfloat16``)."""
    module, variables, x = _decomposed_half()
    result = export.to_stablehlo(module, variables, x, str(tmp_path / "half.stablehlo"),
                                 train=False)
    assert result.checked_batches == (2, 3)
    assert result.max_abs_error <= 4 * 2.0 ** -7 * result.scale
    assert export._tolerance(lambda x: module.apply(variables, x, train=False), [x]) == (
        2.0 ** -5, " (the model computes in bfloat16)")
    single = HalfNet(dtype=jnp.float32, branches=False)
    assert export._tolerance(lambda x: single.apply(_half_net()[1], x), [x]) == (
        export.RTOL, "")


def test_nnx_bfloat16_model_exported_in_float32(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 16, (3, 3), dtype=jnp.bfloat16, rngs=rngs)
            self.fc = nnx.Linear(16, 4, dtype=jnp.bfloat16, rngs=rngs)

        def __call__(self, x):
            return self.fc(nnx.relu(self.conv(x)).mean((1, 2)))

    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    model = lrjax.decompose_nnx(Net(nnx.Rngs(0)), x, rule="speedup:1.5").module
    result = export.to_onnx(model, None, x, str(tmp_path / "nnx.onnx"),
                            compute_dtype=np.float32)
    assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale
