"""A decomposed model saved and loaded in a later process's terms (the model's code, a folder):
the same outputs, linen and NNX, as decomposed or after fine-tuning, with no decomposition on
loading; folders of another model or API refused; written atomically, replaced only when asked
and only if lrjax wrote them."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import checkpoint, decompose
from tests.helpers import apply, init, normal


class Net(nn.Module):
    """Convs, batch norm, a scanned stack (ranks per iteration) and a dense head."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
        x = nn.Conv(24, (3, 3), strides=2, kernel_init=nn.with_partitioning(
            nn.initializers.lecun_normal(), (None, None, None, "model")))(x)

        class Step(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return nn.relu(nn.Dense(24)(h)), None

        x, _ = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="stack")(x, None)
        return nn.Dense(10, name="head")(x.mean((1, 2)))


class NetNNX(nnx.Module):
    def __init__(self, rngs):
        self.convs = nnx.List([nnx.Conv(3, 16, (3, 3), rngs=rngs),
                               nnx.Conv(16, 24, (3, 3), strides=2, rngs=rngs)])
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(24, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.convs[0](x)))
        return self.head(self.drop(self.convs[1](x)).mean((1, 2)))


X = normal(0, (2, 12, 12, 3))


def _no_svd(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading decomposed a layer")

    for name in ("spectra_and_factors", "decompose_net", "vh_decompose"):
        monkeypatch.setattr(decompose, name, refuse)


def test_a_linen_model_saved_and_loaded_computes_the_same(tmp_path, monkeypatch):
    model = Net()
    variables = init(model, 0, X)
    result = lrjax.decompose_linen(model, variables, X, rule="speedup:1.5")
    assert result.ranks.get("stack/Dense_0")  # a scanned layer split (3 iterations)
    path = lrjax.save_decomposed(str(tmp_path / "net_lr"), result)
    assert sorted(os.listdir(path)) == [checkpoint.DECOMPOSED_MARKER, "variables"]
    with monkeypatch.context() as patch:
        _no_svd(patch)
        module, loaded = lrjax.load_decomposed(path, Net(), X)
    np.testing.assert_array_equal(apply(module, loaded, X), apply(result.module,
                                                                  result.variables, X))
    tuned = jax.tree.map(lambda v: v * 1.01, jax.tree.map(np.asarray, result.variables))
    lrjax.save_decomposed(path, result, tuned, overwrite=True)  # after fine-tuning
    module, loaded = lrjax.load_decomposed(path, Net())
    np.testing.assert_allclose(apply(module, loaded, X), apply(result.module, tuned, X),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="holds a linen model; this model is nnx"):
        lrjax.load_decomposed(path, NetNNX(nnx.Rngs(0)), X)

    class Other(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(10, name="head")(nn.Conv(8, (3, 3))(x).mean((1, 2)))

    with pytest.raises(ValueError):  # another model's variables: named by check_variables
        lrjax.load_decomposed(path, Other(), X)


def test_an_nnx_model_saved_and_loaded_computes_the_same(tmp_path, monkeypatch):
    model = NetNNX(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"convs/0": 4, "convs/1": 8, "head": 3})
    trained = result.module
    trained.head.horizontal.bias.set_value(trained.head.horizontal.bias[...] + 0.5)  # "tuned"
    trained.norm.mean.set_value(trained.norm.mean[...] + 0.1)  # running statistics too
    trained(X)  # a training-mode call: its dropout stream moves (not saved)
    path = lrjax.save_decomposed(str(tmp_path / "nnx_lr"), result)
    with monkeypatch.context() as patch:
        _no_svd(patch)
        loaded = lrjax.load_decomposed(path, NetNNX(nnx.Rngs(1)), X)
    loaded.eval()
    trained.eval()
    np.testing.assert_array_equal(loaded(X), trained(X))
    assert type(loaded.head) is type(trained.head) and loaded.head.kernel.shape == (24, 10)
    with pytest.raises(ValueError, match="give its example call"):
        lrjax.load_decomposed(path, NetNNX(nnx.Rngs(1)))

    class Smaller(nnx.Module):
        def __init__(self, rngs):
            self.convs = nnx.List([nnx.Conv(3, 16, (3, 3), rngs=rngs)])
            self.head = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            return self.head(self.convs[0](x).mean((1, 2)))

    with pytest.raises(ValueError, match="saved from another model: this one has no decomposable "
                                         "layer 'convs/1'"):
        lrjax.load_decomposed(path, Smaller(nnx.Rngs(0)), X)


def test_folders_are_written_atomically_and_replaced_only_when_asked(tmp_path):
    model = Net()
    result = lrjax.decompose_linen(model, init(model, 0, X), X, rule={"Conv_0": 4})
    path = lrjax.save_decomposed(str(tmp_path / "a"), result)
    with pytest.raises(checkpoint.CheckpointError, match="exists; pass overwrite=True"):
        lrjax.save_decomposed(path, result)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(checkpoint.CheckpointError, match="refusing to replace"):
        lrjax.save_decomposed(str(mine), result, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(checkpoint.CheckpointError, match="suffix '.npz'"):
        lrjax.save_decomposed(str(tmp_path / "b.npz"), result)
    with pytest.raises(checkpoint.CheckpointError, match="not a decomposed model lrjax saved"):
        lrjax.load_decomposed(str(mine), model)
    with pytest.raises(ValueError, match="a variable dict of the low-rank model; got NetNNX"):
        lrjax.save_decomposed(str(tmp_path / "c"), result, NetNNX(nnx.Rngs(0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "mine"]  # nothing half-written


def test_a_stacked_nnx_layer_is_rebuilt_per_iteration(tmp_path):
    """``nnx.scan`` over ``nnx.vmap``-made blocks: the pairs' stacked factors rebuilt as saved."""
    from tests.test_rules import NNXScanned

    x = jax.random.normal(jax.random.key(1), (4, 256))
    result = lrjax.decompose_nnx(NNXScanned(nnx.Rngs(0)), x,
                                 rule={"blocks/down": 48, "blocks/up": 48, "inp": 32})
    loaded = lrjax.load_decomposed(lrjax.save_decomposed(str(tmp_path / "s"), result),
                                   NNXScanned(nnx.Rngs(5)), x)
    assert loaded.blocks.down.vertical.kernel[...].shape == (3, 256, 16)
    np.testing.assert_array_equal(loaded(x), result.module(x))


class Kinds(nnx.Module):
    """A pair of every NNX kind: transposed convs (either kernel layout), an einsum, a grouped
    conv, a 3-D conv."""

    def __init__(self, rngs):
        self.up = nnx.ConvTranspose(3, 8, (3, 3), strides=(2, 2), rngs=rngs)
        self.upk = nnx.ConvTranspose(8, 8, (3, 3), transpose_kernel=True, rngs=rngs)
        self.mix = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=rngs)
        self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=4, rngs=rngs)
        self.video = nnx.Conv(8, 8, (3, 3, 3), rngs=rngs)

    def __call__(self, x):
        h = self.grouped(self.upk(self.up(x)))
        t = self.mix(h.reshape(h.shape[0], -1, 8))
        return t.mean((1, 2, 3)) + self.video(h[:, None].repeat(3, 1)).mean((1, 2, 3, 4))


def test_every_kind_of_nnx_pair_is_rebuilt(tmp_path):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    result = lrjax.decompose_nnx(Kinds(nnx.Rngs(0)), x, rule={
        "up": 4, "upk": 4, "mix": 4, "grouped": 8, "video": 8})
    loaded = lrjax.load_decomposed(lrjax.save_decomposed(str(tmp_path / "k"), result),
                                   Kinds(nnx.Rngs(3)), x)
    np.testing.assert_array_equal(loaded(x), result.module(x))
