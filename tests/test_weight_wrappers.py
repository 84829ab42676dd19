"""Layers under Flax's weight re-parametrizing wrappers (``nn.WeightNorm``, ``nn.SpectralNorm``):
``decompose_linen`` folds a wrapper into the weights its layer computes with and splits the layer
(:mod:`lrjax.linen_wrappers`); a wrapper around layers all kept full stays as it was."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import lrjax
from lrjax import export
from tests.helpers import normal

X = normal(0, (4, 12, 12, 8))


class Wrapped(nn.Module):
    wrapper: type

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(32, (3, 3), name="inner")
        x = self.wrapper(conv)(x) if self.wrapper is nn.WeightNorm else \
            self.wrapper(conv)(x, update_stats=False)
        return nn.Conv(32, (3, 3), name="outer")(nn.relu(x))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(24, name="down")(nn.relu(nn.Dense(48, name="up")(x)))


class WrappedBlock(nn.Module):
    """A wrapper around a submodule of two layers, biases normalized too."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="stem")(x))
        return nn.WeightNorm(Mlp(name="mlp"), variable_filter=None)(x.mean((1, 2)))


def _init(model, seed=1):
    """Variables moved off their initial values (a unit scale, an untrained ``u``)."""
    return _init_on(model, X, seed)


def _init_on(model, x, seed=1):
    variables = model.init(jax.random.key(seed), x)
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [a * 1.5 + 0.1 * jax.random.normal(k, a.shape)
                                        for a, k in zip(leaves, keys, strict=True)])


def _close(got, want, rtol=2e-5):
    np.testing.assert_allclose(got, want, atol=rtol * float(jnp.abs(want).max()))


def _xla_ratio(model, variables, result):
    def flops(m, v):
        return jax.jit(lambda v, x: m.apply(v, x)).lower(v, X).cost_analysis()["flops"]
    return flops(model, variables) / flops(result.module, result.variables)


@pytest.mark.parametrize("wrapper", [nn.WeightNorm, pytest.param(nn.SpectralNorm, marks=pytest.mark.slow)])
def test_a_wrapped_layer_is_split_from_the_kernel_it_computes_with(wrapper, tmp_path):
    """Before: listed as "re-parametrized ...: its own computation is kept", and a rule naming
    it was a ``ValueError``."""
    model = Wrapped(wrapper)
    variables = _init(model)
    want = model.apply(variables, X)
    name = f"{wrapper.__name__}_0"
    found = {s.path: s for s in lrjax.surgery.find_convs(model, X)}
    assert "decompose_linen folds the wrapper" in found["inner"].skip
    full = lrjax.decompose_linen(model, variables, X, rule={"inner": 24})  # full rank
    _close(full.module.apply(full.variables, X), want)
    assert full.module.unwrapped == (name,)
    flat = traverse_util.flatten_dict(full.variables, sep="/")
    assert not [k for k in flat if name in k]  # its scale, or its u and sigma, folded
    assert sorted(k for k in flat if k.startswith("params/inner")) == [
        "params/inner/horizontal/bias", "params/inner/horizontal/kernel",
        "params/inner/vertical/kernel"]
    assert any("1 weight re-parametrizing wrapper (WeightNorm / SpectralNorm) folded" in n and
               f"{name} into inner" in n for n in full.report.notes)
    for calibration in (None, X):
        result = lrjax.decompose_linen(model, variables, X, rule={"inner": 8, "outer": 16},
                                       calibration=calibration)
        assert result.module.unwrapped == (name,) and result.report.speedup > 1.5
        assert result.report.errors["inner"] > 0.05
        before, after = result.report.net_flops
        assert before / after == pytest.approx(_xla_ratio(model, variables, result), rel=1e-3)
    lrjax.save_decomposed(str(tmp_path / "saved"), result)
    module, loaded = lrjax.load_decomposed(str(tmp_path / "saved"), model, X)
    assert module.unwrapped == (name,)
    _close(module.apply(loaded, X), result.module.apply(result.variables, X), 1e-6)


@pytest.mark.parametrize("wrapper", [nn.WeightNorm, nn.SpectralNorm])
def test_a_wrapper_around_layers_kept_full_stays(wrapper):
    model = Wrapped(wrapper)
    variables = _init(model)
    for calibration in (None, X):
        result = lrjax.decompose_linen(model, variables, X, rule={"outer": 96},
                                       calibration=calibration)
        assert result.module.unwrapped == ()
        _close(result.module.apply(result.variables, X), model.apply(variables, X))
        kept = {k: v for k, v in traverse_util.flatten_dict(result.variables, sep="/").items()
                if "outer" not in k}
        stored = {k: v for k, v in traverse_util.flatten_dict(variables, sep="/").items()
                  if "outer" not in k}
        assert sorted(kept) == sorted(stored)
        for key, value in stored.items():
            np.testing.assert_array_equal(kept[key], value)


