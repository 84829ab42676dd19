"""Compressing models written without lrjax: decompose_linen, decompose_nnx, calibration,
eval-guided ranks, fine-tuning a decomposed user model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import lrjax
from benchmarks.user_models import NNXCNN, resnet18, resnet50
from lrjax import costs, decompose, export, nnx_surgery, ranks, surgery, train
from lrjax.linen_kernels import SiteKernels
from lrjax.nnx_surgery import LowRankConvNNX
from tests.helpers import apply, init, lowered_flops


@pytest.fixture(scope="module")
def resnet():
    model = resnet18(num_classes=10, num_filters=8)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = init(model, 1, x, train=False)
    # non-trivial batch statistics and scales, so that BN does something (NumPy draws: one jitted
    # draw per shape took 2.5 s to compile)
    rng = np.random.default_rng(2)
    variables = jax.tree.map(
        lambda a: a + 0.1 * np.abs(rng.standard_normal(a.shape, np.float32)), variables)
    return model, variables, x


def _top_ranks(sites):
    return {s.path: decompose.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
            for s in sites if s.candidate}


def test_resnet_convs_are_found_by_their_full_paths(resnet):
    model, _, x = resnet
    sites = surgery.find_convs(model, x, train=False)
    paths = [s.path for s in sites]
    assert paths[0] == "Conv_0" and "BasicBlock_2/Conv_2" in paths  # auto-named, nested
    assert all(s.candidate for s in sites) and len(sites) == 21  # stem, 16 3x3, 3 1x1, head
    kinds = {s.path: s.kind for s in sites}
    assert [p for p, k in kinds.items() if k == "1x1"] == [
        "BasicBlock_2/Conv_2", "BasicBlock_4/Conv_2", "BasicBlock_6/Conv_2"]
    assert kinds["Dense_0"] == "dense" and sites[-1].dense_dims == ((64,), (10,))
    stem = sites[0].shape
    assert stem.kernel_size == (7, 7) and stem.strides == (2, 2) and stem.input_hw == (32, 32)


def test_resnet50_every_layer_is_a_candidate_and_the_cost_is_the_whole_nets():
    """The Flax examples' ResNet-50: 36 of its 53 convs are 1x1; every conv and the classifier
    are candidates, and their multiply-adds are the whole traced forward pass's."""
    model = resnet50(num_classes=1000)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    sites = surgery.find_convs(model, x, train=False)
    kinds = [s.kind for s in sites if s.candidate]
    assert len(sites) == 54 and (kinds.count("1x1"), kinds.count("kxk"), kinds.count("dense")) \
        == (36, 17, 1)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    traced = lrjax.macs.traced_macs(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert traced["total"] == sum(lrjax.costs.conv_cost(s.shape).macs for s in sites)
    # ResNet-50's published ~4.1 G multiply-adds count whole windows; 3.95 G land on the input
    assert 3.9e9 < traced["total"] < 4.0e9


def test_resnet_full_rank_round_trip_equals_the_original(resnet):
    model, variables, x = resnet
    top = _top_ranks(surgery.find_convs(model, x, train=False))
    result = lrjax.decompose_linen(model, variables, x, rule=top, train=False)
    want = apply(model, variables, x, train=False)
    got = apply(result.module, result.variables, x, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    flat = result.variables["params"]["BasicBlock_3"]["Conv_1"]
    assert set(flat) == {"vertical", "horizontal"}  # use_bias=False: no horizontal bias
    assert set(flat["horizontal"]) == {"kernel"}
    assert result.variables["batch_stats"].keys() == variables["batch_stats"].keys()


def test_resnet_speedup_2_runs_under_jit(resnet):
    model, variables, x = resnet
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:2", train=False)
    assert result.report.net.speedup >= 1.9
    assert result.report.net.speedup == pytest.approx(
        result.report.net.full_macs / result.report.net.lowrank_macs)
    assert result.report.speedup >= 1.99  # the whole net's multiply-adds
    assert "left as is" not in result.report.table()  # every layer could be split
    logits = jax.jit(lambda v, x: result.module.apply(v, x, train=False))(result.variables, x)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    # training mode with mutable batch statistics works through the wrapper too
    out, updates = apply(result.module, result.variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 10) and "batch_stats" in updates


class SeqBlock(nn.Module):
    """A conv block whose batch norm reads its mode from the collection's mutability, as
    n2cholas/jax-resnet's ``ConvBlock`` does."""
    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not self.is_mutable_collection("batch_stats"))(x)
        return nn.relu(x)


def test_sequential_of_blocks_in_a_list(tmp_path):
    """A net built as ``nn.Sequential([...])`` of module instances, a function and a head (the
    layers are fields of the Sequential, so ``nn.share_scope`` leaves their recorded scope path
    stale): paths match the variables, and the pairs reproduce it at full rank, data-free and
    calibrated, and export."""
    model = nn.Sequential([SeqBlock(8), SeqBlock(16), lambda x: jnp.mean(x, axis=(1, 2)),
                           nn.Dense(10)])
    x = jax.random.normal(jax.random.key(0), (4, 12, 12, 3))
    variables = init(model, 1, x)
    sites = surgery.find_convs(model, x)
    assert [s.path for s in sites] == ["layers_0/Conv_0", "layers_1/Conv_0", "layers_3"]
    want = apply(model, variables, x)
    for calibration in (None, x):
        result = lrjax.decompose_linen(model, variables, x, rule=_top_ranks(sites),
                                       calibration=calibration)
        np.testing.assert_allclose(apply(result.module, result.variables, x), want, rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(want).max()))
        assert result.variables["params"]["layers_1"]["Conv_0"]["vertical"]["kernel"].shape \
            == (3, 1, 8, 24)
    exported = lrjax.export.to_onnx(result.module, result.variables, x, str(tmp_path / "s.onnx"))
    assert exported.max_abs_error <= 1e-4 * exported.scale


