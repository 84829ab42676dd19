"""A kernel normalized by statistics of its own parameter before its product
(:mod:`lrjax.reparametrized`): weight standardization written by hand, as diffusion U-Nets
ported from lucidrains' PyTorch code write it (yiyixuxu/denoising-diffusion-flax's
``WeightStandardizedConv``: a parentless ``nn.Conv`` applied with ``conv.apply`` on the
standardized kernel), or inline before ``lax.conv_general_dilated`` / a matmul; weight
normalization by hand, a gain times the kernel over its norm (Hugging Face's wav2vec2
positional conv: ``weight_g``, ``weight_v`` declared in ``setup`` beside the ``nn.Conv`` it
applies with them). The product is a layer of the module, its closed form the normalized
kernel's, the gain gone with the kernel; a kernel masked by a constant, or normalized with a
parameter used elsewhere too, stays the module's own code."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lrjax
from lrjax import decompose, reparametrized, surgery
from tests.helpers import init, lowered_flops, normal, whole_net_rule


def standardized(kernel):
    """Over every axis but the last. ``jnp.var`` is a jitted function: lrjax's replay of the
    module calls it as written (inlined, its ``ddof`` a constant, XLA's count of the model
    read 67 flops lower than its own code's, 1.8e-5 of this net's ratio)."""
    axes = tuple(range(kernel.ndim - 1))
    mean = jnp.mean(kernel, axis=axes, keepdims=True)
    return (kernel - mean) / jnp.sqrt(jnp.var(kernel, axis=axes, keepdims=True) + 1e-5)


class AppliedApart(nn.Module):
    """denoising-diffusion-flax's ``WeightStandardizedConv`` (unet.py at d09e271), in short."""
    features: int

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(self.features, (3, 3), padding=1, parent=None)
        kernel = self.param("kernel", lambda rng, x: conv.init(rng, x)["params"]["kernel"], x)
        bias = self.param("bias", lambda rng, x: conv.init(rng, x)["params"]["bias"], x)
        return conv.apply({"params": {"kernel": standardized(kernel), "bias": bias}}, x)


class Inline(nn.Module):
    """The same standardization before ``lax.conv_general_dilated``, in a PyTorch layout."""
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(), (self.features, x.shape[1], 3, 3))
        w = standardized(w.transpose(2, 3, 1, 0)).transpose(3, 2, 0, 1)  # (over C, kh, kw)
        return lax.conv_general_dilated(x, w, (1, 1), "SAME") + self.param(
            "b", nn.initializers.zeros, (self.features, 1, 1))


class GainNormed(nn.Module):
    """Weight normalization as Hugging Face's ``FlaxWav2Vec2WeightNormConv1D`` writes it
    (modeling_flax_wav2vec2.py, transformers 4.46), in 2-D: ``weight_v`` in PyTorch's
    ``(out, in, kh, kw)`` layout and its per-channel gain ``weight_g`` declared in ``setup``
    beside the conv applied with their product."""
    features: int
    in_features: int = 24

    def setup(self):
        self.conv = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)
        self.weight_v = self.param("weight_v", nn.initializers.lecun_normal(),
                                   (self.features, self.in_features, 3, 3))
        self.weight_g = self.param("weight_g", nn.initializers.ones, (self.features, 1, 1, 1))
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

    def __call__(self, x):
        norm = jnp.sqrt(jnp.sum(self.weight_v ** 2, axis=(1, 2, 3), keepdims=True))
        kernel = (self.weight_g * self.weight_v / norm).transpose(2, 3, 1, 0)
        return self.conv.apply({"params": {"kernel": kernel}}, x) + self.bias


class StandardizedDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return x @ standardized(w)


class Net(nn.Module):
    conv: type

    @nn.compact
    def __call__(self, x):
        if self.conv is Inline:  # (NCHW around it, as a PyTorch port runs it)
            x = Inline(24, name="a")(x.transpose(0, 3, 1, 2))
            x = Inline(24, name="b")(nn.relu(x)).transpose(0, 2, 3, 1)
        elif self.conv is GainNormed:
            x = GainNormed(24, 8, name="a")(x)
            x = GainNormed(24, name="b")(nn.relu(x))
        else:
            x = self.conv(24, name="a")(x)
            x = self.conv(24, name="b")(nn.relu(x))
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return StandardizedDense(10, name="head")(x)


X = normal(1, (2, 12, 12, 8))
CALIBRATION = normal(2, (6, 12, 12, 8))


