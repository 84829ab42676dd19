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
from tests.helpers import lowered_flops, normal

X = normal(0, (4, 12, 12, 3))


class LinenBlock(nn.Module):
    """A linen block as a user would write it: a conv, batch norm on running statistics, a
    dense layer over channels."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(32, (3, 3))(x)))
        return nn.Dense(32)(x)


class LinenDot(nn.Module):
    """The Flax bridge guide's linen module: its own parameter and product."""

    out_dim: int

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.out_dim))


class Bridged(nnx.Module):
    """An NNX net with a linen block, a bare linen layer and a linen module of its own inside
    ``ToNNX`` wrappers."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 32, (3, 3), rngs=rngs)
        self.block = nnx.bridge.ToNNX(LinenBlock(), rngs=rngs)
        self.proj = nnx.bridge.ToNNX(nn.Dense(48), rngs=rngs)
        self.dot = nnx.bridge.ToNNX(LinenDot(48), rngs=rngs)
        self.head = nnx.Linear(48, 10, rngs=rngs)

    def __call__(self, x):
        x = self.dot(nnx.relu(self.proj(self.block(nnx.relu(self.stem(x))))))
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


@pytest.mark.slow  # 5 s on the 2-core machine: the default run stays under 5 minutes
def test_linen_layers_inside_to_nnx_are_split_as_layers_of_the_net(tmp_path):
    """Before: a ``ToNNX`` wrapper was listed as one layer left as it is ("lrjax does not reach
    into the bridge"), its work a fixed cost: ``speedup:2`` out of reach."""
    model = bridged()
    y = model(X)
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(model, X)}
    assert {"stem", "block/Conv_0", "block/Dense_0", "proj", "dot", "head"} <= set(found)
    assert all(found[p].candidate for p in ("block/Conv_0", "block/Dense_0", "proj", "dot"))
    assert "block" not in found

    full = lrjax.decompose_nnx(model, X, rule={"block/Conv_0": 96, "block/Dense_0": 32,
                                               "proj": 32, "dot": 48})
    assert _relative(full.module(X), y) < 1e-5
    state = nnx.state(full.module.block)
    assert state["Conv_0"]["vertical"]["kernel"][...].shape == (3, 1, 32, 96)
    assert state["Conv_0"]["horizontal"]["kernel"][...].shape == (1, 3, 96, 32)
    assert "kernel" not in state["Conv_0"] and "BatchNorm_0" in state
    assert nnx.state(full.module.proj)["vertical"]["kernel"][...].shape == (32, 32)
    assert nnx.state(full.module.dot)["horizontal"]["kernel"][...].shape == (48, 48)
    assert nnx.state(model.block)["Conv_0"]["kernel"][...].shape == (3, 3, 32, 32)  # untouched
    # the wrapped linen module's settings read through the wrapper, as openpi's pi0-FAST reads
    # llm.module.vocab_size (before: "LowRankModel" object has no attribute "out_dim")
    assert full.module.dot.module.out_dim == 48 and full.module.proj.module.features == 48

    data_free = lrjax.decompose_nnx(model, X, rule="speedup:2")
    before, after = data_free.report.net_flops
    assert before * len(X) == pytest.approx(lowered_flops(lambda m, x: m(x), model, X), rel=1e-6)
    assert after * len(X) == pytest.approx(lowered_flops(lambda m, x: m(x), data_free.module, X),
                                           rel=1e-6)
    assert before / after >= 2.0
    assert {p for p, r in data_free.ranks.items() if r is not None} & {
        "block/Conv_0", "block/Dense_0", "proj", "dot"}

    calibration = jax.random.normal(jax.random.key(5), (64, 12, 12, 3))
    ranks = {"block/Conv_0": 6, "block/Dense_0": 8, "proj": 8, "dot": 8}
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


class Posterior:
    """A plain Python object holding arrays, as diffusers' VAE ``encode`` returns (its
    ``latent_dist``, a ``FlaxDiagonalGaussianDistribution``): no JAX type."""

    def __init__(self, moments):
        self.mean, self.logvar = jnp.split(moments, 2, axis=-1)


class Autoencoder(nn.Module):
    """A linen model with ``encode`` and ``decode`` methods (diffusers' VAE has them)."""

    def setup(self):
        self.down = nn.Conv(64, (3, 3), strides=(2, 2))
        self.up = nn.ConvTranspose(16, (2, 2), strides=(2, 2))

    def encode(self, x):
        return Posterior(self.down(x))

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
        z = self.twice(nnx.relu(self.twice(self.vae.encode(x).mean)))
        return self.head(nnx.relu(self.vae.decode(z)).mean((1, 2)))


