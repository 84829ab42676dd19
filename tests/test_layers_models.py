"""LowRankConv, the model zoo and cost reports."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import cost_report, decompose, layers, models, surgery
from lrjax.layers import LowRankConv, split_padding
from tests.helpers import apply, grid, init

PADDINGS = ["SAME", "VALID", "CIRCULAR", "SAME_LOWER", 1, 2, (1, 2), [(0, 2), (1, 0)],
            ((2, 1), (0, 3))]


def _pair_variables(conv_vars, rank, groups=1):
    v, h = decompose.vh_decompose(conv_vars["params"]["kernel"], rank, groups=groups)
    return {"params": {"vertical": {"kernel": v},
                       "horizontal": {"kernel": h, "bias": conv_vars["params"]["bias"]}}}


@pytest.mark.parametrize("padding,strides,dilation,groups", grid(
    [(p,) for p in PADDINGS], [(1, 1, 1), (2, 1, 1), ((2, 1), (1, 2), 1), (1, 1, 2)]))
def test_lowrank_conv_matches_conv(padding, strides, dilation, groups):
    x = jax.random.normal(jax.random.key(0), (2, 11, 10, 4))
    conv = nn.Conv(6, (3, 5), strides=strides, padding=padding, kernel_dilation=dilation,
                   feature_group_count=groups)
    cv = init(conv, 1, x)
    cv = jax.tree.map(lambda a: a + 0.1, cv)  # non-zero bias
    top = decompose.max_rank(cv["params"]["kernel"].shape, groups=groups)
    pair = LowRankConv(6, (3, 5), rank=top, strides=strides, padding=padding,
                       kernel_dilation=dilation, feature_group_count=groups)
    pv = init(pair, 2, x)
    assert pv["params"]["vertical"]["kernel"].shape == (3, 1, 4 // groups, top)
    assert "bias" not in pv["params"]["vertical"]
    want = conv.apply(cv, x)
    got = pair.apply(_pair_variables(cv, top, groups), x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
    low = LowRankConv(6, (3, 5), rank=2 * groups, strides=strides, padding=padding,
                      kernel_dilation=dilation, feature_group_count=groups)
    assert low.apply(_pair_variables(cv, 2 * groups, groups), x).shape == want.shape


def test_lowrank_conv_mid_norm_and_dtype():
    x = jnp.ones((2, 8, 8, 3))
    layer = LowRankConv(8, (3, 3), rank=4, mid_norm=lambda name: nn.LayerNorm(name=name),
                        dtype=jnp.bfloat16)
    v = init(layer, 0, x)
    assert "mid_norm" in v["params"]
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 8, 8, 8)
    assert v["params"]["vertical"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("rank,groups,match", [
    (0, 1, r"rank 0 is invalid for LowRankConv: out of range \[1, 9\]"),
    (10, 1, r"rank 10 is invalid for LowRankConv: out of range \[1, 9\]"),
    (3, 3, r"N=4 .* not divisible by groups=3"),
    (3, 1, None),
])
def test_lowrank_conv_bad_rank(rank, groups, match):
    layer = LowRankConv(4, (3, 3), rank=rank, feature_group_count=groups)
    x = jnp.ones((1, 5, 5, 3))
    if match is None:
        layer.init(jax.random.key(0), x)
        return
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.key(0), x)


def test_lowrank_conv_rank_not_divisible_by_groups():
    with pytest.raises(ValueError, match="rank 3 is invalid for .*not divisible by groups=2"):
        LowRankConv(4, (3, 3), rank=3, feature_group_count=2).init(
            jax.random.key(0), jnp.ones((1, 5, 5, 4)))


def test_split_padding():
    assert split_padding("SAME") == ("SAME", "SAME")
    assert split_padding(2) == (((2, 2), (0, 0)), ((0, 0), (2, 2)))
    assert split_padding([(1, 2), 3]) == (((1, 2), (0, 0)), ((0, 0), (3, 3)))
    with pytest.raises(ValueError, match="CAUSAL"):
        split_padding("CAUSAL")


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def _shapes(model, size):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


@pytest.mark.parametrize("name,count", [("vgg16", 138_357_544), ("nin", 966_986),
                                        ("caffenet", 60_965_224)])
def test_exact_parameter_counts(name, count):
    model = models.get_model(name)
    assert _count(_shapes(model, models.model_spec(name).image_size)["params"]) == count


def test_lowrank_vgg16_structure():
    model = models.get_model("vgg16", lowrank=True)
    assert isinstance(model, layers.LowRankModel) and isinstance(model.base, models.VGG16)
    p = _shapes(model, 224)["params"]
    assert p["conv1_1"]["vertical"]["kernel"].shape == (3, 1, 3, 5)
    assert p["conv5_3"]["horizontal"]["kernel"].shape == (1, 3, 320, 512)
    assert set(p["conv5_3"]) == {"vertical", "horizontal"}
    assert p["fc6"]["kernel"].shape == (25088, 4096)


def test_lowrank_caffenet_grouped_structure():
    p = _shapes(models.get_model("caffenet", lowrank=True), 227)["params"]
    assert p["conv2"]["vertical"]["kernel"].shape == (5, 1, 48, 40)
    assert p["conv2"]["horizontal"]["kernel"].shape == (1, 5, 20, 256)


def test_lowrank_conv_and_lowrank_model_share_the_variable_layout():
    """A conv decomposed by LowRankModel keeps LowRankConv's layout under the conv's path, so
    checkpoints written by either load into the other."""
    class WithPair(nn.Module):
        @nn.compact
        def __call__(self, x):
            return LowRankConv(8, (3, 3), rank=4, name="conv")(x)

    class WithConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(8, (3, 3), name="conv")(x)

    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    pair_vars = init(WithPair(), 1, x)
    wrapped = layers.LowRankModel.wrap(WithConv(), {"conv": 4})
    assert jax.tree.structure(init(wrapped, 1, x)) == \
        jax.tree.structure(pair_vars)
    np.testing.assert_allclose(wrapped.apply(pair_vars, x), WithPair().apply(pair_vars, x),
                               rtol=1e-6)


@pytest.mark.parametrize("family,expect", [  # whole windows counted: 15.35 G -> 4.94 G (3.10x),
    ("vgg16", (14.85e9, 4.86e9, 3.06)),        # 0.666 G -> 0.126 G (5.29x), 222.5 M -> 118.6 M
    ("caffenet", (0.613e9, 0.121e9, 5.06)),    # (1.88x): the papers' arithmetic
    ("nin", (201.0e6, 113.4e6, 1.77)),
])
def test_cost_reports_of_the_authors_ranks(family, expect):
    full, low, speed = expect
    report = cost_report.zoo_cost_report(family)
    assert report.full_macs == pytest.approx(full, rel=2e-3)
    assert report.lowrank_macs == pytest.approx(low, rel=2e-3)
    assert report.speedup == pytest.approx(speed, abs=0.01)


def test_cost_report_of_full_model_with_ranks():
    model = models.get_model("nin")
    x = cost_report.images(1, 32)
    report = cost_report.cost_report(model, x, ranks={"conv1": 10, "conv2": 51}, train=False)
    assert report.lowrank_macs == 113_384_832
    sites = surgery.find_convs(model, x, train=False)
    assert [s.path for s in sites][:3] == ["conv1", "cccp1", "cccp2"]
    assert sites[3].shape.input_hw == (16, 16)
    assert sites[1].kind == "1x1" and sites[1].candidate and sites[0].kind == "kxk"
    assert sites[-1].kind == "1x1" and all(s.candidate for s in sites)


@pytest.mark.parametrize("family,bn,lowrank", grid([("nin", True), ("cnn", False)],
                                                   [(False,), (True,)]))
def test_cifar_models_forward_train_and_eval(family, bn, lowrank):
    model = models.get_model(family, lowrank=lowrank, bn=bn)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = init(model, 1, x, train=False)
    assert ("batch_stats" in variables) == bn
    assert ("vertical" in variables["params"]["conv1"]) == lowrank
    logits = apply(model, variables, x, train=False)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    out, updates = apply(model, variables, x, train=True, rngs={"dropout": jax.random.key(2)},
                               mutable=["batch_stats"])
    assert out.shape == (4, 10) and bool(jnp.all(jnp.isfinite(out)))
    if bn:
        # BN momentum 0.9: running mean moves 10% of the way to the batch mean
        before = variables["batch_stats"]["bn1"]["mean"]
        after = updates["batch_stats"]["bn1"]["mean"]
        assert not np.allclose(before, after)


def test_bfloat16_compute():
    model = models.get_model("nin", lowrank=True, dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    variables = init(model, 0, x)
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    assert apply(model, variables, x).dtype == jnp.float32


def test_registry_errors_and_custom_ranks():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.get_model("resnet")
    with pytest.raises(ValueError, match="has no shipped ranks"):
        models.get_model("alexnet", lowrank=True)
    model = models.get_model("nin", ranks={"conv1": 4, "conv2": None})
    assert model.ranks == (("conv1", 4),)
    p = _shapes(model, 32)["params"]
    assert p["conv1"]["vertical"]["kernel"].shape == (5, 1, 3, 4)
    assert "kernel" in p["conv2"]
    with pytest.raises(ValueError, match="never called as nn.Conv, nn.ConvTranspose, nn.Dense, "
                                         "nn.DenseGeneral or nn.Einsum: \\['conv9'\\]"):
        _shapes(models.get_model("nin", ranks={"conv9": 4}), 32)


def test_adaptive_avg_pool_matches_torch_bins():
    x = jnp.arange(2 * 10 * 10 * 1, dtype=jnp.float32).reshape(2, 10, 10, 1)
    y = models.adaptive_avg_pool(x, (7, 7))
    assert y.shape == (2, 7, 7, 1)
    # torch bin 1 along rows of a 10-long axis: [1, 3)
    np.testing.assert_allclose(y[0, 1, 0, 0], x[0, 1:3, 0:2, 0].mean())


