"""Linen modules an NNX model runs through ``nnx.bridge.ToNNX`` (Flax's migration path; FlaxDiff
wraps diffusers' linen VAE so): their layers found, costed, calibrated and split as layers of the
NNX model (:mod:`lrjax.nnx_bridge`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import export
from tests.helpers import lowered_flops

X = jax.random.normal(jax.random.key(0), (4, 12, 12, 3))


class LinenBlock(nn.Module):
    """A linen block as a user would write it: a conv, batch norm on running statistics, a
    dense layer over channels."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(32, (3, 3))(x)))
        return nn.Dense(32)(x)


class Bridged(nnx.Module):
    """An NNX net with a linen block and a bare linen layer inside ``ToNNX`` wrappers."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 32, (3, 3), rngs=rngs)
        self.block = nnx.bridge.ToNNX(LinenBlock(), rngs=rngs)
        self.proj = nnx.bridge.ToNNX(nn.Dense(48), rngs=rngs)
        self.head = nnx.Linear(48, 10, rngs=rngs)

    def __call__(self, x):
        x = self.proj(self.block(nnx.relu(self.stem(x))))
        return self.head(x.mean((1, 2)))


def bridged(seed: int = 0) -> Bridged:
    model = nnx.bridge.lazy_init(Bridged(nnx.Rngs(seed)), X)
    for _, variable in nnx.iter_graph(model):  # batch statistics that are not 0 and 1
        if isinstance(variable, nnx.BatchStat):
            shape = variable[...].shape
            variable[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), shape) + (
                1.0 if variable[...].mean() > 0.5 else 0.0)
    return model


def _relative(a, b) -> float:
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_linen_layers_inside_to_nnx_are_split_as_layers_of_the_net(tmp_path):
    """Before: a ``ToNNX`` wrapper was listed as one layer left as it is ("lrjax does not reach
    into the bridge"), its work a fixed cost: ``speedup:2`` out of reach."""
    model = bridged()
    y = model(X)
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(model, X)}
    assert {"stem", "block/Conv_0", "block/Dense_0", "proj", "head"} <= set(found)
    assert all(found[p].candidate for p in ("block/Conv_0", "block/Dense_0", "proj"))
    assert "block" not in found

    full = lrjax.decompose_nnx(model, X, rule={"block/Conv_0": 96, "block/Dense_0": 32,
                                               "proj": 32})
    assert _relative(full.module(X), y) < 1e-5
    state = nnx.state(full.module.block)
    assert state["Conv_0"]["vertical"]["kernel"][...].shape == (3, 1, 32, 96)
    assert state["Conv_0"]["horizontal"]["kernel"][...].shape == (1, 3, 96, 32)
    assert "kernel" not in state["Conv_0"] and "BatchNorm_0" in state
    assert nnx.state(full.module.proj)["vertical"]["kernel"][...].shape == (32, 32)
    assert nnx.state(model.block)["Conv_0"]["kernel"][...].shape == (3, 3, 32, 32)  # untouched

    data_free = lrjax.decompose_nnx(model, X, rule="speedup:2")
    before, after = data_free.report.net_flops
    assert before * len(X) == pytest.approx(lowered_flops(lambda m, x: m(x), model, X), rel=1e-6)
    assert after * len(X) == pytest.approx(lowered_flops(lambda m, x: m(x), data_free.module, X),
                                           rel=1e-6)
    assert before / after >= 2.0
    assert {p for p, r in data_free.ranks.items() if r is not None} & {
        "block/Conv_0", "block/Dense_0", "proj"}

    calibration = jax.random.normal(jax.random.key(5), (64, 12, 12, 3))
    ranks = {"block/Conv_0": 6, "block/Dense_0": 8, "proj": 8}
    calibrated = lrjax.decompose_nnx(model, X, rule=ranks, calibration=calibration)
    assert not [n for n in calibrated.report.notes if "data-free" in n]
    plain = lrjax.decompose_nnx(model, X, rule=ranks)
    held_out = jax.random.normal(jax.random.key(6), (16, 12, 12, 3))
    assert _relative(calibrated.module(held_out), model(held_out)) < \
        0.8 * _relative(plain.module(held_out), model(held_out))

    onnx_result = export.to_onnx(data_free.module, None, (X,), str(tmp_path / "b.onnx"))
    assert onnx_result.max_abs_error <= export.ATOL + export.RTOL * onnx_result.scale

    lrjax.save_decomposed(str(tmp_path / "saved"), data_free)
    loaded = lrjax.load_decomposed(str(tmp_path / "saved"), bridged(seed=3), X)
    np.testing.assert_allclose(loaded(X), data_free.module(X), rtol=1e-5, atol=1e-6)


