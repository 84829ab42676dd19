"""Dense layers written by hand in linen (:mod:`lrjax.linen_written`): a module of the user's own
computing ``x @ kernel + bias`` with its own ``self.param`` runs as ``nn.Dense`` over the same
variables (``x @ kernel.T + bias``, PyTorch's ``(out, in)`` layout, as an ``nn.Einsum``), so it is
found, costed, calibrated and split as one; a module computing anything else (an activation) runs
its own code around its product (:mod:`lrjax.linen_products`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import export, surgery


class Linear(nn.Module):
    """A hand-written dense layer, bias optional (as many linen codebases write their own)."""
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1],
                                                                        self.features))
        y = jnp.matmul(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return y


class LowPrecisionDense(nn.Module):
    """Parameters stored in bfloat16, ``lax.dot_general`` of the float32 input with them (as
    TPU-minded codebases write their own ``Dense``)."""
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                            jnp.bfloat16)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y + self.param("bias", nn.initializers.normal(0.1), (self.features,),
                              jnp.bfloat16)


class SetupLinear(nn.Module):
    """The same with its parameters declared in ``setup``: its own code runs, its product as an
    ``nn.Dense`` without bias (:mod:`lrjax.linen_products`; its bias added by its own code)."""
    features_in: int
    features: int

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(),
                                 (self.features_in, self.features))
        self.bias = self.param("bias", nn.initializers.normal(0.1), (self.features,))

    def __call__(self, x):
        return x @ self.kernel + self.bias


class Activated(Linear):
    """Holds a kernel and a bias, computes ``tanh(x @ kernel + bias)``: not a dense layer."""

    def __call__(self, x):
        return jnp.tanh(super().__call__(x))


class TorchStyle(nn.Module):
    """A ``(out, in)`` kernel used as ``x @ kernel.T``, as PyTorch stores a linear layer's."""
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.features, self.features))
        return x @ kernel.T


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``FlaxConv1D``, written as it is: a ``(features, C)`` kernel transposed
    into ``lax.dot_general``, the input cast to its dtype, a bias."""
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs, self.dtype)
        kernel = self.param("kernel", nn.initializers.normal(0.02), (self.features,
                                                                       inputs.shape[-1]))
        kernel = jnp.asarray(kernel.transpose(), self.dtype)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
        return y + jnp.asarray(self.param("bias", nn.initializers.normal(0.1),
                                          (self.features,)), self.dtype)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x)).mean((1, 2))
        x = nn.relu(Linear(48, name="fc1")(x))
        x = nn.relu(SetupLinear(48, 48, name="fc2")(x))
        x = nn.relu(Linear(48, use_bias=False, name="fc3")(x))
        x = nn.relu(LowPrecisionDense(48, name="bf16")(x))
        x = TorchStyle(48, name="torch")(Activated(48, name="act")(x))
        x = Conv1D(40, name="conv1d")(x[:, None, :])[:, 0]  # on (batch, tokens, C)
        return Linear(10, name="head")(x)


@pytest.fixture(scope="module")
def net():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    model = Net()
    return model, model.init(jax.random.key(1), x), x


def test_written_dense_layers_are_found_and_split_as_dense_layers(net):
    model, variables, x = net
    sites = {s.path: s for s in surgery.find_convs(model, x)}
    assert sorted(p for p, s in sites.items() if s.candidate) == [
        "Conv_0", "act", "bf16", "conv1d", "fc1", "fc2", "fc3", "head", "torch"]
    # its own code around its product (a tanh): the product as an nn.Dense without bias
    assert sites["fc2"].written and sites["act"].written and not sites["fc1"].written
    result = lrjax.decompose_linen(model, variables, x, rule={
        "fc1": 8, "fc3": 8, "bf16": 8, "torch": 8, "conv1d": 8})
    assert {p: result.report.kinds[p] for p in result.ranks} == dict.fromkeys(
        ("fc1", "fc3", "bf16", "torch", "conv1d"), "dense")
    shapes = jax.tree.map(jnp.shape, result.variables["params"])
    assert shapes["fc1"] == {"vertical": {"kernel": (16, 8)},
                             "horizontal": {"kernel": (8, 48), "bias": (48,)}}
    assert shapes["fc3"] == {"vertical": {"kernel": (48, 8)}, "horizontal": {"kernel": (8, 48)}}
    assert result.variables["params"]["bf16"]["vertical"]["kernel"].dtype == jnp.bfloat16
    # PyTorch's layout: the pair's factors in the usual (C, K), (K, N)
    assert shapes["torch"] == {"vertical": {"kernel": (48, 8)}, "horizontal": {"kernel": (8, 48)}}
    assert shapes["conv1d"] == {"vertical": {"kernel": (48, 8)},
                                "horizontal": {"kernel": (8, 40), "bias": (40,)}}
    assert shapes["act"] == {"kernel": (48, 48), "bias": (48,)}  # not chosen: as they are
    assert "left as is" not in result.report.table()


def test_full_rank_written_pairs_reproduce_the_model(net):
    model, variables, x = net
    result = lrjax.decompose_linen(model, variables, x,
                                   rule={"fc1": 16, "fc3": 48, "head": 10, "torch": 48,
                                         "conv1d": 40})  # (bf16's factors
    # are stored in bfloat16: rounded as an nn.Dense's with param_dtype=jnp.bfloat16 would be)
    np.testing.assert_allclose(result.module.apply(result.variables, x), model.apply(variables, x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_calibrated_whole_net_rule_is_xlas_ratio_and_exports(net, tmp_path):
    model, variables, x = net
    calibration = jax.random.normal(jax.random.key(2), (32, 8, 8, 3))
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5",
                                   calibration=calibration)
    assert {"fc1", "fc3"} & set(result.ranks)
    def lowered(m, v):  # XLA's own count of the forward pass, as lowered
        return jax.jit(lambda x: m.apply(v, x)).lower(x).cost_analysis()["flops"]

    # (XLA's lowered count leaves out the bias adds after a conv or a dense product, which
    # lrjax counts: 1,034 flops per example in both nets of this toy, 1.5% of it)
    assert result.report.speedup == pytest.approx(
        lowered(model, variables) / lowered(result.module, result.variables), rel=0.02)
    done = export.to_onnx(result.module, result.variables, x, str(tmp_path / "written.onnx"))
    assert done.checked_batches == (4, 5) and done.max_abs_error <= 1e-5 * max(1.0, done.scale)


class Clipped(nn.Module):
    """A dense layer that clips its kernel when trained (``__call__(x, train=False)``)."""
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1],
                                                                        self.features))
        return x @ (jnp.clip(kernel, -0.1, 0.1) if train else kernel)


class ClippedNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        layer = Clipped(16, name="clipped")
        return layer(x, train=True) if train else layer(x)


def test_a_split_written_layer_called_otherwise_is_a_clear_error():
    """Split on its one-array call, a written layer called with other arguments (its training
    path) cannot run its own code: one error naming it, not Flax's missing-parameter error."""
    model, x = ClippedNet(), jax.random.normal(jax.random.key(0), (4, 24))
    variables = model.init(jax.random.key(1), x)
    result = lrjax.decompose_linen(model, variables, x, rule={"clipped": 4})
    result.module.apply(result.variables, x)
    with pytest.raises(ValueError, match="'clipped' was split as the product of its kernel"):
        result.module.apply(result.variables, x, train=True)