@pytest.mark.slow  # 6 s on the 2-core machine: the default run stays under 5 minutes
def test_a_wrapped_submodule_folds_every_variable_it_maps():
    """``variable_filter=None``: kernels and biases normalized; one layer split, the other
    keeps the weights it computed with."""
    model = WrappedBlock()
    variables = _init(model)
    want = model.apply(variables, X)
    result = lrjax.decompose_linen(model, variables, X, rule={"mlp/up": 16})  # full rank
    _close(result.module.apply(result.variables, X), want)
    assert result.module.unwrapped == ("WeightNorm_0",)
    params = result.variables["params"]
    assert "WeightNorm_0" not in params and set(params["mlp"]["down"]) == {"kernel", "bias"}
    down = variables["params"]["mlp"]["down"]["bias"]  # folded: normalized (per feature, the
    scale = variables["params"]["WeightNorm_0"]["mlp/down/bias/scale"]  # bias's one axis)
    np.testing.assert_allclose(params["mlp"]["down"]["bias"], jnp.sign(down) * scale, rtol=1e-5)
    cut = lrjax.decompose_linen(model, variables, X, rule="speedup:1.5", calibration=X)
    before, after = cut.report.net_flops
    assert before / after == pytest.approx(_xla_ratio(model, variables, cut), rel=1e-3)
    scored = []  # eval-guided: each candidate scored on the folded model, run unwrapped

    def agreement(module, decomposed):
        scored.append(module.unwrapped)
        return -float(jnp.linalg.norm(module.apply(decomposed, X) - want))

    guided = lrjax.decompose_linen(model, variables, X, calibration=X,
                                   rule=lrjax.ranks.EvalGuided(agreement, target_speedup=1.5))
    assert set(scored) == {("WeightNorm_0",)} and guided.report.speedup >= 1.5
    found = lrjax.surgery.search(model, variables, X, eval_fn=agreement, target_speedup=1.5)
    assert {"mlp/up", "mlp/down"} & set(found.ranks)  # (as decompose_linen folds them)
    assert lrjax.decompose_linen(model, variables, X, rule=found.ranks).report.speedup >= 1.5


class Vocoder(nn.Module):
    """HiFi-GAN ports' way: wrappers made in ``setup`` (the layer is then the wrapper's child,
    ``layer_instance``, and the wrapper's scale ``layer_instance/kernel/scale``), in lists, around
    1-D convs and a 1-D transposed conv with ``transpose_kernel=True``."""

    def setup(self):
        self.pre = nn.WeightNorm(nn.Conv(32, [7]))
        self.up = nn.WeightNorm(nn.ConvTranspose(16, (4,), (2,), transpose_kernel=True))
        self.convs = [nn.WeightNorm(nn.Conv(16, [3], kernel_dilation=d)) for d in (1, 3)]
        self.post = nn.WeightNorm(nn.Conv(1, [7], use_bias=False))

    def __call__(self, x):
        x = self.up(nn.leaky_relu(self.pre(x), 0.1))
        for conv in self.convs:
            x = x + conv(nn.leaky_relu(x, 0.1))
        return jnp.tanh(self.post(x))


@pytest.mark.slow  # 5 s on the 2-core machine: the default run stays under 5 minutes
def test_wrappers_made_in_setup_fold_around_their_child_layer():
    model = Vocoder()
    audio = jax.random.normal(jax.random.key(3), (2, 24, 8))
    variables = _init_on(model, audio)
    want = model.apply(variables, audio)
    first = lrjax.decompose_linen(model, variables, audio, rule={"convs_0/layer_instance": 4})
    top = {s.path: lrjax.decompose.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
           for s in first.problem.sites if s.candidate}
    assert sorted(top) == ["convs_0/layer_instance", "convs_1/layer_instance",
                           "post/layer_instance", "pre/layer_instance", "up/layer_instance"]
    full = lrjax.decompose_linen(model, variables, audio, rule=top)
    _close(full.module.apply(full.variables, audio), want)
    assert full.module.unwrapped == ("convs_0", "convs_1", "post", "pre", "up")
    assert not [k for k in traverse_util.flatten_dict(full.variables) if "scale" in k[-1]]
    cut = lrjax.decompose_linen(model, variables, audio, rule="speedup:1.5",
                                calibration=jax.random.normal(jax.random.key(4), (8, 24, 8)))
    before, after = cut.report.net_flops
    flops = [jax.jit(lambda v, x, m=m: m.apply(v, x)).lower(v, audio).cost_analysis()["flops"]
             for m, v in ((model, variables), (cut.module, cut.variables))]
    assert before / after == pytest.approx(flops[0] / flops[1], rel=1e-3)
    assert before / after >= 1.5


class ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.WeightNorm(nn.Dense(32))(nn.relu(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32)(x)
        x, _ = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)()(x, None)
        return nn.Dense(32)(x)