def test_unsplittable_convs_are_left_with_the_reason():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), input_dilation=2, strides=2, padding=1)(x)
            x = nn.Conv(4, (3, 3), mask=jnp.ones((3, 3, 4, 4)))(x)
            x = nn.Conv(4, (3, 3, 1), padding="CIRCULAR")(x[..., None, :])  # a wrapped copy
            return x

    x = jnp.ones((1, 6, 6, 3))
    model = Odd()
    variables = init(model, 0, x)
    sites = {s.path: s.skip for s in surgery.find_convs(model, x)}
    assert sites["Conv_0"] == "input dilation 2 with strides 2"
    assert sites["Conv_1"] == "masked kernel"
    assert sites["Conv_2"].startswith("a 3-D conv with 'CIRCULAR' padding")
    with pytest.raises(ValueError, match=r"no layer this rule can decompose \(found Conv_0: "
                                         r"input dilation"):
        lrjax.decompose_linen(model, variables, x, rule="energy:0.5")
    result = lrjax.decompose_linen(model, variables, x, rule={})
    assert result.ranks == {}
    assert set(result.report.skipped) == {"Conv_0", "Conv_1", "Conv_2"}
    assert "left as is: Conv_1: masked kernel" in result.report.table()
    with pytest.raises(ValueError, match="'Conv_1' cannot be decomposed: masked kernel"):
        lrjax.decompose_linen(model, variables, x, rule={"Conv_1": 2})


def test_bad_rules_and_calibration(resnet):
    model, variables, x = resnet
    for rule, match in [
        ({"BasicBlock_0/Conv_9": 4}, r"unknown layers \['BasicBlock_0/Conv_9'\]; the model's "
                                     r"decomposable layers are \['BasicBlock_0/Conv_0'"),
        ({"BasicBlock_0/Conv_0": 1000}, "rank 1000 is invalid for layer 'BasicBlock_0/Conv_0'"),
        ({"BasicBlock_0/Conv_0": 0}, "rank 0 is invalid"),
    ]:
        with pytest.raises(ValueError, match=match):
            lrjax.decompose_linen(model, variables, x, rule=rule, train=False)
    with pytest.raises(ValueError, match="calibration is empty"):
        lrjax.decompose_linen(model, variables, x, rule="speedup:2", calibration=[], train=False)
    bad = x.at[0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"calibration batch 0 \(shape \(2, 32, 32, 3\)\) "
                                         "contains NaN/Inf"):
        lrjax.decompose_linen(model, variables, x, rule="speedup:2", calibration=bad,
                              train=False)


class Correlated(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="a")(x))
        return nn.Conv(16, (3, 3), name="b")(x)