@pytest.mark.slow  # 4 s on the 2-core machine: the default run stays under 5 minutes
def test_a_wrappers_methods_and_repeated_calls_are_split_over_every_call(tmp_path):
    """Before: the wrapper was listed as one layer left as it is; the first version of the
    bridge took one call of a wrapper only; a linen method returning an object that is no JAX
    type failed to trace ("not a valid JAX type"), in the bridge and in ``decompose_linen``."""
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

    vae, variables = Autoencoder(), lrjax.nnx_bridge.linen_variables(model.vae)
    result = lrjax.decompose_linen(vae, variables, X, rule={"down": 9}, method="encode")
    np.testing.assert_allclose(
        result.module.apply(result.variables, X, method="encode").mean,
        vae.apply(variables, X, method="encode").mean, atol=1e-5)



class FlaggedBlock(nn.Module):
    """A linen block taking its mode as a positional flag and a conditioning array as a keyword
    (``block(x, False, scale=s)``, as diffusers' U-Net takes ``encoder_hidden_states=``)."""

    @nn.compact
    def __call__(self, x, train, scale=None):
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Conv(32, (3, 3))(x * scale)))
        return nn.Dense(32)(x)


class Flagged(nnx.Module):
    def __init__(self, rngs):
        self.block = nnx.bridge.lazy_init(nnx.bridge.ToNNX(FlaggedBlock(), rngs=rngs), X, False,
                                          scale=jnp.ones((1, 1, 1, 3)))
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        scale = 1.0 + jnp.abs(x).mean((1, 2), keepdims=True)
        return self.head(self.block(x, False, scale=scale).mean((1, 2)))


def test_a_wrapper_given_a_flag_and_keyword_arrays_calibrates():
    """Before: a wrapper given an argument that is no array (``self.block(x, False)``) or a
    keyword array kept its layers' data-free factors ("calibration never ran them")."""
    _calibrates_its_block(Flagged(nnx.Rngs(0)))


def _calibrates_its_block(model) -> None:
    """``model``'s wrapper ``block`` calibrated on scaled channels: no layer left data-free,
    closer to the model on held-out data than data-free."""
    calibration = jax.random.normal(jax.random.key(1), (32, 12, 12, 3)) * \
        jnp.linspace(0.1, 3.0, 3)
    ranks = {"block/Conv_0": 6, "block/Dense_0": 8}
    calibrated = lrjax.decompose_nnx(model, X, rule=ranks, calibration=calibration)
    assert not [n for n in calibrated.report.notes if "data-free" in n]
    plain = lrjax.decompose_nnx(model, X, rule=ranks)
    held_out = jax.random.normal(jax.random.key(6), (16, 12, 12, 3)) * jnp.linspace(0.1, 3.0, 3)
    assert _relative(calibrated.module(held_out), model(held_out)) < \
        _relative(plain.module(held_out), model(held_out))


class Conditioned(nn.Module):
    """A linen block given a list that may hold conditioning arrays, or none (openpi's Gemma:
    ``adarms_cond=[None, None]`` in pi0, arrays in pi0.5)."""

    @nn.compact
    def __call__(self, x, conds=None):
        for cond in conds or ():
            if cond is not None:
                x = x * cond
        return nn.Dense(32)(nn.relu(nn.Conv(32, (3, 3))(x)))


class Unconditioned(nnx.Module):
    def __init__(self, rngs):
        self.block = nnx.bridge.lazy_init(nnx.bridge.ToNNX(Conditioned(), rngs=rngs), X,
                                          conds=[None, None])
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block(x, conds=[None, None]).mean((1, 2)))


def test_a_wrapper_given_a_keyword_holding_no_array_calibrates():
    """Before: ``conds=[None, None]`` (a tree with no leaf) was taken for a keyword array in the
    calibration batches but not in the example call: "calibration batch 0 is 2 positional
    argument(s) ((32, 12, 12, 3), {'conds': [None, None]}); the model's example call takes 1"."""
    _calibrates_its_block(Unconditioned(nnx.Rngs(0)))


class Sampler(nnx.Module):
    """A wrapper called once on the data, then at every step of a ``jax.lax.while_loop`` of the
    model's code (openpi's pi0 fills its Gemma's cache with a prefix, then samples actions so)."""

    def __init__(self, rngs):
        self.block = nnx.bridge.ToNNX(Conditioned())  # (keeping no stream: called in a loop)
        self.block.lazy_init(X, rngs=rngs)
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        context = self.block(x).mean((1, 2))

        def step(carry):
            h, i = carry
            return h + 0.1 * self.block(x + h[:, None, None, :3]).mean((1, 2)), i + 1

        return self.head(jax.lax.while_loop(lambda c: c[1] < 2, step, (context, 0))[0])


