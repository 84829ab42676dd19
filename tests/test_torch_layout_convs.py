"""Convs written by hand in another layout than Flax's (a PyTorch port's ``NCHW`` data and
``OIHW`` weight, ``lax.conv``'s default), linen and NNX: split as Flax's conv on the kernel
transposed to ``HWIO`` (:func:`lrjax.written_products.product_of`), the data transposed to
channels last and the output back around the pair; were their own code's products before."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import costs, export
from tests.helpers import init, lowered_flops, normal

X = normal(1, (4, 3, 16, 16))  # NCHW
HELD_OUT = normal(2, (16, 3, 16, 16))


def _conv(x, weight, stride, groups):
    pad = weight.shape[-1] // 2
    return jax.lax.conv_general_dilated(x, weight, (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        feature_group_count=groups)


class TorchConv(nn.Module):
    """linen, compact: a ``weight`` ``(out, in / groups, kh, kw)`` and a ``bias``."""
    features: int
    k: int = 3
    stride: int = 1
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(0.3),
                       (self.features, x.shape[1] // self.groups, self.k, self.k))
        b = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return _conv(x, w, self.stride, self.groups) + b[None, :, None, None]


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(TorchConv(16)(x))
        x = nn.relu(TorchConv(32, stride=2)(x))
        x = nn.relu(TorchConv(32, groups=4)(x))
        return nn.Dense(10)(x.mean((2, 3)))


class TorchConv2d(nnx.Module):
    """NNX, as a PyTorch port writes ``nn.Conv2d``."""

    def __init__(self, cin, cout, k, stride=1, groups=1, *, rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (cout, cin // groups, k, k))
                                / np.sqrt(cin * k * k / groups))
        self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (cout,)))
        self.stride, self.groups = stride, groups

    def __call__(self, x):
        return _conv(x, self.weight[...], self.stride, self.groups) + \
            self.bias[...][None, :, None, None]


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.convs = nnx.List([TorchConv2d(3, 16, 3, rngs=rngs),
                               TorchConv2d(16, 32, 3, stride=2, rngs=rngs),
                               TorchConv2d(32, 32, 3, groups=4, rngs=rngs)])
        self.fc = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.fc(x.mean((2, 3)))


def _full(found):
    return {s.path: costs.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
            for s in found if s.candidate}


@pytest.mark.parametrize("calibrated", [pytest.param(False, marks=pytest.mark.slow), True])
def test_linen_torch_layout_convs_split_as_flax_convs(calibrated, tmp_path):
    model = LinenNet()
    variables = init(model, 0, X)
    found = lrjax.surgery.find_convs(model, X)
    assert [(s.path, s.candidate, s.shape.kernel_shape) for s in found[:3]] == [
        ("TorchConv_0", True, (3, 3, 3, 16)), ("TorchConv_1", True, (3, 3, 16, 32)),
        ("TorchConv_2", True, (3, 3, 8, 32))]  # (HWIO, as the pair's factors are stored)
    calibration = [HELD_OUT] if calibrated else None
    full = lrjax.decompose_linen(model, variables, X, rule=_full(found), calibration=calibration)
    np.testing.assert_allclose(full.module.apply(full.variables, HELD_OUT),
                               model.apply(variables, HELD_OUT), rtol=1e-4, atol=1e-5)
    result = lrjax.decompose_linen(model, variables, X, rule="speedup:2", calibration=calibration)
    split = result.variables["params"]["TorchConv_1"]
    assert set(split) == {"bias", "vertical", "horizontal"} and "weight" not in split
    flops = [lowered_flops(lambda v, x, m=m: m.apply(v, x), v, X)
             for m, v in ((model, variables), (result.module, result.variables))]
    assert flops[0] / flops[1] == pytest.approx(result.report.speedup, rel=1e-6)
    if calibrated:
        done = export.to_onnx(result.module, result.variables, (X,), str(tmp_path / "l.onnx"))
        assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale


def test_nnx_torch_layout_convs_split_save_and_load(tmp_path):
    model = NNXNet(nnx.Rngs(0))
    found = lrjax.nnx_surgery.find_convs_nnx(model, X)
    assert [s.path for s in found] == ["convs/0/weight", "convs/1/weight", "convs/2/weight",
                                       "fc"]
    assert found[2].shape.groups == 4 and found[2].shape.kernel_shape == (3, 3, 8, 32)
    full = lrjax.decompose_nnx(model, X, rule=_full(found), calibration=[HELD_OUT])
    np.testing.assert_allclose(full.module(HELD_OUT), model(HELD_OUT), rtol=1e-4, atol=1e-5)
    result = lrjax.decompose_nnx(model, X, rule="speedup:2", calibration=[HELD_OUT])
    assert {"convs/1/weight", "convs/2/weight"} & set(result.ranks)
    flops = []
    for m in (model, result.module):
        graphdef, state = nnx.split(m)
        flops.append(lowered_flops(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, X))
    assert flops[0] / flops[1] == pytest.approx(result.report.speedup, rel=1e-6)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(result.module))}
    split = next(p for p in ("convs/1/weight", "convs/2/weight") if p in result.ranks)
    assert {f"{split}/vertical/kernel", f"{split}/horizontal/kernel"} <= paths
    assert "convs/1/bias" in paths
    done = export.to_onnx(result.module, None, (X,), str(tmp_path / "n.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
    path = lrjax.save_decomposed(str(tmp_path / "saved"), result)
    loaded = lrjax.load_decomposed(path, NNXNet(nnx.Rngs(1)), X)
    np.testing.assert_allclose(loaded(X), result.module(X), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(result.module(X) - model(X)).max()) > 0  # (a real split)