def test_calibrated_factors_lower_the_output_error():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((8, 8)) * np.geomspace(0.05, 3.0, 8)  # strongly correlated
    images = jnp.asarray(rng.standard_normal((16, 12, 12, 8)) @ mixing, jnp.float32)
    model = Correlated()
    variables = init(model, 0, images)
    want = apply(model, variables, images)

    def output_error(result, x):
        got = apply(result.module, result.variables, x)
        return float(jnp.linalg.norm(got - apply(model, variables, x)) / jnp.linalg.norm(
            apply(model, variables, x)))

    rule = {"a": 6, "b": 10}
    free = lrjax.decompose_linen(model, variables, images, rule=rule)
    calib = lrjax.decompose_linen(model, variables, images, rule=rule,
                                  calibration=[images[:8], images[8:]])
    held_out = jnp.asarray(rng.standard_normal((8, 12, 12, 8)) @ mixing, jnp.float32)
    assert output_error(calib, images) < 0.7 * output_error(free, images)
    assert output_error(calib, held_out) < output_error(free, held_out)
    assert calib.report.calibrated and set(calib.report.weighted_errors) == {"a", "b"}
    # the data-free factors minimise the kernel error; the calibrated ones do not
    assert calib.report.errors["a"] > free.report.errors["a"]
    # exact at full rank, calibrated or not
    top = {"a": 24, "b": 48}
    full = lrjax.decompose_linen(model, variables, images, rule=top, calibration=images)
    np.testing.assert_allclose(apply(full.module, full.variables, images), want, rtol=1e-3,
                               atol=1e-3 * float(jnp.abs(want).max()))


class ThreeKinds(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(48, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3), feature_group_count=2)(x))
        x = nn.relu(nn.Conv(64, (1, 1))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_reported_weighted_errors_read_off_the_spectrum_are_the_weighted_errors():
    """A calibrated rule's report reads each one-group layer's weighted error off its whitened
    spectrum (no m x m products over the residual): the error computed from the factors."""
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16)) * jnp.linspace(0.1, 3.0, 16)
    model = ThreeKinds()
    result = lrjax.decompose_linen(model, init(model, 0, x), x, rule="speedup:2", calibration=x)
    problem, weighted = result.problem, result.report.weighted_errors
    assert len(weighted) == 4
    for path, error in weighted.items():
        rank, groups = result.report.ranks[path], problem.site(path).shape.groups
        want = lrjax.decompose.factor_errors(problem.kernels[path], problem.factors(path, rank),
                                             groups=groups, input_cov=problem.covariances[path])
        assert result.report.errors[path] == pytest.approx(want[0], rel=1e-9)
        # (the explicit product sums float32 products: near 0 it resolves ~sqrt(1e-7))
        assert error == pytest.approx(want[1], rel=1e-5, abs=1e-3)


def test_calibrated_energy_rule_uses_the_calibrated_spectrum():
    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((8, 8)) * np.geomspace(0.01, 3.0, 8)
    images = jnp.asarray(rng.standard_normal((8, 12, 12, 8)) @ mixing, jnp.float32)
    model = Correlated()
    variables = init(model, 0, images)
    free = lrjax.decompose_linen(model, variables, images, rule="energy:0.95")
    calib = lrjax.decompose_linen(model, variables, images, rule="energy:0.95",
                                  calibration=images)
    # the data excite few input directions: calibrated, 'a' is split at a small rank; data-free,
    # its rank is larger or it is kept full (a rank past break-even would save nothing)
    assert calib.ranks["a"] < free.ranks.get("a", decompose.max_rank((3, 3, 8, 16)))


class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3), use_bias=False, name="easy")(x)
        return nn.Conv(16, (3, 3), use_bias=False, name="hard")(x)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(u, w) for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                    strict=True))