def test_a_wrapper_called_in_a_loop_calibrates_on_its_calls_outside():
    """Before: the wrapper's calls inside the loop body were taken as its inputs and leaked the
    body's values (JAX's UnexpectedTracerError); its calls outside calibrate it."""
    model = Sampler(nnx.Rngs(0))
    ranks = {"block/Conv_0": 6, "block/Dense_0": 8}
    calibrated = lrjax.decompose_nnx(model, X, rule=ranks, calibration=X)
    assert not [n for n in calibrated.report.notes if "data-free" in n]
    plain = lrjax.decompose_nnx(model, X, rule=ranks)
    assert _relative(calibrated.module(X), model(X)) < _relative(plain.module(X), model(X))


class LoopOnly(nnx.Module):
    """A wrapper called only inside a ``jax.lax.fori_loop`` of the model's code, on the loop's
    state and a value from outside it (a sampler's denoising steps)."""

    def __init__(self, rngs):
        self.block = nnx.bridge.ToNNX(Conditioned())
        self.block.lazy_init(X, rngs=rngs)
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        def step(i, h):
            return h + 0.1 * self.block(x * (1.0 + h[:, None, None, :3])).mean((1, 2))

        return self.head(jax.lax.fori_loop(0, 3, step, jnp.zeros((x.shape[0], 32))))


def test_a_wrapper_called_only_in_a_loop_calibrates_on_every_run():
    """A wrapper the model runs only inside a loop body is calibrated on the inputs of every
    run of the body (copied to the host as it runs), over all the calibration batches. Before:
    its layers kept their data-free factors ("calibration never ran them")."""
    model = LoopOnly(nnx.Rngs(0))
    ranks = {"block/Conv_0": 6, "block/Dense_0": 8}
    calibration = [X, X * jnp.linspace(0.1, 3.0, 3)]
    calibrated = lrjax.decompose_nnx(model, X, rule=ranks, calibration=calibration)
    assert not [n for n in calibrated.report.notes if "data-free" in n]
    runs = []  # the wrapper's inputs at each run of the loop, as the model computes them

    def step(x, h):
        runs.append(x * (1.0 + h[:, None, None, :3]))
        return h + 0.1 * model.block(runs[-1]).mean((1, 2))

    for x in calibration:
        h = jnp.zeros((x.shape[0], 32))
        for _ in range(3):
            h = step(x, h)
    direct = lrjax.decompose_linen(  # the wrapper's module calibrated on those inputs
        Conditioned(), {"params": nnx.to_pure_dict(nnx.state(model.block, nnx.Param))},
        X, rule={"Conv_0": 6, "Dense_0": 8}, calibration=runs)
    split = nnx.to_pure_dict(nnx.state(calibrated.module.block, nnx.Param))
    for layer in ("Conv_0", "Dense_0"):
        for factor in ("vertical", "horizontal"):
            np.testing.assert_allclose(split[layer][factor]["kernel"],
                                       direct.variables["params"][layer][factor]["kernel"],
                                       rtol=2e-3, atol=2e-4)


class DenseBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(32)(nn.relu(nn.Dense(32)(x)))


class StackedWrappers(nnx.Module):
    """Three ``ToNNX`` wrappers made under ``nnx.vmap`` (split rngs: a stacked key) and run by
    ``nnx.scan``, then an NNX head."""

    def __init__(self, rngs):
        x = jnp.ones((4, 32))

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=0, out_axes=0)
        def blocks(rngs):
            block = nnx.bridge.ToNNX(DenseBlock(), rngs=rngs)
            block.lazy_init(x)
            return block

        self.blocks = blocks(rngs)
        self.head = nnx.Linear(32, 64, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, block):
            return block(h)

        return self.head(step(x, self.blocks))


@pytest.mark.slow  # (2-3 s)
def test_stacked_wrappers_are_listed_and_the_rest_split():
    """Wrappers stacked by ``nnx.vmap`` are left as they are, with the reason, and the rest of
    the model is split, calibrated too. Before: Flax's ``nnx.view`` (lrjax's eval view) failed
    on the stack's split rngs ("fold_in accepts a single key, but was given a key array of
    shape (3,)"), then "the kernel of layer 'blocks/Dense_1' has shape (3, 32, 32); the model's
    layer expects (32, 32)"."""
    model = StackedWrappers(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 32))
    for calibration in (None, x):
        split = lrjax.decompose_nnx(model, x, rule={"head": 8}, calibration=calibration)
        assert split.report.skipped["blocks/Dense_0"].startswith(
            "its ToNNX wrapper is one of a stack (nnx.vmap / nnx.scan): its kernel has shape "
            "(3, 32, 32), the layer's (32, 32) per wrapper")
        assert split.module.head.vertical.kernel[...].shape == (32, 8)
    full = lrjax.decompose_nnx(model, x, rule={"head": 32})
    np.testing.assert_allclose(full.module(x), model(x), rtol=1e-4, atol=1e-4)


