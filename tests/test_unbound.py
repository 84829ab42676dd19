"""Submodules a model applies apart with their own variables (linen: ``module, variables =
self.unbind()``, then ``module.apply(variables, ...)`` inside a plain ``jax.lax.scan``, as
Octo's diffusion action head samples actions; NNX: ``nnx.split``, ``nnx.merge`` in a loop's
body): their layers are the model's, found, costed, calibrated, split and exported under their
paths in the model (:mod:`lrjax.linen_unbound`)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import lrjax
from lrjax import decompose, export, linen_unbound
from tests.helpers import lowered_flops, normal


class FourierFeatures(nn.Module):
    """Octo's learnable time features: its own parameter, a product written by hand."""

    size: int = 8

    @nn.compact
    def __call__(self, t):
        w = self.param("kernel", nn.initializers.normal(0.2), (self.size // 2, t.shape[-1]))
        f = 2 * math.pi * t @ w.T
        return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)


class ScoreNet(nn.Module):
    """A residual MLP predicting the noise from the condition, the noisy actions and the time."""

    @nn.compact
    def __call__(self, cond, actions, t):
        x = jnp.concatenate([cond, actions, FourierFeatures()(t)], axis=-1)
        x = nn.Dense(64)(x)
        for _ in range(2):
            x = x + nn.Dense(64)(nn.relu(nn.Dense(128)(nn.LayerNorm()(x))))
        return nn.Dense(actions.shape[-1])(nn.relu(x))


class DiffusionHead(nn.Module):
    """Octo's ``DiffusionActionHead`` in small: ``__call__`` is one denoising step (what init
    runs); ``sample`` denoises from noise in a ``jax.lax.scan``, its score network applied
    apart with the head's own variables at every step."""

    steps: int = 3
    action_dim: int = 6
    unroll: bool = False  # (XLA's count of the loop unrolled: it counts a loop body once)

    def setup(self):
        self.net = ScoreNet()

    def __call__(self, cond, actions=None, t=None):
        if actions is None:
            actions = jnp.zeros((*cond.shape[:-1], self.action_dim))
            t = jnp.zeros((*cond.shape[:-1], 1))
        return self.net(cond, actions, t)

    def sample(self, cond, rng):
        module, variables = self.unbind()

        def step(carry, i):
            x, key = carry
            eps = module.apply(variables, cond, x, jnp.full((*x.shape[:-1], 1), i / self.steps))
            key, noise = jax.random.split(key)
            x = 0.9 * (x - 0.1 * eps) + 0.05 * jax.random.normal(noise, x.shape) * (i > 0)
            return (x, key), None

        rng, start = jax.random.split(rng)
        x = jax.random.normal(start, (*cond.shape[:-1], self.action_dim))
        return jax.lax.scan(step, (x, rng), jnp.arange(self.steps - 1, -1, -1),
                            unroll=self.unroll)[0][0]


class Policy(nn.Module):
    """A conv encoder of the observation, then the diffusion head."""

    unroll: bool = False

    def setup(self):
        self.encoder = nn.Conv(32, (3, 3), strides=(2, 2))
        self.embed = nn.Dense(48)
        self.head = DiffusionHead(unroll=self.unroll)

    def __call__(self, images):  # (what init runs)
        return self.head(self.features(images))

    def features(self, images):
        return self.embed(nn.relu(self.encoder(images)).mean((1, 2)))

    def act(self, images, rng):
        return self.head.sample(self.features(images), rng)


IMAGES = normal(0, (4, 8, 8, 3))
KEY = jax.random.key(1)
HEAD = {f"head/net/{p}" for p in ("FourierFeatures_0", "Dense_0", "Dense_1", "Dense_2", "Dense_3",
                                  "Dense_4", "Dense_5")}


def _relative(a, b) -> float:
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.fixture(scope="module")
def policy():
    model = Policy()
    return model, model.init(jax.random.key(2), IMAGES)


@pytest.mark.slow  # 6 s on the 2-core machine: the default run stays under 5 minutes
def test_unbound_submodules_applied_in_a_loop_are_split_as_the_models_layers(policy):
    """Before: ``decompose_linen(..., method="act")`` failed with Flax's raw
    ``ScopeCollectionNotFound`` from inside lrjax (an init cannot run ``act``: the head's
    ``unbind()`` comes before its variables exist), and the score network's layers, in an
    ``apply`` of their own, would have been named from its root (``net/Dense_0``), not found in
    the model's variables."""
    model, variables = policy
    want = model.apply(variables, IMAGES, KEY, method="act")
    data_free = lrjax.decompose_linen(model, variables, IMAGES, KEY, rule="speedup:2",
                                      method="act")
    sites = {s.path: s for s in data_free.problem.sites}
    with pytest.raises(ValueError, match=r"Policy's init cannot run .*unbind\(\).*give its variables"):
        lrjax.surgery.find_convs(model, IMAGES, KEY, method="act")  # (no variables given)
    assert HEAD | {"encoder", "embed"} <= set(sites) and all(sites[p].candidate for p in HEAD)
    assert not [p for p in sites if p.startswith("net/")]

    top = {p: decompose.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
           for p, s in sites.items() if s.candidate and p != "head/net/FourierFeatures_0"}
    full = lrjax.decompose_linen(model, variables, IMAGES, KEY, rule=top, method="act")
    assert _relative(full.module.apply(full.variables, IMAGES, KEY, method="act"), want) < 1e-5
    head = full.variables["params"]["head"]["net"]
    assert head["Dense_1"]["vertical"]["kernel"].shape == (128, 64)  # (128 -> 64 at full rank)
    assert "kernel" not in head["Dense_1"]

    # the loop's layers costed at every step: XLA's count of the loop unrolled (which folds a
    # few element-wise ops of the step counter)
    unrolled = Policy(unroll=True)
    before, after = data_free.report.net_flops
    assert before * len(IMAGES) == pytest.approx(lowered_flops(
        lambda v: unrolled.apply(v, IMAGES, KEY, method="act"), variables), abs=16)
    assert after * len(IMAGES) == pytest.approx(lowered_flops(
        lambda v: data_free.module.clone(base=unrolled).apply(v, IMAGES, KEY, method="act"),
        data_free.variables), abs=16)
    assert before / after >= 2.0 and set(data_free.ranks) & HEAD

    calibration = [(jax.random.normal(jax.random.key(10 + i), (16, 8, 8, 3)), jax.random.key(i))
                   for i in range(4)]
    ranks = {"head/net/Dense_1": 8, "head/net/Dense_2": 12, "head/net/Dense_3": 8,
             "head/net/Dense_4": 12}
    calibrated = lrjax.decompose_linen(model, variables, IMAGES, KEY, rule=ranks, method="act",
                                       calibration=calibration)
    assert not [n for n in calibrated.report.notes if "data-free" in n]
    plain = lrjax.decompose_linen(model, variables, IMAGES, KEY, rule=ranks, method="act")
    held_out = jax.random.normal(jax.random.key(20), (16, 8, 8, 3))
    reference = model.apply(variables, held_out, KEY, method="act")
    assert _relative(calibrated.module.apply(calibrated.variables, held_out, KEY, method="act"),
                     reference) < 0.8 * _relative(
        plain.module.apply(plain.variables, held_out, KEY, method="act"), reference)


@pytest.mark.slow  # 4 s: an export, a checkpoint
def test_unbound_sampling_exports_saves_and_loads(policy, tmp_path):
    model, variables = policy
    data_free = lrjax.decompose_linen(model, variables, IMAGES, KEY, rule="speedup:2",
                                      method="act")
    done = export.to_onnx(data_free.module, data_free.variables, (IMAGES,),
                          str(tmp_path / "policy.onnx"), fixed_batch=True, method="act", rng=KEY)
    assert done.max_abs_error <= export.ATOL + export.RTOL * done.scale
    lrjax.save_decomposed(str(tmp_path / "saved"), data_free)
    module, loaded = lrjax.load_decomposed(str(tmp_path / "saved"), model, IMAGES, KEY,
                                           method="act")  # (checked on its sampling)
    assert _relative(module.apply(loaded, IMAGES, KEY, method="act"), data_free.module.apply(
        data_free.variables, IMAGES, KEY, method="act")) < 1e-6


@pytest.mark.slow  # (2-3 s)
def test_unbind_outside_lrjax_is_flaxs_own(policy):
    model, variables = policy
    module, _ = model.bind(variables).head.unbind()
    assert type(module) is DiffusionHead and linen_unbound.applied_at(module) is None
    with linen_unbound.marking_unbind():
        module, _ = model.bind(variables).head.unbind()
    assert isinstance(module, DiffusionHead) and linen_unbound.applied_at(module) == ("head",)
    assert nn.Module.unbind is linen_unbound._ORIGINAL_UNBIND


class Denoiser(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(16, 64, rngs=rngs)
        self.b = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


class NNXSampler(nnx.Module):
    """NNX's way to run a submodule in a loop of JAX's own: ``nnx.split`` it, ``nnx.merge`` it
    in the body (a ``fori_loop`` of denoising steps)."""

    def __init__(self, rngs, unroll=False):
        self.stem = nnx.Linear(8, 16, rngs=rngs)
        self.net = Denoiser(rngs)
        self.unroll = unroll

    def __call__(self, x):
        graphdef, state = nnx.split(self.net)

        def step(i, h):
            return h - 0.1 * nnx.merge(graphdef, state)(h)

        return jax.lax.fori_loop(0, 3, step, self.stem(x), unroll=self.unroll)


@pytest.mark.slow  # (2-3 s)
def test_nnx_submodules_merged_in_a_loop_calibrate():
    """Before: calibrating failed with Flax's "Cannot mutate _Moments from a different trace
    level" (a probe's statistics set inside the loop's body); they go to the host now, as a
    loop's layers' do."""
    model, x = NNXSampler(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (4, 8))
    exact = lrjax.decompose_nnx(model, x, rule={"net/a": 16, "net/b": 16})
    assert _relative(exact.module(x), model(x)) < 1e-5
    calibration = jax.random.normal(jax.random.key(2), (64, 8)) * jnp.linspace(0.1, 3.0, 8)
    ranks = {"net/a": 4, "net/b": 4}
    fitted = lrjax.decompose_nnx(model, x, rule=ranks, calibration=calibration)
    assert not [n for n in fitted.report.notes if "data-free" in n]
    free = lrjax.decompose_nnx(model, x, rule=ranks)
    held_out = jax.random.normal(jax.random.key(3), (32, 8)) * jnp.linspace(0.1, 3.0, 8)
    assert _relative(fitted.module(held_out), model(held_out)) < \
        _relative(free.module(held_out), model(held_out))
    unrolled = NNXSampler(nnx.Rngs(0), unroll=True)  # (XLA counts a loop body once)
    nnx.update(unrolled, nnx.state(model))
    before, after = fitted.report.net_flops
    assert before * len(x) == pytest.approx(lowered_flops(lambda m, x: m(x), unrolled, x), abs=16)