def test_search_picks_the_layer_whose_decomposition_costs_least(monkeypatch):
    model = TwoLayers()
    x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
    variables = init(model, 1, x)
    # 'easy' is exactly rank 2; 'hard' has a flat spectrum
    v, h = decompose.vh_decompose(variables["params"]["easy"]["kernel"], 2)
    variables["params"]["easy"]["kernel"] = decompose.reconstruct(v, h)
    want = apply(model, variables, x)

    def agreement(module, v):
        got = module.apply(v, x)
        return -float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))

    result = surgery.search(model, variables, x, eval_fn=agreement, target_speedup=1.6,
                          candidates={"easy": [2, 8], "hard": [2, 8]})
    assert result.ranks == {"easy": 2, "hard": None}
    assert result.speedup >= 1.6 and result.predicted_drop == pytest.approx(0.0, abs=1e-4)
    assert result.scores["hard"][2] < result.scores["easy"][2]
    assert "easy" in result.table()
    # the same selection as a rule of decompose_linen
    rule = ranks.EvalGuided(agreement, target_speedup=1.6,
                            candidates={"easy": [2, 8], "hard": [2, 8]})
    decomposed = lrjax.decompose_linen(model, variables, x, rule=rule)
    assert decomposed.ranks == {"easy": 2} and rule.result.ranks == result.ranks
    np.testing.assert_allclose(apply(decomposed.module, decomposed.variables, x), want,
                               rtol=1e-3, atol=1e-3)
    with monkeypatch.context() as patch:  # the search's ranks applied on its own problem
        patch.setattr(decompose, "decompose_net", lambda *a, **k: pytest.fail("decomposed"))
        patch.setattr(decompose, "spectra_and_factors", lambda *a, **k: pytest.fail("again"))
        applied = lrjax.decompose_linen(model, variables, x, rule=result.ranks,
                                        problem=result.problem)
    assert _leaves_equal(applied.variables, decomposed.variables)
    with pytest.raises(ValueError, match="out of reach"):
        surgery.search(model, variables, x, eval_fn=agreement, target_speedup=50,
                     candidates={"easy": [2, 8], "hard": [2, 8]})
    with pytest.raises(ValueError, match="invalid for layer 'easy'"):
        surgery.search(model, variables, x, eval_fn=agreement, target_speedup=1.5,
                     candidates={"easy": [999]})
    with pytest.raises(ValueError, match=r"unknown layers \['nope'\]"):
        surgery.search(model, variables, x, eval_fn=agreement, target_speedup=1.5,
                     candidates={"nope": [2]})


