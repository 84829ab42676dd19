"""LowRankConv, the model zoo and cost reports."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import cost_report, decompose, layers, models
from lrjax.layers import LowRankConv, low_rank, split_padding

PADDINGS = ["SAME", "VALID", "CIRCULAR", "SAME_LOWER", 1, 2, (1, 2), [(0, 2), (1, 0)],
            ((2, 1), (0, 3))]


def _pair_variables(conv_vars, rank, groups=1):
    v, h = decompose.vh_decompose(conv_vars["params"]["kernel"], rank, groups=groups)
    return {"params": {"vertical": {"kernel": v},
                       "horizontal": {"kernel": h, "bias": conv_vars["params"]["bias"]}}}


@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("strides,dilation,groups", [(1, 1, 1), (2, 1, 1), ((2, 1), (1, 2), 1),
                                                     (1, 1, 2)])
def test_lowrank_conv_matches_conv(padding, strides, dilation, groups):
    x = jax.random.normal(jax.random.key(0), (2, 11, 10, 4))
    conv = nn.Conv(6, (3, 5), strides=strides, padding=padding, kernel_dilation=dilation,
                   feature_group_count=groups)
    cv = conv.init(jax.random.key(1), x)
    cv = jax.tree.map(lambda a: a + 0.1, cv)  # non-zero bias
    top = decompose.max_rank(cv["params"]["kernel"].shape, groups=groups)
    pair = LowRankConv(6, (3, 5), rank=top, strides=strides, padding=padding,
                       kernel_dilation=dilation, feature_group_count=groups)
    pv = pair.init(jax.random.key(2), x)
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
    v = layer.init(jax.random.key(0), x)
    assert "mid_norm" in v["params"]
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 8, 8, 8)
    assert v["params"]["vertical"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("rank,groups,match", [
    (0, 1, r"rank=0 is out of range \[1, 9\]"),
    (10, 1, r"rank=10 is out of range \[1, 9\]"),
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
    with pytest.raises(ValueError, match="rank=3 is not divisible by feature_group_count=2"):
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


@pytest.mark.parametrize("name,count", [("vgg16", 138_357_544), ("nin", 966_986),
                                        ("caffenet", 60_965_224)])
def test_exact_parameter_counts(name, count):
    model = models.get_model(name)
    size = models.model_spec(name).image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    assert _count(shapes["params"]) == count


def test_lowrank_vgg16_structure():
    model = models.get_model("lowrank_vgg16")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    p = shapes["params"]
    assert p["conv1_1"]["vertical"]["kernel"].shape == (3, 1, 3, 5)
    assert p["conv5_3"]["horizontal"]["kernel"].shape == (1, 3, 320, 512)
    assert p["fc6"]["kernel"].shape == (25088, 4096)


def test_lowrank_caffenet_grouped_structure():
    model = models.get_model("lowrank_caffenet")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 227, 227, 3))))
    p = shapes["params"]
    assert p["conv2"]["vertical"]["kernel"].shape == (5, 1, 48, 40)
    assert p["conv2"]["horizontal"]["kernel"].shape == (1, 5, 20, 256)


@pytest.mark.parametrize("name,expect", [
    ("lowrank_vgg16", (15.35e9, 4.94e9, 3.10)),
    ("lowrank_caffenet", (0.666e9, 0.126e9, 5.29)),
    ("lowrank_nin", (222.5e6, 118.6e6, 1.88)),
])
def test_cost_reports_match_paper(name, expect):
    full, low, speed = expect
    report = cost_report.zoo_cost_report(name)
    assert report.full_macs == pytest.approx(full, rel=2e-3)
    assert report.lowrank_macs == pytest.approx(low, rel=2e-3)
    assert report.speedup == pytest.approx(speed, abs=0.01)


def test_cost_report_of_full_model_with_ranks():
    model = models.get_model("nin")
    report = cost_report.cost_report(model, (1, 32, 32, 3), ranks={"conv1": 10, "conv2": 51})
    assert report.lowrank_macs == 118_560_768
    layers = cost_report.conv_layers(model, (1, 32, 32, 3))
    assert [layer.shape.name for layer in layers][:3] == ["conv1", "cccp1", "cccp2"]
    assert layers[3].shape.input_hw == (16, 16)


@pytest.mark.parametrize("name", ["nin", "lowrank_nin", "nin_bn", "lowrank_nin_bn", "cnn",
                                  "lowrank_cnn"])
def test_cifar_models_forward_train_and_eval(name):
    model = models.get_model(name)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    assert ("batch_stats" in variables) == name.endswith("_bn")
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    out, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)},
                               mutable=["batch_stats"])
    assert out.shape == (4, 10) and bool(jnp.all(jnp.isfinite(out)))
    if name.endswith("_bn"):
        # BN momentum 0.9: running mean moves 10% of the way to the batch mean
        before = variables["batch_stats"]["bn1"]["mean"]
        after = updates["batch_stats"]["bn1"]["mean"]
        assert not np.allclose(before, after)
        assert model.norm.keywords["momentum"] == 0.9


def test_bfloat16_compute():
    model = models.get_model("lowrank_nin", dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    assert model.apply(variables, x).dtype == jnp.float32


def test_registry_errors_and_custom_ranks():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.get_model("resnet")
    model = models.get_model("nin", ranks={"conv1": 4})
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert shapes["params"]["conv1"]["vertical"]["kernel"].shape == (5, 1, 3, 4)
    assert low_rank({"a": 3, "b": None}).rank_map == {"a": 3}


def test_adaptive_avg_pool_matches_torch_bins():
    x = jnp.arange(2 * 10 * 10 * 1, dtype=jnp.float32).reshape(2, 10, 10, 1)
    y = models.adaptive_avg_pool(x, (7, 7))
    assert y.shape == (2, 7, 7, 1)
    # torch bin 1 along rows of a 10-long axis: [1, 3)
    np.testing.assert_allclose(y[0, 1, 0, 0], x[0, 1:3, 0:2, 0].mean())


@pytest.mark.parametrize("padding", ["SAME", "VALID", 2, ((2, 1), (0, 3))], ids=str)
@pytest.mark.parametrize("strides,dilation", [(1, 1), (2, 1), ((1, 2), (2, 1))])
@pytest.mark.parametrize("cin,rank,cout", [(6, 2, 8), (2, 5, 3)])  # both matmul orders
def test_matmul_implementation_matches_conv(padding, strides, dilation, cin, rank, cout):
    x = jax.random.normal(jax.random.key(0), (2, 11, 10, cin))
    kwargs = dict(strides=strides, padding=padding, kernel_dilation=dilation)
    ref = LowRankConv(cout, (3, 5), rank=rank, **kwargs)
    variables = ref.init(jax.random.key(1), x)
    fast = LowRankConv(cout, (3, 5), rank=rank, implementation="matmul", **kwargs)
    assert jax.tree.structure(fast.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(fast.apply(variables, x), ref.apply(variables, x), atol=1e-4)
    with pytest.raises(ValueError, match="implementation must be one of"):
        LowRankConv(cout, (3, 5), rank=rank, implementation="fft").init(jax.random.key(1), x)


@pytest.mark.parametrize("window,strides,padding,shape", [
    ((3, 3), (2, 2), "VALID", (2, 17, 17, 3)), ((2, 2), (2, 2), "VALID", (2, 8, 6, 2)),
    ((3, 3), (2, 2), "SAME", (1, 9, 10, 2)), ((3, 2), (1, 2), ((1, 0), (0, 1)), (2, 7, 9, 3)),
    ((3, 3), None, "VALID", (5, 5, 4)),  # no batch axis
])
def test_max_pool_matches_flax(window, strides, padding, shape):
    x = jax.random.normal(jax.random.key(0), shape)  # continuous values: no ties
    ours = functools.partial(models.max_pool, window_shape=window, strides=strides, padding=padding)
    ref = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
    np.testing.assert_array_equal(ours(x), ref(x))
    cotangent = jax.random.normal(jax.random.key(1), ref(x).shape)
    grad_ours = jax.vjp(ours, x)[1](cotangent)[0]
    grad_ref = jax.vjp(ref, x)[1](cotangent)[0]
    np.testing.assert_allclose(grad_ours, grad_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_ties_share_the_gradient():
    x = jnp.zeros((1, 3, 3, 1)).at[0, 1, 2, 0].set(-1.0)  # eight inputs tie for the maximum
    grad = jax.grad(lambda x: models.max_pool(x, (3, 3), (1, 1)).sum())(x)
    assert grad[0, 1, 2, 0] == 0
    assert bool(jnp.all(grad >= 0))
    np.testing.assert_allclose(grad.sum(), 1.0, rtol=1e-6)


def test_max_pool_is_reduce_window_alone_and_slices_when_differentiated():
    x = jnp.ones((2, 9, 9, 3))
    pool = functools.partial(models.max_pool, window_shape=(3, 3), strides=(2, 2))
    assert "reduce_window_max" in str(jax.make_jaxpr(pool)(x))
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: pool(x).sum()))(x))
    assert "select_and_scatter" not in grad_jaxpr and "reduce_window" not in grad_jaxpr


@pytest.mark.parametrize("window,strides,padding,shape,match", [
    ((3, 3), (2,), "VALID", (1, 8, 8, 1), "strides"),
    ((9, 9), (1, 1), "VALID", (1, 8, 8, 1), r"do not fit .*\(1, 8, 8, 1\)"),
    ((2, 2), (2, 2), ((1, 1),), (1, 8, 8, 1), "padding"),
    ((2, 2), (0, 2), "VALID", (1, 8, 8, 1), "strides"),
])
def test_max_pool_bad_input(window, strides, padding, shape, match):
    with pytest.raises(ValueError, match=match):
        models.max_pool(jnp.zeros(shape), window, strides, padding)


@pytest.mark.parametrize("kernel,strides,padding,dilation,shape", [
    ((5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), (2, 9, 8, 3)),
    ((5, 1), (1, 1), ((2, 2), (0, 0)), (1, 1), (2, 9, 8, 3)),
    ((1, 5), (1, 2), "SAME", (1, 2), (2, 9, 11, 4)),
    ((3, 3), (2, 2), "VALID", (1, 1), (3, 10, 10, 5)),
    ((1, 1), (1, 1), "SAME", (1, 1), (2, 4, 4, 6)),
])
def test_conv_gemm_weight_grad_matches_lax(kernel, strides, padding, dilation, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (*kernel, shape[-1], 7))

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))))

    ref = jax.jit(jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated),
                                     argnums=(0, 1)))(x, w)
    ours = jax.jit(jax.value_and_grad(functools.partial(loss, layers.conv_gemm_weight_grad),
                                      argnums=(0, 1)))(x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_gemm_weight_grad_rejects_groups_and_layouts():
    x, w = jnp.zeros((1, 6, 6, 4)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="feature_group_count=2"):
        layers.conv_gemm_weight_grad(x, w, (1, 1), "SAME", feature_group_count=2)
    with pytest.raises(ValueError, match="NHWC"):
        layers.conv_gemm_weight_grad(x, jnp.zeros((3, 3, 4, 4)), (1, 1), "SAME",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))


def test_thin_convs_get_the_gemm_weight_gradient(monkeypatch):
    """On CPU the factory routes thin-patch full convs through the GEMM
    gradient, wide ones through XLA's conv; the model's gradients are unchanged."""
    calls = []
    real = layers.conv_gemm_weight_grad
    monkeypatch.setattr(layers, "conv_gemm_weight_grad",
                        lambda lhs, rhs, *a, **k: calls.append(rhs.shape) or real(lhs, rhs, *a, **k))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

    def grads(factory):
        conv1 = factory(6, (5, 5), padding=2, name="conv1")
        conv2 = factory(8, (5, 5), padding=2, name="conv2")
        net = nn.Sequential([conv1, nn.relu, conv2])
        variables = net.init(jax.random.key(1), x)
        return jax.grad(lambda v: jnp.sum(net.apply(v, x) ** 2))(variables)

    with_gemm = grads(low_rank({"conv2": 3}))
    assert calls and all(np.prod(shape[:3]) <= layers.GEMM_WEIGHT_GRAD_MAX_PATCH for shape in calls)
    assert (5, 5, 3, 6) in calls  # full conv1: 75-wide patches
    without = grads(dataclasses.replace(low_rank({"conv2": 3}), thin_gemm_weight_grad=False))
    for a, b in zip(jax.tree.leaves(with_gemm), jax.tree.leaves(without), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p,o", [(5, 7), (7, 5)])  # both transpose orders of the kernel gradient
def test_channel_matmul_matches_einsum(p, o):
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, p))
    w = jax.random.normal(jax.random.key(1), (p, o))

    def loss(mm, x, w):
        return jnp.sum(jnp.sin(mm(x, w)))

    ref = jax.jit(jax.value_and_grad(functools.partial(
        loss, lambda x, w: jnp.einsum("...p,po->...o", x, w)), argnums=(0, 1)))(x, w)
    ours = jax.jit(jax.value_and_grad(functools.partial(loss, layers.channel_matmul),
                                      argnums=(0, 1)))(x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,strides,padding", [((5, 1), (1, 1), "SAME"),
                                                   ((1, 3), (2, 2), ((0, 0), (1, 2)))])
def test_conv1d_matmul_when_differentiated(kernel, strides, padding):
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 4))
    w = jax.random.normal(jax.random.key(1), (*kernel, 4, 6))
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=dn)))

    ours = functools.partial(loss, layers.conv1d_matmul_when_differentiated)
    ref = functools.partial(loss, jax.lax.conv_general_dilated)
    for a, b in zip(jax.tree.leaves(jax.value_and_grad(ours, (0, 1))(x, w)),
                    jax.tree.leaves(jax.value_and_grad(ref, (0, 1))(x, w)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # evaluated alone it is XLA's convolution; differentiated, the matmul formulation
    plain = str(jax.make_jaxpr(ours)(x, w))
    assert "conv_general_dilated" in plain and "dot_general" not in plain
    assert "dot_general" in str(jax.make_jaxpr(jax.grad(ours, (0, 1)))(x, w))
    with pytest.raises(ValueError, match=r"k x 1 or 1 x k .*\(3, 3, 4, 6\)"):
        layers.conv1d_matmul_when_differentiated(x, jnp.zeros((3, 3, 4, 6)), (1, 1), "SAME")


@pytest.mark.parametrize("padding", ["SAME", ((2, 1), (0, 3)), "CIRCULAR"], ids=str)
def test_lowrank_conv_auto_gradients_match_conv(padding):
    x = jax.random.normal(jax.random.key(0), (2, 11, 10, 4))
    grads = {}
    for impl in ("auto", "conv"):
        conv = LowRankConv(6, (3, 5), rank=3, padding=padding, implementation=impl)
        variables = conv.init(jax.random.key(1), x)
        grads[impl] = jax.grad(lambda v, x, conv=conv: jnp.sum(jnp.sin(conv.apply(v, x))),
                               (0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(grads["auto"]), jax.tree.leaves(grads["conv"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_forward_mode_through_the_zoo():
    """max_pool is a custom_jvp (jvp works everywhere); on CPU, the matmul formulations are
    reverse-mode only, and plain convs give forward mode back."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    pool = functools.partial(models.max_pool, window_shape=(3, 3), strides=(2, 2))
    _, tangent = jax.jvp(pool, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, jnp.ones((2, 4, 4, 3)))
    factory = dataclasses.replace(low_rank({"conv1": 4, "conv2": 8},
                                           implementations={"conv1": "conv", "conv2": "conv"}),
                                  pointwise_as_matmul=False, thin_gemm_weight_grad=False)
    model = models.NIN(conv=factory)
    images = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    _, out_tangent = jax.jvp(lambda v: model.apply(v, images), (variables,), (variables,))
    assert out_tangent.shape == (1, 10)


def test_thin_conv_general_dilated_keeps_lax_semantics_for_other_layouts(monkeypatch):
    monkeypatch.setattr(layers, "conv_gemm_weight_grad", None)  # must not be reached
    x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8))  # NCHW, lax's default layout
    w = jax.random.normal(jax.random.key(1), (4, 3, 3, 3))  # OIHW
    np.testing.assert_allclose(layers.thin_conv_general_dilated(x, w, (1, 1), "SAME"),
                               jax.lax.conv_general_dilated(x, w, (1, 1), "SAME"), rtol=1e-6)