def used_kernel(conv, params):
    """The HWIO kernel a layer of ``Net(conv)`` computes with, from its stored parameters."""
    if conv is GainNormed:
        v = params["weight_v"]
        norm = jnp.sqrt(jnp.sum(v ** 2, axis=(1, 2, 3), keepdims=True))
        return (params["weight_g"] * v / norm).transpose(2, 3, 1, 0)
    return standardized(params["kernel"] if conv is AppliedApart else
                        params["weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("conv", [AppliedApart, Inline, GainNormed])
def test_a_normalized_kernel_is_a_layer_split_by_its_normalized_closed_form(conv, tmp_path):
    """Before: the applied-apart convs listed as "applied inside another layer with the
    parameters that layer gives it", the inline one (and the dense head) left as the module's
    own code: no layer of the net could be split. A ``setup`` module holding the conv it
    applies names its layer by its kernel (``b/weight_v``), the pair in that variable's place
    and its gain gone."""
    model = Net(conv)
    variables = init(model, 0, X)
    a, b = ("a/weight_v", "b/weight_v") if conv is GainNormed else ("a", "b")
    found = {s.path: s for s in surgery.find_convs(model, X)}
    assert set(found) == {a, b, "head"} and all(s.candidate for s in found.values())
    assert found[b].shape.kernel_shape == (3, 3, 24, 24) and found["head"].kind == "dense"

    free, fitted, _ = whole_net_rule(model, variables, X, {b: 6, "head": 4}, CALIBRATION,
                                     tmp_path)
    assert fitted.ranks == {b: 6, "head": 4} and not fitted.report.skipped
    params = fitted.variables["params"]  # (the kernel and its gain replaced by the pair)
    if conv is GainNormed:
        assert set(params["b"]) == {"weight_v", "bias"}
        assert set(params["b"]["weight_v"]) == {"vertical", "horizontal"}
    else:
        assert set(params["b"]) == {"vertical", "horizontal", "b" if conv is Inline else "bias"}
    assert set(params["head"]) == {"vertical", "horizontal"}
    assert set(params["a"]) == set(variables["params"]["a"])  # (kept full: as it was)

    # data-free: the pair is the closed form of the kernel the layer uses, normalized
    used = used_kernel(conv, variables["params"]["b"])
    pair = free.variables["params"]["b"]
    pair = pair["weight_v"] if conv is GainNormed else pair
    np.testing.assert_allclose(
        decompose.reconstruct(pair["vertical"]["kernel"], pair["horizontal"]["kernel"]),
        decompose.reconstruct(*decompose.vh_decompose(used, 6)), atol=1e-5)

    top = {p: decompose.max_rank(found[p].shape.kernel_shape) for p in found}
    exact = lrjax.decompose_linen(model, variables, X, rule=top, calibration=CALIBRATION)
    np.testing.assert_allclose(exact.module.apply(exact.variables, X), model.apply(variables, X),
                               rtol=1e-4, atol=1e-4)
    assert jax.tree.map(jnp.shape, fitted.module.init(jax.random.key(3), X)) == \
        jax.tree.map(jnp.shape, fitted.variables)


class Masked(nn.Module):
    """A causal (PixelCNN-style) conv: its kernel masked by a constant, no statistic of it."""

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], 16))
        mask = np.ones((3, 3, 1, 1), np.float32)
        mask[2:], mask[1, 2:] = 0, 0
        return lax.conv_general_dilated(x, k * mask, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class SharedGain(nn.Module):
    """Weight normalization by hand, ``g * v / |v|``, whose gain also scales the output: the
    pair could not take the gain's place."""

    @nn.compact
    def __call__(self, x):
        v = self.param("v", nn.initializers.lecun_normal(), (x.shape[-1], 16))
        g = self.param("g", nn.initializers.ones, (16,))
        return x @ (g * v / jnp.linalg.norm(v, axis=0)) * g


@pytest.mark.parametrize("layer", [Masked, SharedGain])
def test_a_kernel_masked_or_normalized_with_a_parameter_read_elsewhere_stays_its_own_code(layer):
    """A pair would not keep a mask's zeros (the net's causality), nor take the place of a gain
    the module's code reads besides."""
    x = normal(3, (2, 8, 8, 4))
    found = {s.path: s for s in surgery.find_convs(layer(), x)}
    assert not any(s.candidate for s in found.values())
    with pytest.raises(ValueError, match="no layer this rule can decompose.*own code multiplies the data"):
        lrjax.decompose_linen(layer(), init(layer(), 0, x), x, rule="speedup:1.2")


def test_the_reparametrization_is_the_code_between_the_parameter_and_its_product():
    def call(x, w, b):
        return jnp.tanh(x @ standardized(w) + b)

    closed = jax.make_jaxpr(call)(jnp.ones((2, 6)), jnp.ones((6, 5)), jnp.ones(5))
    x, w, b = closed.jaxpr.invars
    value, step, chain = reparametrized.reparametrization(closed, w)
    assert step.primitive.name == "reparametrization" and chain[0][0].invars[chain[0][1]] is w
    kernel = normal(4, (6, 5))
    np.testing.assert_allclose(step(kernel), standardized(kernel), rtol=1e-6)
    assert reparametrized.reparametrization(closed, b) is None  # (no statistic of it)
    twice = jax.make_jaxpr(lambda x, w: (x @ standardized(w), jnp.sum(w ** 2)))(
        jnp.ones((2, 6)), jnp.ones((6, 5)))  # (its norm also an output: two uses)
    assert reparametrized.reparametrization(twice, twice.jaxpr.invars[1]) is None


class NormedTranspose(nn.Module):
    """A transposed conv applied apart on its kernel over the kernel's norm times a scalar gain
    initialized to that norm (a public diffusion U-Net's ``WeightStandardizedConvTranspose``)."""

    @nn.compact
    def __call__(self, x):
        conv = nn.ConvTranspose(16, (4, 4), strides=(2, 2), parent=None)
        kernel = self.param("kernel", lambda rng, x: conv.init(rng, x)["params"]["kernel"], x)
        norm = jnp.linalg.norm(kernel)
        gain = self.param("norm", lambda _, shape: jnp.full(shape, norm), ())
        bias = self.param("bias", lambda rng, x: conv.init(rng, x)["params"]["bias"], x)
        return conv.apply({"params": {"kernel": gain * kernel / norm, "bias": bias}}, x)


class Upsampler(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (3, 3))(nn.relu(NormedTranspose(name="up")(x)))


def test_a_weight_normalized_transposed_conv_applied_apart_is_split_and_its_gain_goes():
    x = normal(5, (2, 6, 6, 16))
    model = Upsampler()
    variables = init(model, 0, x)
    found = {s.path: s for s in surgery.find_convs(model, x)}
    assert found["up"].candidate and found["up"].kind == "transposed" and set(found) == {
        "up", "Conv_0"}  # (the ConvTranspose it applies is its product, not listed apart)
    result = lrjax.decompose_linen(model, variables, x, rule={"up": 4})
    assert set(result.variables["params"]["up"]) == {"vertical", "horizontal", "bias"}
    assert result.report.speedup == pytest.approx(
        lowered_flops(model.apply, variables, x)
        / lowered_flops(result.module.apply, result.variables, x), rel=1e-6)
    exact = lrjax.decompose_linen(model, variables, x, rule={
        "up": decompose.max_rank(found["up"].shape.kernel_shape)})
    np.testing.assert_allclose(exact.module.apply(exact.variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


class FlippedTranspose(nn.Module):
    """A PyTorch ``ConvTranspose2d`` port: its ``(in, out, kh, kw)`` weight flipped by
    ``jnp.flip`` (a jitted helper) and transposed, then an input-dilated conv."""

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(), (x.shape[-1], 8, 3, 3))
        kernel = jnp.flip(w, (2, 3)).transpose(2, 3, 0, 1)
        return lax.conv_general_dilated(x, kernel, (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_a_jitted_step_to_a_kernel_stays_a_step_while_a_jitted_statistic_stays_a_call():
    """Jitted helpers computing statistics (``jnp.var``) are replayed as calls, as XLA counts
    the code as written (the tests above); ``jnp.flip`` on a kernel's way to its product is a
    step of that product, inlined (kept as a call, the layer was lost)."""
    x = normal(6, (2, 5, 5, 16))
    model = FlippedTranspose()
    variables = init(model, 0, x)
    (site,) = surgery.find_convs(model, x)
    assert site.candidate and site.kind == "transposed"
    exact = lrjax.decompose_linen(model, variables, x, rule={
        site.path: decompose.max_rank(site.shape.kernel_shape)})
    np.testing.assert_allclose(exact.module.apply(exact.variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