@pytest.mark.slow  # 4 s on the 2-core machine: the default run stays under 5 minutes
def test_finetune_a_decomposed_user_model_with_lrjax_train(resnet):
    model, variables, x = resnet
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:2", train=False)
    labels = jnp.asarray([3, 7])
    state = train.state_from_variables(result.module, result.variables,
                                       optax.sgd(0.05, momentum=0.9))
    step = jax.jit(train.train_step)
    batch = {"image": x, "label": labels}
    losses = []
    for _ in range(6):
        metrics = train.zero_metrics(10)
        state, metrics = step(state, batch, metrics)
        losses.append(float(metrics["loss"] / metrics["count"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert jax.tree.structure(state.params) == jax.tree.structure(result.variables["params"])


# ---------------------------------------------------------------------------------------------
# NNX


@pytest.fixture
def nnx_model():
    return NNXCNN(rngs=nnx.Rngs(0)), jax.random.normal(jax.random.key(3), (2, 16, 16, 3))


def test_nnx_full_rank_round_trip_and_original_untouched(nnx_model):
    model, x = nnx_model
    before = np.asarray(model.stem.kernel[...])
    want = model(x)
    top = {"stem": 9, "body/layers/0": 48, "body/layers/2": 48, "blocks/0": 96, "blocks/1": 96}
    result = lrjax.decompose_nnx(model, x, rule=top)
    new, report = result.module, result.report
    assert result.variables is None and result.ranks == top
    np.testing.assert_allclose(new(x), want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    assert isinstance(new.blocks[1], LowRankConvNNX) and isinstance(new.body.layers[2],
                                                                    LowRankConvNNX)
    assert type(model.blocks[1]) is nnx.Conv and type(model.stem) is nnx.Conv
    np.testing.assert_array_equal(model.stem.kernel[...], before)
    assert set(report.errors) == set(top) and max(report.errors.values()) < 1e-5
    assert new.body.layers[2].vertical.strides == (2, 1)


def test_nnx_speedup_2_runs_under_jit(nnx_model):
    model, x = nnx_model
    result = lrjax.decompose_nnx(model, x, rule="speedup:2")
    new, report = result.module, result.report
    assert report.net.speedup >= 1.9
    assert "head" not in report.ranks
    out = nnx.jit(lambda m, x: m(x))(new, x)
    assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out)))


def test_nnx_calibration_search_and_errors(nnx_model):
    model, x = nnx_model
    rule = {"body/layers/0": 4, "blocks/0": 8}
    free_model = lrjax.decompose_nnx(model, x, rule=rule).module
    calibrated = lrjax.decompose_nnx(model, x, rule=rule, calibration=[x, x * 0.5])
    new, calib = calibrated.module, calibrated.report
    want = model(x)
    assert calib.calibrated and set(calib.weighted_errors) == set(rule)
    assert float(jnp.linalg.norm(new(x) - want)) < float(jnp.linalg.norm(free_model(x) - want))
    guided = ranks.EvalGuided(lambda m: -float(jnp.linalg.norm(m(x) - want)), target_speedup=1.3,
                              candidates=(0.2, 0.5))
    report = lrjax.decompose_nnx(model, x, rule=guided).report
    assert report.net.speedup >= 1.3 and guided.result.ranks == {
        k: v for k, v in guided.result.ranks.items()}
    for kwargs, match in [
        (dict(rule={"blocks/7": 2}), r"unknown layers \['blocks/7'\]"),
        (dict(rule={"head": 0}), "rank 0 is invalid for layer 'head'"),
        (dict(rule={"stem": 99}), "rank 99 is invalid for layer 'stem'"),
        (dict(rule="speedup:2", calibration=[]), "calibration is empty"),
        (dict(rule="speedup:2", calibration=x.at[1].set(jnp.inf)), "contains NaN/Inf"),
    ]:
        with pytest.raises(ValueError, match=match):
            lrjax.decompose_nnx(model, x, **kwargs)


# ---------------------------------------------------------------------------------------------
# Subclasses of Flax's layers


class StdConv(nn.Conv):
    """BiT's weight-standardized conv, as google-research/vision_transformer writes it."""

    def param(self, name, init_fn, *init_args):
        param = super().param(name, init_fn, *init_args)
        if name == "kernel":
            param = param - jnp.mean(param, axis=(0, 1, 2))
            param = param / (jnp.std(param, axis=(0, 1, 2)) + 1e-5)
        return param


class NormedDense(nn.Dense):
    """A dense layer whose columns are normalised and whose bias is scaled, in ``param``."""

    def param(self, name, *args, **kwargs):
        value = super().param(name, *args, **kwargs)
        return value * 0.5 if name == "bias" else value / jnp.linalg.norm(value, axis=0)


class Conv3(nn.Conv):
    """Only another default: computes as ``nn.Conv``."""
    kernel_size: tuple = (3, 3)


class ShiftedConv(nn.Conv):
    """Its own code around its base's call (MAGVIT's and VQGAN ports' padding ``Conv``): split
    in that call, on the input it is given there; the shift runs as written."""

    def __call__(self, x):
        return super().__call__(x + 1.0) * 0.5


class DoubledConv(nn.Conv):
    """Its own computation, without its base's call: never split."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
        return 2.0 * jnp.einsum("...c,cn->...n", x, kernel[0, 0])


class NormalizedConv(nn.Conv):
    """Its base's call, then its own code reading the kernel: never split."""

    def __call__(self, x):
        return super().__call__(x) / jnp.linalg.norm(self.variables["params"]["kernel"])


class BiTLike(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=4)(StdConv(16, (3, 3), use_bias=False)(x)))
        x = nn.relu(StdConv(24, (1, 1), use_bias=False)(x))
        x = nn.relu(Conv3(24)(x))
        x = ShiftedConv(8, (3, 3), padding="VALID")(x)
        x = DoubledConv(8, (1, 1))(x)
        x = NormalizedConv(8, (3, 3))(x)
        return NormedDense(10)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.slow  # 6 s on the 2-core machine: the default run stays under 5 minutes
