"""Habits of models ported from PyTorch (timm-style Flax ports such as jax-models' VAN, PVT,
Swin, SegFormer, MAE, PatchConvNet): stochastic-depth rates read with ``.item()`` inside
``__call__``, the inference flag passed positionally (``model.apply(v, x, True)``), a variable
set to ``None``, randomness drawn at inference, a parameter shaped by the batch, code that
computes with the batch size or is written for one (a DiT's ``reshape(self.batch_size, ...)``),
an embedding lookup of class labels, random masking (MAE), and kernels computed from parameters
with TensorFlow run eagerly (FlexiViT). Each is decomposed, calibrated and exported as it is
written."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx

import lrjax
from lrjax import export
from lrjax.linen_trace import compile_time_constants
from tests.helpers import normal

X = normal(0, (2, 8, 8, 3))
CALIB = normal(1, (6, 8, 8, 3))


class DropPath(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x, deterministic):
        if deterministic or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.make_rng("drop_path"), 1 - self.rate, (x.shape[0],))
        return x * keep[:, None, None, None] / (1 - self.rate)


class Block(nn.Module):
    dim: int
    drop_path: float

    @nn.compact
    def __call__(self, x, deterministic):
        mask = self.variable("attention_mask", "mask", lambda: None)  # Swin's unshifted blocks
        assert mask.value is None
        y = nn.Conv(self.dim, (3, 3), name="conv")(nn.LayerNorm()(x))
        y = nn.Dense(self.dim * 2, name="fc1")(nn.gelu(y))
        y = nn.Dense(self.dim, name="fc2")(nn.gelu(y))
        return x + DropPath(self.drop_path)(y, deterministic)


class StochasticDepthNet(nn.Module):
    """A timm-style stage stack: the rates are concrete values computed in ``__call__``."""
    depths: tuple = (2, 1)
    dims: tuple = (16, 24)
    drop_path: float = 0.1

    @nn.compact
    def __call__(self, x, deterministic=None):
        dpr = [r.item() for r in jnp.linspace(0, self.drop_path, sum(self.depths))]
        k = 0
        for depth, dim in zip(self.depths, self.dims, strict=True):
            x = nn.Conv(dim, (2, 2), strides=2)(x)
            for _ in range(depth):
                x = Block(dim, dpr[k])(x, deterministic)
                k += 1
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def _variables(model, *args, **kwargs):
    """``model.init``, compiled with its constants evaluated (eagerly, every initializer of a
    model reading ``.item()`` compiles op by op: 8 s for this file's nets)."""
    rngs = {"params": jax.random.key(0), "drop_path": jax.random.key(1)}
    arrays = [a for a in args if hasattr(a, "shape")]
    static = tuple(1 + i for i, a in enumerate(args) if not hasattr(a, "shape"))
    with compile_time_constants():
        init = jax.jit(lambda r, *a: model.init(r, *a, **kwargs), static_argnums=static)
        return init(rngs, *args) if static else init(rngs, *arrays)


def _run(model, variables, x):
    """``model.apply(variables, x, True)`` compiled (eagerly, each op of a model that reads
    ``.item()`` would compile on its own), its constants evaluated as lrjax traces it."""
    with compile_time_constants():
        return jax.jit(lambda v, x: model.apply(v, x, True))(variables, x)


def _lowered_flops(fn, *args) -> float:
    with compile_time_constants():  # the model's .item(): as lrjax traces it
        return jax.jit(fn).lower(*args).cost_analysis()["flops"]


@pytest.mark.slow
def test_item_of_constants_in_call_is_traced_decomposed_calibrated_and_exported(tmp_path):
    """``[r.item() for r in jnp.linspace(...)]`` cannot run under ``jax.jit``; lrjax traces such
    a model with its constant-only computations evaluated, so it is decomposed (the flag given
    positionally, calibration batches of the images alone), costed as XLA counts it, and
    exported with a symbolic batch (StableHLO takes the same route: ``benchmarks.public_models``
    checks LiteRT too)."""
    model = StochasticDepthNet()
    variables = _variables(model, X, True)
    assert variables["attention_mask"]["Block_0"]["mask"] is None
    with pytest.raises(jax.errors.ConcretizationTypeError):
        jax.jit(lambda v, x: model.apply(v, x, True))(variables, X)
    free = lrjax.decompose_linen(model, variables, X, True, rule="speedup:1.5")
    calibrated = lrjax.decompose_linen(model, variables, X, True, rule="speedup:1.5",
                                       calibration=CALIB)
    as_tuple = lrjax.decompose_linen(model, variables, X, True, rule="speedup:1.5",
                                     calibration=(CALIB, True))
    assert calibrated.report.ranks == as_tuple.report.ranks
    for a, b in zip(jax.tree.leaves(calibrated.variables), jax.tree.leaves(as_tuple.variables),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(calibrated.report.ranks) >= 2 and calibrated.report.speedup >= 1.5
    before = _lowered_flops(lambda v, x: model.apply(v, x, True), variables, X)
    after = _lowered_flops(lambda v, x: calibrated.module.apply(v, x, True),
                           calibrated.variables, X)
    assert calibrated.report.net_flops == (before / len(X), after / len(X))  # per example
    want = _run(model, variables, CALIB)
    err = [float(jnp.linalg.norm(_run(r.module, r.variables, CALIB) - want))
           for r in (free, calibrated)]
    assert err[1] < err[0]  # fitted to the calibration data it is measured on

    done = export.to_onnx(calibrated.module, calibrated.variables, X, str(tmp_path / "a.onnx"),
                          deterministic=True)
    assert done.checked_batches == (2, 3) and done.max_abs_error <= 1e-4 * done.scale


def test_a_value_of_the_data_in_python_control_flow_gets_one_line_naming_its_source_line():
    class Untraceable(nn.Module):
        @nn.compact
        def __call__(self, x):
            if jnp.mean(x) > 0:  # a value of the data: no trace can have it
                x = -x
            return nn.Dense(4)(x)

    x = jnp.ones((2, 3))
    for call in (lambda: lrjax.surgery.find_convs(Untraceable(), x),
                 lambda: lrjax.decompose_linen(Untraceable(), Untraceable().init(jax.random.key(0), -x), x,
                                               rule="speedup:1.5")):
        with pytest.raises(ValueError, match=r"^the model cannot be traced .* needs a concrete "
                                             r"value of a traced array at test_ported_models\.py"
                                             r":\d+ \(if jnp\.mean\(x\) > 0:"):
            call()


class WindowNet(nn.Module):
    """Swin's window partition: the batch size recovered by arithmetic on shapes."""
    window: int = 4

    @nn.compact
    def __call__(self, x, deterministic=True):
        b, h, w, c = x.shape
        assert self.variable("attention_mask", "mask", lambda: None).value is None
        x = nn.Conv(16, (3, 3))(x)
        n = (h // self.window) * (w // self.window)
        windows = x.reshape(b * n, self.window * self.window, 16)
        windows = nn.Dense(16, name="proj")(windows)
        batch = int(windows.shape[0] / n)
        return windows.reshape(batch, h, w, 16).mean((1, 2))


@pytest.mark.slow  # (2-3 s)
def test_code_computing_with_the_batch_size_exports_with_a_fixed_batch(tmp_path):
    """ONNX and StableHLO with ``fixed_batch=True`` (the symbolic batch's error says so), and
    LiteRT, whose batch is fixed, with a variable set to ``None`` among the converter's
    variables."""
    model = WindowNet()
    variables = _variables(model, X)
    result = lrjax.decompose_linen(model, variables, X, rule={"Conv_0": 4, "proj": 4})
    with pytest.raises(export.ExportError, match=r"^the model does not trace with a symbolic "
                                                 r"batch, which ONNX export keeps free: .*"
                                                 r"fixed_batch=True\)$"):
        export.to_onnx(result.module, result.variables, X, str(tmp_path / "a.onnx"))
    done = export.to_onnx(result.module, result.variables, X, str(tmp_path / "a.onnx"),
                          fixed_batch=True)
    assert done.checked_batches == (2,) and done.max_abs_error <= 1e-5 * max(done.scale, 1)
    import onnx

    dims = onnx.load(done.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 8, 8, 3]
    done = export.to_tflite(result.module, result.variables, X, str(tmp_path / "a.tflite"))
    assert done.max_abs_error <= 1e-5 * max(done.scale, 1)
    with pytest.raises(export.ExportError, match=r"which StableHLO export keeps free: .*"
                                                 r"fixed_batch=True\)$"):
        export.to_stablehlo(result.module, result.variables, X, str(tmp_path / "a.shlo"))
    done = export.to_stablehlo(result.module, result.variables, X, str(tmp_path / "a.shlo"),
                               fixed_batch=True)
    assert done.checked_batches == (2,) and done.max_abs_error <= 1e-5 * max(done.scale, 1)
    restored = jax.export.deserialize(bytearray(open(done.path, "rb").read()))
    assert restored.in_avals[0].shape == (2, 8, 8, 3)


class RandomMasking(nn.Module):
    """MAE's encoder: a random subset of the patches kept, at inference too."""
    @nn.compact
    def __call__(self, x):
        tokens = nn.Dense(16, name="embed")(x.reshape(x.shape[0], -1, x.shape[-1]))
        noise = jax.random.uniform(self.make_rng("noise"), tokens.shape[:2])
        keep = jnp.argsort(noise, axis=1)[:, : tokens.shape[1] // 2]
        tokens = jnp.take_along_axis(tokens, keep[..., None], axis=1)
        return nn.Dense(16, name="mlp")(nn.gelu(tokens))


def test_randomness_drawn_at_inference_is_given_as_the_calls_rngs():
    model = RandomMasking()
    rngs = {"noise": jax.random.key(7)}
    variables = model.init({"params": jax.random.key(0), **rngs}, X)
    with pytest.raises(ValueError, match=r"draws randomness \(Mask|draws randomness .*pass its "
                                         r"keys as the call's rngs=$"):
        lrjax.decompose_linen(model, variables, X, rule="speedup:1.5")
    result = lrjax.decompose_linen(model, variables, X, rule={"embed": 3, "mlp": 16},
                                   calibration=CALIB, rngs=rngs)
    assert result.report.ranks == {"embed": 3, "mlp": 16}
    want = model.apply(variables, X, rngs=rngs)
    got = result.module.apply(result.variables, X, rngs=rngs)
    assert got.shape == want.shape and float(jnp.linalg.norm(got - want)) < float(
        jnp.linalg.norm(want))


class Noised(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        return x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)


def test_draws_from_a_given_key_export_as_constants_at_a_fixed_batch(tmp_path):
    """The key given as the call's ``rngs=`` is a constant of the graph: its draws fold into
    constants where their shape is fixed; with a symbolic batch, one line naming the layer."""
    model, rngs = Noised(), {"noise": jax.random.key(3)}
    variables = model.init({"params": jax.random.key(0), **rngs}, X)
    with pytest.raises(export.ExportError, match=r"^cannot export primitive 'random_bits' "
                                                 r"\(layer <top level>\) to ONNX \(.*a random "
                                                 r"draw: export with fixed_batch=True\)"):
        export.to_onnx(model, variables, X, str(tmp_path / "n.onnx"), rngs=rngs)
    done = export.to_onnx(model, variables, X, str(tmp_path / "n.onnx"), rngs=rngs,
                          fixed_batch=True)
    assert done.max_abs_error <= 1e-5 * max(done.scale, 1)


class MaskedAutoencoder(nn.Module):
    """jax-models' MAE: patches shuffled by random noise at inference, the kept ones gathered
    with ``jnp.take_along_axis``, restored in the decoder; returns the prediction and the mask
    (which depends on the key alone)."""
    @nn.compact
    def __call__(self, x):
        tokens = nn.Dense(16, name="embed")(x.reshape(x.shape[0], -1, x.shape[-1]))
        batch, length, dim = tokens.shape
        noise = jax.random.uniform(self.make_rng("noise"), (batch, length))
        shuffle = jnp.argsort(noise, axis=1)
        restore = jnp.argsort(shuffle, axis=1)
        kept = jnp.take_along_axis(tokens, jnp.tile(shuffle[:, : length // 4, None], (1, 1, dim)),
                                   axis=1)
        kept = nn.Dense(16, name="encoder")(nn.gelu(kept))
        mask_tokens = jnp.zeros((batch, length - length // 4, dim))
        full = jnp.take_along_axis(jnp.concatenate([kept, mask_tokens], axis=1),
                                   jnp.tile(restore[..., None], (1, 1, dim)), axis=1)
        mask = jnp.take_along_axis(jnp.ones((batch, length)).at[:, : length // 4].set(0),
                                   restore, axis=1)
        return nn.Dense(3, name="decoder")(full), mask


@pytest.mark.slow  # 5 s: two exports of a ViT
def test_a_masked_autoencoder_exports_at_a_fixed_batch_to_onnx_and_litert(tmp_path):
    """Its draws fold into constants (ONNX and LiteRT, whose converter has no unsigned multiply
    for the draw), the gathers at indices along a batching axis are ONNX ``GatherND``, and the
    mask is an output of constants; with a symbolic batch, one line asking for a fixed one."""
    model, rngs = MaskedAutoencoder(), {"noise": jax.random.key(5)}
    variables = model.init({"params": jax.random.key(0), **rngs}, X)
    with pytest.raises(export.ExportError, match=r"^cannot export primitive 'random_bits' .*"
                                                 r"export with fixed_batch=True\)"):
        export.to_onnx(model, variables, X, str(tmp_path / "m.onnx"), rngs=rngs)
    result = lrjax.decompose_linen(model, variables, X, rule={"encoder": 4, "decoder": 2},
                                   rngs=rngs)
    done = [export.to_onnx(module, values, X, str(tmp_path / "m.onnx"), rngs=rngs,
                           fixed_batch=True)
            for module, values in ((model, variables), (result.module, result.variables))]
    done.append(export.to_tflite(result.module, result.variables, X, str(tmp_path / "m.tflite"),
                                 rngs=rngs))
    assert all(d.max_abs_error <= 1e-5 * max(d.scale, 1) for d in done)


class ClassToken(nn.Module):
    """A class token created with the batch in its shape (PatchConvNet, MPViT)."""
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3))(x).reshape(x.shape[0], -1, 16)
        token = self.param("cls_token", nn.initializers.zeros, (x.shape[0], 1, 16))
        return nn.Dense(10)(jnp.concatenate([token, x], axis=1)[:, 0])


def test_a_parameter_shaped_by_the_batch_asks_for_calibration_batches_of_that_size():
    model = ClassToken()
    variables = _variables(model, X)
    with pytest.raises(ValueError, match=r"^the model does not run on calibration batch 0 "
                                         r"\(batch size 6\): .*cls_token.* give calibration "
                                         r"batches of the example call's size \(2\)"):
        lrjax.decompose_linen(model, variables, X, rule={"Conv_0": 4}, calibration=CALIB)
    result = lrjax.decompose_linen(model, variables, X, rule={"Conv_0": 4},
                                   calibration=[CALIB[:2], CALIB[2:4], CALIB[4:]])
    assert result.report.ranks == {"Conv_0": 4}


def test_nnx_calibration_takes_the_images_alone_when_the_call_has_a_flag():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.head = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x, doubled):
            x = nnx.relu(self.conv(x))
            return self.head((x * 2 if doubled else x).mean((1, 2)))

    results = [lrjax.decompose_nnx(Net(nnx.Rngs(0)), X, True, rule={"conv": 4, "head": 3},
                                   calibration=c) for c in (CALIB, (CALIB, True))]
    for a, b in zip(jax.tree.leaves(nnx.state(results[0].module)),
                    jax.tree.leaves(nnx.state(results[1].module)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_an_nnx_model_reading_item_in_call_is_costed_whole_and_calibrated_traced():
    """The NNX twin of the first test: its whole-net cost (it fell back to the layers' count)
    and its calibration pass (it ran op by op) are traced with the constants evaluated."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.convs = nnx.List([nnx.Conv(3, 16, (3, 3), rngs=rngs),
                                   nnx.Conv(16, 16, (3, 3), rngs=rngs)])
            self.head = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            dpr = [r.item() for r in jnp.linspace(0, 0.1, 2)]
            for conv, rate in zip(self.convs, dpr, strict=True):
                x = nnx.relu(conv(x)) * (1 - rate)
            return self.head(x.mean((1, 2)))

    model = Net(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule="speedup:1.5", calibration=CALIB)
    graphdef, state = nnx.split(model)
    low_graphdef, low_state = nnx.split(result.module)
    before = _lowered_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, X)
    after = _lowered_flops(lambda s, x: nnx.merge(low_graphdef, s)(x), low_state, X)
    assert result.report.net_flops == (before / len(X), after / len(X))
    assert result.report.speedup >= 1.5


class LabelConditioned(nnx.Module):
    """A DiT's habits: class labels looked up in an ``nnx.Embed``, the output reshaped with the
    batch size it was configured for."""
    def __init__(self, batch_size, rngs):
        self.batch_size = batch_size
        self.embed = nnx.Embed(10, 16, rngs=rngs)
        self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x, labels):
        h = self.conv(x) * (1 + self.embed(labels)[:, None, None, :])
        return self.out(h).reshape(self.batch_size, h.shape[1] * h.shape[2] * 4)


def test_an_embedding_of_labels_exports_and_a_one_batch_model_says_fixed_batch(tmp_path):
    labels = jnp.array([3, 9])
    model = LabelConditioned(len(X), nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, labels, rule={"conv": 4, "out": 2})
    with pytest.raises(export.ExportError, match=r"^the model does not run on a batch of 3 \(the "
                                                 r"export is checked on the example's batch and "
                                                 r"one more\): .*fixed_batch=True$"):
        export.to_onnx(result.module, None, (X, labels), str(tmp_path / "a.onnx"))
    done = export.to_onnx(result.module, None, (X, labels), str(tmp_path / "a.onnx"),
                          fixed_batch=True)
    assert done.checked_batches == (2,) and done.max_abs_error <= 1e-5 * max(done.scale, 1)
    free = LabelConditioned(-1, nnx.Rngs(0))  # reshape(-1, ...): any batch
    done = export.to_onnx(free, None, (X, labels), str(tmp_path / "b.onnx"))
    assert done.checked_batches == (2, 3) and done.max_abs_error <= 1e-5 * max(done.scale, 1)


def test_layers_calibrated_on_fewer_vectors_than_inputs_are_named_in_the_report():
    """A DiT's conditioning MLP sees one vector per example: calibrated on six examples, its
    16-wide layer is named; the conv (a vector per pixel) is not."""
    class Conditioned(nn.Module):
        @nn.compact
        def __call__(self, x):
            scale = nn.Dense(16, name="adaln")(x.mean((1, 2)) @ jnp.ones((3, 16)))
            return nn.Conv(16, (3, 3), name="conv")(x) * scale[:, None, None, :]

    model = Conditioned()
    variables = _variables(model, X)
    result = lrjax.decompose_linen(model, variables, X, rule={"adaln": 2, "conv": 4},
                                   calibration=CALIB)
    assert [n for n in result.report.notes if "fewer input vectors" in n] == [
        "calibrated on fewer input vectors than inputs (directions the calibration data does "
        "not span are kept only through a small regulariser: give more examples): adaln "
        "(6 for 16)"]
    many = jnp.concatenate([CALIB] * 3)
    assert not any("fewer input vectors" in n for n in lrjax.decompose_linen(
        model, variables, X, rule={"adaln": 2, "conv": 4}, calibration=many).report.notes)


def test_nnx_layers_calibrated_on_fewer_vectors_than_inputs_are_named_too():
    class Conditioned(nnx.Module):
        def __init__(self, rngs):
            self.adaln = nnx.Linear(3, 16, rngs=rngs)
            self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)

        def __call__(self, x):
            return self.conv(x) * self.adaln(x.mean((1, 2)))[:, None, None, :]

    result = lrjax.decompose_nnx(Conditioned(nnx.Rngs(0)), X, rule={"adaln": 2, "conv": 4},
                                 calibration=CALIB[:2])
    assert [n.split(": ")[-1] for n in result.report.notes if "fewer input vectors" in n] == [
        "adaln (2 for 3)"]


class FlexiStyle(nn.Module):
    """big_vision's FlexiViT patch embedding: a 4×4 kernel resampled to 2×2 by a constant matrix
    built with TensorFlow run eagerly (``tf.image.resize(...).numpy()``), as its own
    ``lax.conv``; then a 1×1 conv whose kernel is a product of two parameters (``u @ v``, wider
    than its factors) plus a bias, and a dense head."""
    @nn.compact
    def __call__(self, x):
        import tensorflow as tf

        basis = np.eye(16, dtype=np.float32).reshape(16, 4, 4, 1)
        resize = tf.image.resize(tf.constant(basis), (2, 2), method="bilinear").numpy()
        kernel = self.param("kernel", nn.initializers.normal(0.2), (4, 4, x.shape[-1], 16))
        small = jnp.tensordot(np.linalg.pinv(resize.reshape(16, 4)), kernel.reshape(16, -1),
                              axes=1).reshape(2, 2, x.shape[-1], 16)
        dn = ("NHWC", "HWIO", "NHWC")
        x = jax.lax.conv_general_dilated(x, small, (2, 2), "VALID", dimension_numbers=dn)
        u = self.param("u", nn.initializers.normal(0.3), (16, 2))
        v = self.param("v", nn.initializers.normal(0.3), (2, 16))
        x = jax.lax.conv_general_dilated(nn.relu(x), (u @ v).reshape(1, 1, 16, 16), (1, 1),
                                         "VALID", dimension_numbers=dn)
        x = x + self.param("bias", nn.initializers.normal(0.1), (16,))
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def test_kernels_computed_from_parameters_export_to_onnx_and_litert(tmp_path):
    """A product of constants that does not widen (the resampled kernel) is folded into the
    conv's weight; one that does (``u @ v``) stays a product in the graph, and the conv after it
    keeps its bias (before: a ``KeyError`` from folding it into a weight that is not stored).
    LiteRT traces the model before TensorFlow's ``tf.function`` (before: "'SymbolicTensor' object
    has no attribute 'numpy'")."""
    model = FlexiStyle()
    variables = model.init(jax.random.key(0), X)
    result = lrjax.decompose_linen(model, variables, X, rule={"head": 4})
    for module, values in ((model, variables), (result.module, result.variables)):
        done = export.to_onnx(module, values, X, str(tmp_path / "f.onnx"))
        assert done.max_abs_error <= 1e-5 * max(done.scale, 1)
    graph = onnx.load(str(tmp_path / "f.onnx")).graph
    stored = {t.name: tuple(t.dims) for t in graph.initializer}
    weights = [stored.get(n.input[1]) for n in graph.node if n.op_type == "Conv"]
    assert weights[0] == (16, 3, 2, 2) and weights[1] is None  # folded; u @ v computed
    assert any(n.op_type == "MatMul" and all(i in stored for i in n.input) for n in graph.node)
    done = export.to_tflite(result.module, result.variables, X, str(tmp_path / "f.tflite"))
    assert done.max_abs_error <= 1e-5 * max(done.scale, 1)


def _posemb_at(posemb, coords):
    """NaFlex's posemb lookup (without its resize of the grid to each image's): gathered at each
    patch's (row, column), the coordinates padded with a 0 for the features (an indexed axis
    taken whole)."""
    numbers = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0, 1),
                                             start_index_map=(0, 1, 2))
    return jax.vmap(lambda at: jax.lax.gather(posemb, jnp.pad(at, [[0, 0], [0, 1]]), numbers,
                                              (1, 1, posemb.shape[-1]), mode="fill"))(coords)


class NaFlexStyle(nn.Module):
    """big_vision's NaFlex ViT (SigLIP 2): one positional argument, the tuple ``(patches, types,
    rows, columns)`` of a batch of images of their own patch grids padded to one length; returns
    the logits and a dict holding them again."""
    @nn.compact
    def __call__(self, image):
        patches, types, rows, columns = image
        tokens = nn.Dense(16, name="embedding")(patches)
        posemb = self.param("pos_embedding", nn.initializers.normal(0.5), (4, 4, 16))
        coords = jnp.stack([rows, columns], axis=-1)
        x = tokens + _posemb_at(posemb, coords)
        x = nn.Dense(16, name="mlp")(nn.gelu(x))
        keep = (types == 1)[..., None]
        logits = nn.Dense(10, name="head")(jnp.sum(x * keep, axis=1) / jnp.sum(keep, axis=1))
        return logits, {"logits": logits, "tokens": x}


def _naflex_batch(key, n):
    """``n`` images of 2×3 and 3×3 patches (of 12 values), padded to 10 tokens."""
    types, rows, columns = (np.zeros((n, 10), np.int32) for _ in range(3))
    for i in range(n):
        h, w = (2, 3) if i % 2 else (3, 3)
        types[i, :h * w] = 1
        rows[i, :h * w], columns[i, :h * w] = np.divmod(np.arange(h * w), w)
    return (jax.random.normal(key, (n, 10, 12)), jnp.asarray(types), jnp.asarray(rows),
            jnp.asarray(columns))


@pytest.mark.slow
def test_a_model_taking_one_tuple_is_calibrated_and_exported(tmp_path):
    """Calibration batches are the tuple itself (before: read as four positional arguments);
    the export's graph takes one input per array of it (before: the tuple could not be an
    example input, and traced as a constant); the per-image posemb lookup at coordinates of the
    data is ONNX ``GatherND`` with a symbolic batch; LiteRT's outputs keep their places when an
    array is returned twice (the converter names both places once)."""
    model = NaFlexStyle()
    image = _naflex_batch(jax.random.key(0), 2)
    variables = jax.jit(model.init)(jax.random.key(0), image)
    result = lrjax.decompose_linen(model, variables, image, rule={"embedding": 6, "mlp": 8},
                                   calibration=[_naflex_batch(jax.random.key(k), 4)
                                                for k in (1, 2)])
    assert not any("data-free" in n for n in result.report.notes)
    want = model.apply(variables, image)[0]
    got = result.module.apply(result.variables, image)[0]
    assert float(jnp.linalg.norm(got - want)) < 0.5 * float(jnp.linalg.norm(want))
    done = [export.to_onnx(result.module, result.variables, (image,), str(tmp_path / "n.onnx")),
            export.to_tflite(result.module, result.variables, (image,),
                             str(tmp_path / "n.tflite"))]
    assert done[0].checked_batches == (2, 3)
    assert all(d.max_abs_error <= 1e-5 * max(d.scale, 1) for d in done)
    graph = onnx.load(str(tmp_path / "n.onnx")).graph
    assert len(graph.input) == 4 and "GatherND" in {n.op_type for n in graph.node}


class WithPositionCode(nn.Module):
    """SAM 2's image encoder returns its features and their sine position code, which depends on
    the features' shape alone: an output of constants with the batch in its shape."""
    @nn.compact
    def __call__(self, x):
        features = nn.Conv(8, (3, 3))(x)
        rows = jnp.sin(jnp.arange(features.shape[1], dtype=jnp.float32))[None, :, None, None]
        return features, jnp.broadcast_to(rows, features.shape)


def test_an_output_of_constants_with_the_batch_in_its_shape_exports_with_a_symbolic_batch(
        tmp_path):
    model = WithPositionCode()
    variables = model.init(jax.random.key(0), X)
    done = export.to_onnx(model, variables, X, str(tmp_path / "p.onnx"))  # before: its shape
    assert done.checked_batches == (2, 3) and done.max_abs_error <= 1e-6  # had batch 1