class Autoencoder(nn.Module):
    """A linen model with ``encode`` and ``decode`` methods (diffusers' VAE has them)."""

    def setup(self):
        self.down = nn.Conv(32, (3, 3), strides=(2, 2))
        self.up = nn.ConvTranspose(16, (2, 2), strides=(2, 2))

    def encode(self, x):
        return self.down(x)

    def decode(self, z):
        return self.up(z)


class Encoded(nnx.Module):
    """An NNX net calling its wrapper's ``encode`` and ``decode`` (FlaxDiff's latent DiT wraps
    diffusers' linen VAE so), and a bare linen conv twice."""

    def __init__(self, rngs):
        self.vae = nnx.bridge.lazy_init(nnx.bridge.ToNNX(Autoencoder(), rngs=rngs), X,
                                        method=Autoencoder.encode)
        nnx.bridge.lazy_init(self.vae, jnp.ones((1, 6, 6, 32)), method=Autoencoder.decode)
        self.twice = nnx.bridge.lazy_init(nnx.bridge.ToNNX(nn.Conv(32, (3, 3)), rngs=rngs),
                                          jnp.ones((1, 6, 6, 32)))
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        z = self.twice(nnx.relu(self.twice(self.vae.encode(x))))
        return self.head(nnx.relu(self.vae.decode(z)).mean((1, 2)))


def test_a_wrappers_methods_and_repeated_calls_are_split_over_every_call(tmp_path):
    """Before: the wrapper was listed as one layer left as it is; the first version of the
    bridge took one call of a wrapper only."""
    model = Encoded(nnx.Rngs(0))
    y = model(X)
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(model, X)}
    assert all(found[p].candidate for p in ("vae/down", "vae/up", "twice", "head"))
    full = lrjax.decompose_nnx(model, X, rule={"vae/down": 9, "vae/up": 32, "twice": 96})
    assert _relative(full.module(X), y) < 1e-5

    calibration = jax.random.normal(jax.random.key(1), (32, 12, 12, 3))
    ranks = {"vae/down": 4, "vae/up": 8, "twice": 12}
    calibrated = lrjax.decompose_nnx(model, X, rule=ranks, calibration=calibration)
    assert not [n for n in calibrated.report.notes if "data-free" in n]
    plain = lrjax.decompose_nnx(model, X, rule=ranks)
    held_out = jax.random.normal(jax.random.key(6), (16, 12, 12, 3))
    assert _relative(calibrated.module(held_out), model(held_out)) < \
        _relative(plain.module(held_out), model(held_out))
    for result in (calibrated, lrjax.decompose_nnx(model, X, rule="speedup:2")):
        before, after = result.report.net_flops
        assert before * len(X) == pytest.approx(lowered_flops(lambda m, x: m(x), model, X),
                                                rel=1e-6)
        assert after * len(X) == pytest.approx(lowered_flops(lambda m, x: m(x), result.module, X),
                                               rel=1e-6)
    onnx_result = export.to_onnx(calibrated.module, None, (X,), str(tmp_path / "e.onnx"))
    assert onnx_result.max_abs_error <= export.ATOL + export.RTOL * onnx_result.scale