class Stage(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(16, 16, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.norm(self.conv(x)))


class NNXBlock(nnx.Module):
    """An NNX block with a conv, a list of stages (integer keys in ``ToLinen``'s variables) and
    a dense layer."""

    def __init__(self, rngs):
        self.a = nnx.Conv(16, 16, (3, 3), rngs=rngs)
        self.stages = nnx.List([Stage(rngs), Stage(rngs)])
        self.lin = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        x = x + self.a(x)
        for stage in self.stages:
            x = stage(x)
        return self.lin(x)


class NNXInside(nn.Module):
    """A linen model with an NNX block through ``nnx.bridge.to_linen``."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3), name="stem")(x)
        x = nnx.bridge.to_linen(NNXBlock, name="block")(x)
        return nn.Dense(10, name="head")(x.mean((1, 2)))


@pytest.mark.slow  # 5 s on the 2-core machine: the default run stays under 5 minutes
def test_nnx_layers_inside_to_linen_are_split_as_linen_layers(tmp_path):
    """Before: the wrapper was listed as one layer left as it is ("lrjax does not reach into the
    bridge"), its work a fixed cost."""
    model = NNXInside()
    variables = model.init(jax.random.key(0), X)
    assert 0 in variables["params"]["block"]["stages"]  # Flax's integer keys
    variables = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape),
                             variables)
    y = model.apply(variables, X)
    found = {s.path: s for s in lrjax.surgery.find_convs(model, X)}
    inner = ("block/a", "block/stages/0/conv", "block/stages/1/conv", "block/lin")
    assert all(found[p].candidate for p in inner) and "block" not in found

    full = lrjax.decompose_linen(model, variables, X, rule=dict.fromkeys(inner[:3], 48))
    assert _relative(full.module.apply(full.variables, X), y) < 1e-5
    stage = full.variables["params"]["block"]["stages"]["0"]
    assert stage["conv"]["vertical"]["kernel"].shape == (3, 1, 16, 48)
    assert "scale" in stage["norm"] and "mean" in full.variables["batch_stats"]["block"][
        "stages"]["1"]["norm"]

    for calibration in (None, X):
        result = lrjax.decompose_linen(model, variables, X, rule="speedup:2",
                                       calibration=calibration)
        before, after = result.report.net_flops
        assert before * len(X) == pytest.approx(
            lowered_flops(lambda v, x: model.apply(v, x), variables, X), rel=1e-6)
        assert after * len(X) == pytest.approx(
            lowered_flops(result.module.apply, result.variables, X), rel=1e-6)
        assert set(inner[:3]) & {p for p, r in result.ranks.items() if r is not None}

    ranks = dict.fromkeys(inner[:3], 6)
    calibration = jax.random.normal(jax.random.key(5), (32, 12, 12, 3))
    calibrated = lrjax.decompose_linen(model, variables, X, rule=ranks, calibration=calibration)
    plain = lrjax.decompose_linen(model, variables, X, rule=ranks)
    held_out = jax.random.normal(jax.random.key(6), (16, 12, 12, 3))
    target = model.apply(variables, held_out)
    assert _relative(calibrated.module.apply(calibrated.variables, held_out), target) < \
        _relative(plain.module.apply(plain.variables, held_out), target)

    onnx_result = export.to_onnx(calibrated.module, calibrated.variables, X,
                                 str(tmp_path / "l.onnx"))
    assert onnx_result.max_abs_error <= export.ATOL + export.RTOL * onnx_result.scale
    lrjax.save_decomposed(str(tmp_path / "saved"), calibrated)
    module, loaded = lrjax.load_decomposed(str(tmp_path / "saved"), model, X)
    np.testing.assert_allclose(module.apply(loaded, X),
                               calibrated.module.apply(calibrated.variables, X), atol=1e-6)

    wrapper = nnx.bridge.ToLinen(nnx.Linear, args=(32, 64))  # the bridge guide's, at the root
    x = jax.random.normal(jax.random.key(2), (4, 32))
    variables = wrapper.init(jax.random.key(0), x)
    result = lrjax.decompose_linen(wrapper, variables, x, rule={"": 32})
    assert result.variables["params"]["vertical"]["kernel"].shape == (32, 32)
    assert _relative(result.module.apply(result.variables, x), wrapper.apply(variables, x)) < 1e-5
