"""1-D convs (audio front ends, temporal convs: any window, stride, dilation, groups, explicit
or causal padding) and pointwise N-D convs (a video net's 1x1x1) are candidates: the closed form
on their 2-D view (a ``(k, 1)`` window; a 1x1 conv over the last two spatial dims), in the
layer's own kernel rank, costed as XLA counts them, data-free and calibrated, linen and NNX.
N-D convs with a window or stride (a 3x3x3, a tubelet embedding, a video net's depthwise
3x3x3) split as the paper splits a 2-D conv: a vertical conv over the leading dims
(``kt x kh x 1``) then a horizontal one over the last (``1 x 1 x kw``), per feature group, the
closed form on their 2-D view; circular ones stay whole with the reason."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx

import lrjax
from lrjax import costs, export, litert_math, macs, nnx_surgery, sites, surgery
from tests.helpers import apply, init, normal

ONE_D = {  # name: nn.Conv arguments, as audio and sequence models write them
    "frontend": dict(features=24, kernel_size=(10,), strides=5, padding="VALID"),
    "dilated": dict(features=32, kernel_size=(3,), strides=2, padding=[(1, 0)],
                    kernel_dilation=2),
    "causal": dict(features=32, kernel_size=(3,), padding="CAUSAL", feature_group_count=4),
    "pointwise": dict(features=40, kernel_size=1),
}


class Temporal(nn.Module):
    @nn.compact
    def __call__(self, x):
        for name, kwargs in ONE_D.items():
            x = nn.gelu(nn.Conv(name=name, **kwargs)(x))
        return nn.Dense(10, name="head")(x.mean(1))


class ConvStackNNX(nnx.Module):
    """The NNX counterpart of a linen stack of ``nn.Conv`` layers (``specs``: their arguments),
    an activation after each, the spatial mean, a dense head."""

    def __init__(self, specs, activation, rngs):
        channels, convs = 3, []
        for kwargs in specs.values():
            kwargs = dict(kwargs)
            features = kwargs.pop("features")
            convs.append(nnx.Conv(channels, features, rngs=rngs, **kwargs))
            channels = features
        self.convs, self.activation = nnx.List(convs), activation
        self.head = nnx.Linear(channels, 10, rngs=rngs)

    def __call__(self, x):
        for conv in self.convs:
            x = self.activation(conv(x))
        return self.head(x.mean(tuple(range(1, x.ndim - 1))))


class Video(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (2, 4, 4), strides=(2, 4, 4), name="tubelet")(x)
        x = nn.max_pool(x, (1, 2, 2), strides=(1, 1, 1), padding="SAME")
        x = nn.relu(nn.Conv(32, (1, 1, 1), name="expand")(x))
        x = nn.relu(nn.Conv(24, (1, 1, 1), name="project")(x))
        return nn.Dense(10, name="head")(x.mean((1, 2, 3)))


X = normal(0, (2, 200, 3))
CALIB = normal(1, (8, 200, 3)) * jnp.array([0.2, 1.0, 3.0])
CLIP = normal(2, (2, 4, 16, 16, 3))


def _top(sites):
    return {s.path: costs.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
            for s in sites if s.candidate}


def _lowered_flops(fn, *args) -> float:
    """XLA's flop count of the lowered program: what the report's whole-net cost is (the
    compiled module's differs by its fusions' recomputed element-wise work)."""
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def _traced(fn, *args) -> int:
    return macs.traced_macs(fn, *args)["total"] // args[-1].shape[0]


def test_one_d_convs_split_exactly_in_their_own_kernel_rank_and_cost_what_xla_counts():
    model = Temporal()
    variables = init(model, 0, X)
    sites = surgery.find_convs(model, X)
    assert [(s.path, s.kind, s.conv_dims) for s in sites if s.path != "head"] == [
        ("frontend", "kxk", 1), ("dilated", "kxk", 1), ("causal", "kxk", 1),
        ("pointwise", "1x1", 1)]
    assert all(s.candidate for s in sites)
    top = _top(sites)
    result = lrjax.decompose_linen(model, variables, X, rule=top)
    want = apply(model, variables, X)
    np.testing.assert_allclose(apply(result.module, result.variables, X), want,
                               atol=2e-5 * float(jnp.abs(want).max()))
    params = result.variables["params"]
    assert params["frontend"]["vertical"]["kernel"].shape == (10, 3, top["frontend"])
    assert params["frontend"]["horizontal"]["kernel"].shape == (1, top["frontend"], 24)
    assert params["causal"]["vertical"]["kernel"].shape == (3, 8, top["causal"])
    # each layer as XLA counts it (a causal conv's padding is part of its input, as Flax pads)
    for site in sites[:-1]:
        layer = nn.Sequential([nn.Conv(**ONE_D[site.path])])
        x = jnp.zeros((1, 50, site.shape.in_channels))
        (one,) = surgery.find_convs(layer, x)
        v = init(layer, 0, x)
        pair = lrjax.decompose_linen(layer, v, x, rule={"layers_0": 4})
        assert costs.conv_cost(one.shape).macs == _traced(
            lambda v, x, m=layer: m.apply(v, x), v, x)
        assert costs.lowrank_cost(one.shape, 4).macs == _traced(
            lambda v, x, m=pair.module: m.apply(v, x), pair.variables, x)
    # a whole-net rule's speedup is XLA's flop ratio
    whole = lrjax.decompose_linen(model, variables, X, rule="speedup:1.5")
    flops = [_lowered_flops(lambda v, x, m=m: m.apply(v, x), v, X)
             for m, v in ((model, variables), (whole.module, whole.variables))]
    assert flops[0] / flops[1] == pytest.approx(whole.report.speedup, rel=1e-5)
    assert whole.report.speedup >= 1.5


@pytest.mark.slow  # 4 s on the 2-core machine: the default run stays under 5 minutes
def test_one_d_calibration_fits_the_layer_outputs_in_linen_and_nnx():
    model = Temporal()
    variables = init(model, 0, X)
    ranks = {"frontend": 3, "dilated": 6, "causal": 8, "pointwise": 6}
    want = apply(model, variables, CALIB)
    errors = [float(jnp.linalg.norm(apply(r.module, r.variables, CALIB) - want)
                    / jnp.linalg.norm(want))
              for r in (lrjax.decompose_linen(model, variables, X, rule=ranks, calibration=c)
                        for c in (None, CALIB))]
    assert errors[1] < 0.8 * errors[0]
    nnx_model = ConvStackNNX(ONE_D, nnx.gelu, nnx.Rngs(0))
    linen_sites = {s.path: s.shape for s in surgery.find_convs(model, X)}
    nnx_sites = nnx_surgery.find_convs_nnx(nnx_model, X)
    assert [s.shape.kernel_shape for s in nnx_sites] == [
        linen_sites[p].kernel_shape for p in (*ONE_D, "head")]
    paths = {p: s.path for p, s in zip(ONE_D, nnx_sites, strict=False)}
    top = lrjax.decompose_nnx(nnx_model, X, rule=_top(nnx_sites))
    nnx_want = nnx_model(X)
    np.testing.assert_allclose(top.module(X), nnx_want, atol=2e-5 * float(jnp.abs(nnx_want).max()))
    nnx_ranks = {paths[p]: r for p, r in ranks.items()}
    nnx_want = nnx_model(CALIB)
    nnx_errors = [float(jnp.linalg.norm(r.module(CALIB) - nnx_want) / jnp.linalg.norm(nnx_want))
                  for r in (lrjax.decompose_nnx(nnx_model, X, rule=nnx_ranks, calibration=c)
                            for c in (None, CALIB))]
    assert nnx_errors[1] < 0.8 * nnx_errors[0]


def test_pointwise_n_d_convs_split_in_their_own_kernel_rank():
    model = Video()
    variables = init(model, 0, CLIP)
    sites = {s.path: s for s in surgery.find_convs(model, CLIP)}
    assert sites["expand"].kind == "1x1" and sites["expand"].conv_dims == 3
    assert sites["tubelet"].kind == "kxk" and sites["tubelet"].candidate
    top = _top(sites.values())
    result = lrjax.decompose_linen(model, variables, CLIP, rule=top)
    want = apply(model, variables, CLIP)
    np.testing.assert_allclose(apply(result.module, result.variables, CLIP), want,
                               atol=2e-5 * float(jnp.abs(want).max()))
    assert result.variables["params"]["expand"]["vertical"]["kernel"].shape == \
        (1, 1, 1, 16, top["expand"])
    whole = lrjax.decompose_linen(model, variables, CLIP, rule="speedup:1.3", calibration=CLIP)
    flops = [_lowered_flops(lambda v, x, m=m: m.apply(v, x), v, CLIP)
             for m, v in ((model, variables), (whole.module, whole.variables))]
    assert flops[0] / flops[1] == pytest.approx(whole.report.speedup, rel=1e-5)


THREE_D = {  # name: nn.Conv arguments, as video and volumetric nets write them
    "tubelet": dict(features=16, kernel_size=(2, 4, 4), strides=(2, 4, 4), padding="VALID"),
    "c3": dict(features=24, kernel_size=(3, 3, 3)),  # SAME: its border taps land on padding
    "temporal": dict(features=24, kernel_size=(3, 1, 1), padding=((2, 2), 0, (0, 0)),
                     kernel_dilation=(2, 1, 1)),
    "spatial": dict(features=32, kernel_size=(1, 3, 3), strides=(1, 2, 2), padding=1),
    "pointwise_strided": dict(features=32, kernel_size=(1, 1, 1), strides=(1, 2, 2)),
    "grouped": dict(features=32, kernel_size=(3, 3, 3), feature_group_count=4),
    "depthwise": dict(features=32, kernel_size=(3, 3, 3), strides=(1, 2, 2),  # X3D's, MoViNet's
                      feature_group_count=32),
}


class Volumetric(nn.Module):
    @nn.compact
    def __call__(self, x):
        for name, kwargs in THREE_D.items():
            x = nn.relu(nn.Conv(name=name, **kwargs)(x))
        x = nn.Conv(32, (1, 3, 3), padding="CIRCULAR", name="circular")(x)
        return nn.Dense(10, name="head")(x.mean((1, 2, 3)))


VOLUME = normal(3, (2, 8, 16, 16, 3))
VOLUME_CALIB = normal(4, (4, 8, 16, 16, 3)) * jnp.array(
    [0.2, 1.0, 3.0])


@pytest.mark.slow  # 6 s on the 2-core machine: the default run stays under 5 minutes
def test_n_d_convs_with_a_window_split_as_the_conv_then_a_pointwise_one():
    """A 3-D conv with a window or stride: a vertical conv over the leading dims then a
    horizontal one over the last, per feature group (a depthwise one's pair saves: 9 + 3 taps
    a channel at rank 1 against 27), the closed form on its 2-D view, exact at full rank; costed
    as XLA counts it (padding taps not counted), layer by layer and whole-net; data-free and
    calibrated, linen and NNX; circular ones stay whole with the reason."""
    model = Volumetric()
    variables = init(model, 0, VOLUME)
    sites = {s.path: s for s in surgery.find_convs(model, VOLUME)}
    assert [(p, s.kind) for p, s in sites.items() if s.candidate] == [
        ("tubelet", "kxk"), ("c3", "kxk"), ("temporal", "kxk"), ("spatial", "kxk"),
        ("pointwise_strided", "1x1"), ("grouped", "kxk"), ("depthwise", "kxk"),
        ("head", "dense")]
    assert "'CIRCULAR' padding" in sites["circular"].skip
    top = _top(sites.values())
    result = lrjax.decompose_linen(model, variables, VOLUME, rule=top)
    want = apply(model, variables, VOLUME)
    np.testing.assert_allclose(apply(result.module, result.variables, VOLUME), want,
                               atol=2e-5 * float(jnp.abs(want).max()))
    params = result.variables["params"]
    assert params["c3"]["vertical"]["kernel"].shape == (3, 3, 1, 16, top["c3"])
    assert params["c3"]["horizontal"]["kernel"].shape == (1, 1, 3, top["c3"], 24)
    assert params["depthwise"]["vertical"]["kernel"].shape == (3, 3, 1, 1, 96)  # 3 per channel
    assert params["depthwise"]["horizontal"]["kernel"].shape == (1, 1, 3, 3, 32)
    for name, kwargs in THREE_D.items():  # each layer's full and split cost: XLA's count
        layer = nn.Sequential([nn.Conv(**kwargs)])
        x = jnp.zeros((1, 6, 10, 9, 32 if "feature_group_count" in kwargs else 5))
        (one,) = surgery.find_convs(layer, x)
        v = init(layer, 0, x)
        assert costs.conv_cost(one.shape).macs == _traced(
            lambda v, x, m=layer: m.apply(v, x), v, x), name
        if name == "depthwise":  # at rank 1 a channel, 3x3x1 taps on every column then 1x1x3
            # on every other one, against 3x3x3 on every other one (fewer at the borders)
            assert costs.lowrank_cost(one.shape, 32).macs < 0.85 * costs.conv_cost(one.shape).macs
        rank = 3 * kwargs.get("feature_group_count", 1)
        pair = lrjax.decompose_linen(layer, v, x, rule={"layers_0": rank})
        assert costs.lowrank_cost(one.shape, rank).macs == _traced(
            lambda v, x, m=pair.module: m.apply(v, x), pair.variables, x), name
    ranks = {"tubelet": 6, "c3": 12, "temporal": 10, "spatial": 12, "grouped": 16,
             "depthwise": 32}
    calib_want = apply(model, variables, VOLUME_CALIB)
    errors = []
    for calibration in (None, VOLUME_CALIB):
        split = lrjax.decompose_linen(model, variables, VOLUME, rule=ranks,
                                      calibration=calibration)
        errors.append(float(jnp.linalg.norm(apply(split.module, split.variables, VOLUME_CALIB)
                                            - calib_want) / jnp.linalg.norm(calib_want)))
    assert errors[1] < 0.95 * errors[0], errors  # (patches in the kernel's order, or worse)
    whole = lrjax.decompose_linen(model, variables, VOLUME, rule="speedup:1.5")
    flops = [_lowered_flops(lambda v, x, m=m: m.apply(v, x), v, VOLUME)
             for m, v in ((model, variables), (whole.module, whole.variables))]
    assert flops[0] / flops[1] == pytest.approx(whole.report.speedup, rel=1e-5)
    nnx_model = ConvStackNNX(THREE_D, nnx.relu, nnx.Rngs(0))
    nnx_sites = nnx_surgery.find_convs_nnx(nnx_model, VOLUME)
    assert [s.shape.kernel_shape for s in nnx_sites] == [
        sites[p].shape.kernel_shape for p in (*THREE_D, "head")]
    nnx_top = lrjax.decompose_nnx(nnx_model, VOLUME, rule=_top(nnx_sites),
                                  calibration=VOLUME_CALIB)
    nnx_want = nnx_model(VOLUME)
    np.testing.assert_allclose(nnx_top.module(VOLUME), nnx_want,
                               atol=2e-5 * float(jnp.abs(nnx_want).max()))


@pytest.mark.slow  # 3 s on the 2-core machine: the default run stays under 5 minutes
def test_one_d_conv_nets_export_to_onnx(tmp_path):
    """A 1-D conv net (every form above) and its split export to ONNX as 1-D ``Conv``s, and one
    with pooling as 1-D ``MaxPool`` / ``AveragePool``; the input given as a 1-tuple (a single
    array must be an NHWC batch: a forgotten batch axis is caught; LiteRT's too, one line)."""
    model = Temporal()
    variables = init(model, 0, X)
    split = lrjax.decompose_linen(model, variables, X, rule={"frontend": 3, "dilated": 6,
                                                             "causal": 8, "pointwise": 6})
    for name, module, params in (("full", model, variables),
                                 ("split", split.module, split.variables)):
        result = export.to_onnx(module, params, (X,), str(tmp_path / f"{name}.onnx"))
        assert result.checked_batches == (2, 3)
        assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale
        ops = {n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node}
        assert "Conv" in ops
    pooled = Pooled1D()
    pooled_variables = init(pooled, 0, X)
    result = export.to_onnx(pooled, pooled_variables, (X,), str(tmp_path / "pooled.onnx"))
    assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale
    ops = {n.op_type for n in onnx.load(str(tmp_path / "pooled.onnx")).graph.node}
    assert {"MaxPool", "AveragePool"} <= ops
    with pytest.raises(export.ExportError, match=r"NHWC batch .*a tuple\); got shape \(2, 200"):
        export.to_onnx(model, variables, X, str(tmp_path / "one.onnx"))
    with pytest.raises(export.ExportError, match=r"^example_input must be an NHWC batch"):
        export.to_tflite(model, variables, X, str(tmp_path / "m.tflite"))
    assert sorted(os.listdir(tmp_path)) == ["full.onnx", "pooled.onnx", "split.onnx"]


@pytest.mark.slow  # 5 s: two TFLite conversions
def test_one_d_conv_nets_export_to_litert(tmp_path):
    """LiteRT takes the split 1-D net and the pooled one from a 1-tuple."""
    model = Temporal()
    split = lrjax.decompose_linen(model, init(model, 0, X), X, rule={
        "frontend": 3, "dilated": 6, "causal": 8, "pointwise": 6})
    pooled = Pooled1D()
    for module, params in ((split.module, split.variables), (pooled, init(pooled, 0, X))):
        result = export.to_tflite(module, params, (X,), str(tmp_path / "one_d.tflite"))
        assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale and result.scale > 0


@pytest.mark.slow  # 4 s: two 3-D exports
def test_video_nets_export_to_onnx_as_three_d_convs(tmp_path):
    """The video net (a 3-D tubelet conv and pooling) and its split export to ONNX as 3-D
    ``Conv`` / ``MaxPool``."""
    video = Video()
    video_variables = init(video, 0, CLIP)
    video_split = lrjax.decompose_linen(video, video_variables, CLIP, rule="speedup:1.3")
    for name, module, params in (("video", video, video_variables),
                                 ("video_split", video_split.module, video_split.variables)):
        result = export.to_onnx(module, params, (CLIP,), str(tmp_path / f"{name}.onnx"))
        assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale
        graph = onnx.load(result.path).graph
        weights = {i.name: i.dims for i in graph.initializer}
        first = 16 if name == "video" else video_split.ranks.get("tubelet", 16)
        assert [weights[n.input[1]] for n in graph.node if n.op_type == "Conv"][0] == \
            [first, 3, 2, 4, 4]  # the tubelet (or its first factor) as a 3-D Conv, (O, I, T, H, W)
        assert "MaxPool" in {n.op_type for n in graph.node}


class Pooled1D(nn.Module):
    """A 1-D CNN as text and audio classifiers write it: conv, max pool, conv, average pool."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(16, (5,))(x)), (3,), strides=(2,), padding="SAME")
        x = nn.avg_pool(nn.Conv(16, (3,), feature_group_count=4)(x), (4,), strides=(4,))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_n_d_calibration_statistics_are_summed_a_few_examples_at_a_time(monkeypatch):
    """An N-D conv's patches are materialised a slice of the examples at a time (a video net's
    would not fit at once): the same statistics whatever the slice."""
    model = Volumetric()
    site = next(s for s in surgery.find_convs(model, VOLUME) if s.path == "c3")
    x = jax.random.normal(jax.random.key(5), (4, 8, 8, 8, 16))
    whole = sites.input_moments(site, x)
    monkeypatch.setattr(sites, "ND_PATCH_ENTRIES", 1)  # one example at a time
    sliced = sites.input_moments(site, x)
    assert float(sliced[1]) == float(whole[1]) == 4 * 8 * 8 * 8
    np.testing.assert_allclose(sliced[0], whole[0], rtol=1e-5, atol=1e-3)


def test_n_d_factors_keep_their_axis_names():
    """A 3-D kernel named for sharding: the vertical factor keeps its leading dims' and input
    channels' names, the horizontal one its last dim's and output channels'."""
    class Named(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(24, (3, 3, 3), kernel_init=nn.with_partitioning(
                nn.initializers.lecun_normal(), ("t", "h", "w", "in", "out")))(x)

    x = jnp.ones((2, 4, 8, 8, 16))
    model = Named()
    result = lrjax.decompose_linen(model, init(model, 0, x), x, rule={"Conv_0": 8})
    pair = result.variables["params"]["Conv_0"]
    assert pair["vertical"]["kernel"].names == ("t", "h", None, "in", None)
    assert pair["horizontal"]["kernel"].names == (None, None, "w", None, "out")


GROUPED = {  # (groups, output channels, strides, padding, dilation, layout)
    "depthwise": (8, 8, (1, 2, 2), "SAME", (1, 1, 1), "NDHWC"),
    "depthwise x2, NCDHW": (8, 16, (2, 1, 1), ((1, 1), (0, 2), (2, 0)), (1, 2, 1), "NCDHW"),
    "4 groups": (4, 12, (1, 1, 2), "VALID", (2, 1, 1), "NDHWC"),
    "2 groups, NCDHW": (2, 6, (1, 1, 1), ((1, 0), (1, 1), (0, 1)), (1, 1, 2), "NCDHW"),
}


@pytest.mark.parametrize("case", list(GROUPED), ids=list(GROUPED))
def test_grouped_3d_convs_are_written_with_ops_the_litert_converter_takes(case):
    """The TFLite converter has no grouped ``CONV_3D``: a depthwise conv becomes a sum over its
    taps of strided slices, any other one conv per group; the same numbers in any layout,
    stride, padding and dilation (:func:`lrjax.litert_math.grouped_conv`, no converter here)."""
    groups, out, strides, padding, dilation, layout = GROUPED[case]
    x = jax.random.normal(jax.random.key(6), (2, 5, 7, 6, 8))
    kernel = jax.random.normal(jax.random.key(7), (3, 2, 3, 8 // groups, out))
    numbers = ("NCDHW", "OIDHW", "NCDHW") if layout == "NCDHW" else ("NDHWC", "DHWIO", "NDHWC")
    if layout == "NCDHW":
        x, kernel = jnp.transpose(x, (0, 4, 1, 2, 3)), jnp.transpose(kernel, (4, 3, 0, 1, 2))

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                            dimension_numbers=numbers, feature_group_count=groups)

    (eqn,) = jax.make_jaxpr(conv)(x, kernel).eqns
    rewritten = litert_math.rewrite(eqn, (x, kernel))
    assert rewritten is not None
    ops = {e.primitive.name for e in jax.make_jaxpr(
        lambda x, k: litert_math.rewrite(eqn, (x, k)))(x, kernel).eqns}
    assert ("conv_general_dilated" not in ops) == case.startswith("depthwise")
    np.testing.assert_allclose(rewritten[0], conv(x, kernel), rtol=1e-5, atol=1e-5)
    whole = jnp.zeros((3, 2, 3, 8, 4))  # one group: converted as it is
    (plain,) = jax.make_jaxpr(lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))(
        jnp.zeros((2, 5, 7, 6, 8)), whole).eqns
    assert litert_math.rewrite(plain, (jnp.zeros((2, 5, 7, 6, 8)), whole)) is None


@pytest.mark.slow  # 6 s: a 3-D net split, to ONNX and LiteRT
def test_split_n_d_conv_nets_export_to_onnx_and_litert(tmp_path):
    """Every form of THREE_D split (NNX) exports: ONNX's 3-D ``Conv``, LiteRT's ``CONV_3D``
    (its grouped and depthwise pairs as one conv per group and a sum over taps)."""
    split = lrjax.decompose_nnx(ConvStackNNX(THREE_D, nnx.relu, nnx.Rngs(0)), VOLUME,
                                rule={"convs/0": 6, "convs/1": 12, "convs/2": 10, "convs/3": 12,
                                      "convs/5": 16, "convs/6": 32})
    for fmt in ("onnx", "tflite"):
        result = export.EXPORTERS[fmt](split.module, None, (VOLUME,), str(tmp_path / f"m.{fmt}"))
        assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale and result.scale > 0