def test_a_wrapper_stacked_by_scan_stays_listed():
    """Its variables stacked (a scale per iteration): not folded, listed with the reason (no
    claim that a decomposition folds it); the other layers split. Before: Flax's
    ``ScopeParamShapeError`` from inside lrjax."""
    model, x = Scanned(), jax.random.normal(jax.random.key(0), (4, 16))
    variables = model.init(jax.random.key(1), x)
    found = {s.path: s for s in lrjax.surgery.find_convs(model, x)}
    reason = found["ScanScannedBlock_0/Dense_0"].skip
    assert "re-parametrized by the WeightNorm" in reason and "folds" not in reason
    result = lrjax.decompose_linen(model, variables, x, rule={"Dense_0": 8, "Dense_1": 8})
    assert result.module.unwrapped == () and "ScanScannedBlock_0/Dense_0" in result.report.skipped
    assert float(jnp.abs(result.module.apply(result.variables, x)).max()) > 0


@pytest.mark.slow
def test_a_folded_model_exports(tmp_path):
    model = Wrapped(nn.SpectralNorm)
    variables = _init(model)
    result = lrjax.decompose_linen(model, variables, X, rule="speedup:2")
    for convert, name in ((export.to_onnx, "m.onnx"), (export.to_tflite, "m.tflite")):
        done = convert(result.module, result.variables, (X,), str(tmp_path / name))
        assert done.max_abs_error <= export.ATOL + export.RTOL * done.scale


def _nnx_net(wrapper):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.wrapped = wrapper(nnx.Conv(8, 32, (3, 3), rngs=rngs), rngs=rngs)
            self.outer = nnx.Conv(32, 32, (3, 3), rngs=rngs)

        def __call__(self, x):
            y = self.wrapped(x) if wrapper is nnx.WeightNorm else \
                self.wrapped(x, update_stats=False)
            return self.outer(nnx.relu(y))

    model = Net(nnx.Rngs(0))
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        a * 1.5 + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]))
    return model


def _nnx_flops(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, X).cost_analysis()[
        "flops"]


@pytest.mark.parametrize("wrapper", [nnx.WeightNorm, nnx.SpectralNorm])
def test_an_nnx_wrapped_layer_is_split_from_the_kernel_it_computes_with(wrapper, tmp_path):
    """Before: listed as "re-parametrized ...: its own computation is kept", and a rule naming
    it was a ``ValueError``."""
    model = _nnx_net(wrapper)
    want = model(X)  # (Flax's wrappers set their layer's kernel at every call: as they compute)
    stored = jax.tree.map(np.array, nnx.state(model))
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(model, X)}
    assert "decompose_nnx folds the wrapper" in found["wrapped/layer_instance"].skip
    full = lrjax.decompose_nnx(model, X, rule={"wrapped/layer_instance": 24})  # full rank
    _close(full.module(X), want)
    assert type(full.module.wrapped).__name__ == "Unwrapped"
    assert not {"scales", "batch_stats"} & set(nnx.to_pure_dict(nnx.state(full.module.wrapped)))
    assert any("wrapped into wrapped/layer_instance" in n for n in full.report.notes)
    cut = lrjax.decompose_nnx(model, X, rule={"wrapped/layer_instance": 8, "outer": 16},
                              calibration=X)
    assert cut.report.errors["wrapped/layer_instance"] > 0.05
    before, after = cut.report.net_flops
    assert before / after == pytest.approx(_nnx_flops(model) / _nnx_flops(cut.module), rel=1e-3)
    lrjax.save_decomposed(str(tmp_path / "saved"), cut)
    loaded = lrjax.load_decomposed(str(tmp_path / "saved"), model, X)
    assert type(loaded.wrapped).__name__ == "Unwrapped"
    _close(loaded(X), cut.module(X), 1e-6)
    kept = lrjax.decompose_nnx(model, X, rule={"outer": 16}, calibration=X)
    assert type(kept.module.wrapped) is wrapper  # around a layer kept full: as it was
    for a, b in zip(jax.tree.leaves(nnx.state(kept.module.wrapped)),
                    jax.tree.leaves(nnx.state(model.wrapped)), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(stored), strict=True):
        np.testing.assert_array_equal(a, b)  # the model itself untouched


def test_an_nnx_wrapper_stacked_by_vmap_stays_listed():
    """Flax's scan-over-layers idiom with a wrapper in each block: its variables stacked, not
    folded (each iteration's would be), listed with the reason; the rest split. Before: a
    reshape error from inside the folding."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.WeightNorm(nnx.Linear(16, 16, rngs=rngs), rngs=rngs)

        def __call__(self, x):
            return x + self.w(nnx.relu(x))

    class Net(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.out = nnx.Linear(16, 32, rngs=rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def step(x, block):
                return block(x)

            return self.out(step(x, self.blocks))

    model, x = Net(nnx.Rngs(0)), jax.random.normal(jax.random.key(0), (4, 16))
    want = model(x)
    result = lrjax.decompose_nnx(model, x, rule={"out": 16})  # full rank
    reason = result.report.skipped["blocks/w/layer_instance"]
    assert "re-parametrized by the WeightNorm" in reason and "folds" not in reason
    assert type(result.module.blocks.w) is nnx.WeightNorm
    _close(result.module(x), want)