def test_subclasses_that_compute_as_their_layer_are_split_on_the_weights_they_use(tmp_path):
    """A subclass that redefines only ``param`` (weight standardization) is split on the weights
    ``param`` returns, and the whole-net cost saves the standardization of the layers split;
    one with only other defaults is an ``nn.Conv``; one that redefines ``__call__`` is split in
    its base's call (``super().__call__``) if it makes one and reads no kernel of its own, kept
    otherwise."""
    model, x = BiTLike(), jax.random.normal(jax.random.key(0), (1, 12, 12, 3))
    variables = init(model, 1, x)
    variables = jax.tree.map(lambda v: v + 0.3, variables)  # kernels far from standardized
    sites = {s.path: s for s in surgery.find_convs(model, x)}
    assert [p for p, s in sites.items() if s.candidate] == [
        "StdConv_0", "StdConv_1", "Conv3_0", "ShiftedConv_0", "NormedDense_0"]
    assert sites["StdConv_0"].parametrization is not None and sites["Conv3_0"].parametrization \
        is None
    assert sites["ShiftedConv_0"].shape.input_hw == (12, 12)  # VALID: its output 10x10
    assert sites["DoubledConv_0"].skip == ("DoubledConv (a subclass of Conv that redefines "
                                           "__call__: its own computation is kept)")
    assert sites["NormalizedConv_0"].skip == ("NormalizedConv (a subclass that runs its base's "
                                              "__call__ but also reads its kernel: its own "
                                              "computation is kept)")
    want = apply(model, variables, x)
    top = _top_ranks(list(sites.values()))
    result = lrjax.decompose_linen(model, variables, x, rule=top,
                                   calibration=jnp.concatenate([x, x * 0.5, x + 1.0, -x]))
    np.testing.assert_allclose(apply(result.module, result.variables, x), want, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(want).max()))
    assert max(result.report.errors.values()) < 1e-5  # of the standardized kernels
    assert result.variables["params"]["NormedDense_0"]["horizontal"]["bias"].shape == (10,)
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5")
    low = lowered_flops(lambda v, x: result.module.apply(v, x), result.variables, x)
    before, after = result.report.net_flops
    assert before == lowered_flops(lambda v, x: model.apply(v, x), variables, x)
    assert abs(after - low) <= 1e-6 * low and result.report.speedup >= 1.5
    exported = export.to_onnx(result.module, result.variables, x, str(tmp_path / "b.onnx"))
    assert exported.max_abs_error <= 1e-4 * exported.scale


def test_parametrized_kernels_are_read_in_one_jitted_pass():
    """The kernels of the layers that reparametrize their weights (BiT's weight-standardized
    convs, a normalized dense layer) are read together, in one traced call, the first time one
    is needed: each layer's ``param`` run eagerly dispatched its every op, ~65 ms a layer
    (OWL-ViT's mask head: 71 such convs, 4.7 s of a 7 s decomposition). The kernels are those
    the layers compute with."""
    model, x = BiTLike(), jax.random.normal(jax.random.key(0), (1, 12, 12, 3))
    variables = jax.tree.map(lambda v: v + 0.3, init(model, 1, x))
    runs = []

    def counted(site):
        def parametrization(params):
            runs.append((site.path, isinstance(params["kernel"], jax.core.Tracer)))
            return site.parametrization(params)
        return dataclasses.replace(site, parametrization=parametrization)

    found = [counted(s) if s.parametrization is not None else s
             for s in surgery.find_convs(model, x) if s.candidate]
    flat = {("params", *k): v for k, v in traverse_util.flatten_dict(
        variables["params"]).items()}
    kernels = SiteKernels(flat, found)
    standardized = kernels["StdConv_0"]
    assert sorted(runs) == [("NormedDense_0", True), ("StdConv_0", True), ("StdConv_1", True)]
    assert kernels["NormedDense_0"] is kernels["NormedDense_0"] and len(runs) == 3
    stored = variables["params"]["StdConv_0"]["kernel"]
    want = (stored - stored.mean((0, 1, 2))) / (stored.std((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(standardized, want, rtol=1e-5, atol=1e-5)


def test_nnx_subclasses_that_compute_as_their_layer_are_split(tmp_path):
    """NNX: a subclass with another ``__init__`` is its base; one whose ``__call__`` runs its
    base's (``super().__call__`` on a padded or shifted input) is split in that call, its own
    code kept around the pair (its class swapped for one whose base call is the pair's), to
    ONNX and back from a saved folder; one computing on its own, or reading its kernel besides,
    is kept."""
    class Conv3NNX(nnx.Conv):
        def __init__(self, cin, cout, *, rngs):
            super().__init__(cin, cout, (3, 3), rngs=rngs)

    class ReflectConv(nnx.Conv):
        def __call__(self, x):
            return super().__call__(jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], "reflect"))

    class ShiftedLinear(nnx.Linear):
        def __call__(self, x):
            return super().__call__(x + 1.0) * 0.5

    class NormalizedLinear(nnx.Linear):
        def __call__(self, x):
            return super().__call__(x) / jnp.linalg.norm(self.kernel[...])

    class OwnConv(nnx.Conv):
        def __call__(self, x):
            return 2.0 * jnp.einsum("...c,cn->...n", x, self.kernel[0, 0])

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = Conv3NNX(3, 16, rngs=rngs)
            self.pad = ReflectConv(16, 16, (3, 3), padding="VALID", rngs=rngs)
            self.own = OwnConv(16, 16, (1, 1), rngs=rngs)
            self.norm = NormalizedLinear(16, 16, rngs=rngs)
            self.head = ShiftedLinear(16, 10, rngs=rngs)

        def __call__(self, x):
            x = self.own(self.pad(nnx.relu(self.conv(x))))
            return self.head(self.norm(jnp.mean(x, axis=(1, 2))))

    model, x = Net(nnx.Rngs(0)), jax.random.normal(jax.random.key(0), (2, 10, 10, 3))
    found = {s.path: s for s in nnx_surgery.find_convs_nnx(model, x)}
    assert [p for p, s in found.items() if s.candidate] == ["conv", "pad", "head"]
    assert found["pad"].shape.input_hw == (12, 12)  # the padded input its base's call gets
    assert found["own"].skip == ("OwnConv (a subclass of Conv that redefines __call__: its "
                                 "own computation is kept)")
    assert found["norm"].skip == ("NormalizedLinear (a subclass that runs its base's __call__ "
                                  "but also reads its kernel: its own computation is kept)")
    top = {p: costs.max_rank(s.shape.kernel_shape) for p, s in found.items() if s.candidate}
    result = lrjax.decompose_nnx(model, x, rule=top, calibration=x)
    np.testing.assert_allclose(result.module(x), model(x), rtol=1e-4, atol=1e-5)
    assert isinstance(result.module.conv, LowRankConvNNX)
    assert isinstance(result.module.pad, ReflectConv) and \
        result.module.pad.vertical.kernel[...].shape == (3, 1, 16, top["pad"])
    split = lrjax.decompose_nnx(model, x, rule={"pad": 4, "head": 2})
    graphs = [nnx.split(m) for m in (model, split.module)]
    flops = [lowered_flops(lambda s, x, g=g: nnx.merge(g, s)(x), s, x) for g, s in graphs]
    # (to one flop: the kernel's norm, computed once a call, is not a per-example cost)
    assert flops[0] / flops[1] == pytest.approx(split.report.speedup, rel=1e-5)
    exported = export.to_onnx(split.module, None, x, str(tmp_path / "n.onnx"))
    assert exported.max_abs_error <= 1e-5 + 1e-4 * exported.scale
    loaded = lrjax.load_decomposed(lrjax.save_decomposed(str(tmp_path / "s"), split),
                                   Net(nnx.Rngs(1)), x)
    np.testing.assert_array_equal(loaded(x), split.module(x))


class StdBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + 0.1 * StdConv(8, (3, 3), name="conv")(nn.relu(x)), None


class ScannedStdConvs(nn.Module):
    """BiT's standardized convs stacked by ``nn.scan``: kernels ``(3, 3, 3, 8, 8)``."""

    @nn.compact
    def __call__(self, x):
        return nn.scan(StdBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="blocks")(x, None)[0]


def test_a_reparametrized_layer_stacked_by_scan_splits_per_iteration():
    """Each iteration's kernel standardized as its ``param`` does (left as it was before: a
    stacked layer that reparametrizes its weights), factored per iteration, exact at full
    rank, data-free and calibrated."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
    model = ScannedStdConvs()
    variables = model.init(jax.random.key(1), x)
    site, = surgery.find_convs(model, x)
    assert site.candidate and site.stack == 3 and site.parametrization is not None
    full = lrjax.decompose_linen(model, variables, x, rule={"blocks/conv": 3 * 24})
    want = model.apply(variables, x)
    np.testing.assert_allclose(full.module.apply(full.variables, x), want, atol=1e-5)
    for calibration in (None, jax.random.normal(jax.random.key(3), (8, 8, 8, 8))):
        split = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5",
                                      calibration=calibration)
        assert split.ranks["blocks/conv"] % 3 == 0 and split.report.speedup >= 1.5
