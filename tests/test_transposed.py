"""Transposed convs (``nn.ConvTranspose``, ``nnx.ConvTranspose``: a U-Net's upsamplers) split into a
vertical and a horizontal transposed conv: exact at full rank for every padding form, stride,
dilation and ``transpose_kernel``, costed as XLA counts them, calibrated, gated by timing and
exported to ONNX Runtime."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from benchmarks.user_models import UNet
from lrjax import costs, export, macs, nnx_surgery, surgery, timing
from lrjax.layers import LowRankConvTranspose, LowRankModel, transposed_pair_geometry
from tests.helpers import apply, init, lowered_flops, normal, xla_flops

X = normal(1, (2, 5, 6, 4))

# the forms U-Nets use (2x2 and 3x3 stride-2 upsamplers, PyTorch ports with transpose_kernel and
# an int padding), and the less common ones
CASES = [
    dict(kernel_size=(2, 2), strides=(2, 2)),
    dict(kernel_size=(3, 3), strides=(2, 2)),
    dict(kernel_size=(4, 3), strides=(2, 1), padding="VALID"),
    dict(kernel_size=(3, 3), strides=(2, 2), padding=((1, 2), (0, 1)), kernel_dilation=(2, 1)),
    dict(kernel_size=(1, 1), strides=(2, 2)),
    dict(kernel_size=(4, 4), strides=(2, 2), padding=1, transpose_kernel=True),
]


class Up(nn.Module):
    kwargs: dict

    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(6, name="up", **self.kwargs)(nn.relu(x))


class UpNNX(nnx.Module):
    def __init__(self, kwargs, rngs):
        self.up = nnx.ConvTranspose(4, 6, rngs=rngs, **kwargs)

    def __call__(self, x):
        return self.up(nnx.relu(x))


def _traced(fn, *args) -> int:
    return macs.traced_macs(fn, *args)["total"] // X.shape[0]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()))
def test_transposed_convs_split_exactly_and_cost_what_xla_counts(kwargs):
    model = Up(kwargs)
    variables = init(model, 0, X)
    (site,) = surgery.find_convs(model, X)
    assert site.candidate and site.kind == "transposed" and site.shape.transposed
    top = costs.max_rank(site.shape.kernel_shape)
    result = lrjax.decompose_linen(model, variables, X, rule={"up": top})
    want = apply(model, variables, X)
    got = apply(result.module, result.variables, X)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))
    params = result.variables["params"]["up"]
    kh, kw = kwargs["kernel_size"]
    flipped = kwargs.get("transpose_kernel", False)
    assert params["vertical"]["kernel"].shape == ((kh, 1, top, 4) if flipped else (kh, 1, 4, top))
    assert params["horizontal"]["kernel"].shape == ((1, kw, 6, top) if flipped
                                                    else (1, kw, top, 6))
    # the cost model counts what XLA performs: taps on the dilation holes and padding excluded
    assert costs.conv_cost(site.shape).macs == _traced(
        lambda v, x: model.apply(v, x), variables, X)
    assert costs.lowrank_cost(site.shape, top).macs == _traced(
        lambda v, x: result.module.apply(v, x), result.variables, X)
    assert result.report.by_kind()["transposed"][0] == costs.conv_cost(site.shape).macs



@pytest.mark.parametrize("kwargs", [CASES[0], CASES[5]], ids=("2x2", "4x4 transpose_kernel"))
def test_nnx_transposed_convs_split_exactly(kwargs):
    model = UpNNX(kwargs, nnx.Rngs(0))
    (site,) = nnx_surgery.find_convs_nnx(model, X)
    result = lrjax.decompose_nnx(model, X, rule={"up": costs.max_rank(site.shape.kernel_shape)})
    want = model(X)
    np.testing.assert_allclose(result.module(X), want, atol=2e-5 * float(jnp.abs(want).max()))
    assert type(result.module.up.vertical) is nnx.ConvTranspose
    assert result.report.by_kind()["transposed"][0] == costs.conv_cost(site.shape).macs


def test_transposed_calibration_fits_the_layer_output():
    """Calibrated factors (whitened by the row-dilated input's patch moments) beat the data-free
    ones on the calibration data's output, in linen and NNX."""
    calib = jax.random.normal(jax.random.key(2), (8, 5, 6, 4)) * jnp.linspace(0.1, 3.0, 4)
    for kwargs in (CASES[1], CASES[5]):
        model = Up(kwargs)
        variables = init(model, 0, X)
        want = apply(model, variables, calib)

        errors = [float(jnp.linalg.norm(apply(r.module, r.variables, calib) - want)
                        / jnp.linalg.norm(want))
                  for r in (lrjax.decompose_linen(model, variables, X, rule={"up": 3},
                                                  calibration=c) for c in (None, calib))]
        assert errors[1] < 0.9 * errors[0]
        nnx_model = UpNNX(kwargs, nnx.Rngs(0))
        nnx_want = nnx_model(calib)
        nnx_errors = [float(jnp.linalg.norm(r.module(calib) - nnx_want) / jnp.linalg.norm(nnx_want))
                      for r in (lrjax.decompose_nnx(nnx_model, X, rule={"up": 3}, calibration=c)
                                for c in (None, calib))]
        assert nnx_errors[1] < 0.9 * nnx_errors[0]


def test_transposed_convs_that_stay_whole_say_why():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.ConvTranspose(4, (3, 3), strides=2, padding="CIRCULAR", name="circular")(x)
            mask = jnp.ones((3, 3, 4, 4))
            return nn.ConvTranspose(4, (3, 3), mask=mask, name="masked")(x)

    model = Odd()
    found = {s.path: s.skip for s in surgery.find_convs(model, X)}
    assert "CIRCULAR padding" in found["circular"] and found["masked"] == "masked kernel"
    with pytest.raises(ValueError, match="layer 'circular' cannot be decomposed: CIRCULAR"):
        apply(LowRankModel.wrap(model, {"circular": 2}), init(model, 0, X), X)


def test_transposed_pair_module_geometry_and_timing():
    first, second = transposed_pair_geometry((3, 2), (2, 3), ((1, 0), (2, 1)), (1, 2))
    assert first == dict(kernel_size=(3, 1), strides=(2, 1), padding=((1, 0), (0, 0)),
                         kernel_dilation=(1, 1))
    assert second == dict(kernel_size=(1, 2), strides=(1, 3), padding=((0, 0), (2, 1)),
                          kernel_dilation=(1, 2))
    x = jnp.ones((1, 4, 4, 8))
    pair = LowRankConvTranspose(8, (3, 3), rank=2, strides=2)
    assert apply(pair, init(pair, 0, x), x).shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="rank 30 is invalid"):
        init(LowRankConvTranspose(8, (3, 3), rank=30), 0, x)
    # +measured times a transposed layer against its own pair
    (site,) = surgery.find_convs(Up(CASES[1]), X)
    times = timing.layer_times([site.shape], {"up": 2}, repeats=1, min_time_s=0.0)
    assert set(times) == {"up"} and all(t > 0 for t in times["up"])


@pytest.mark.slow
def test_unet_whole_net_rule_and_onnx_export(tmp_path):
    """A U-Net as segmentation code writes it (benchmarks.user_models.UNet): a whole-net rule
    with its upsamplers among the candidates, and its split upsamplers against XLA's own flop
    count and in ONNX Runtime."""
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    model = UNet(widths=(8, 16, 32))
    variables = init(model, 0, x, train=False)
    found = {s.path: s for s in surgery.find_convs(model, x, train=False)}
    ups = sorted(p for p, s in found.items() if s.kind == "transposed")
    assert ups == ["ConvTranspose_0", "ConvTranspose_1"] and all(found[p].candidate for p in ups)
    whole = lrjax.decompose_linen(model, variables, x, rule="speedup:2", train=False)
    assert whole.report.speedup >= 2.0 and "transposed" in whole.report.by_kind()
    ranks = {p: costs.breakeven_rank(found[p].shape) // 2 for p in ups}
    upsamplers = lrjax.decompose_linen(model, variables, x, rule=ranks, train=False)
    assert upsamplers.ranks == ranks
    # the whole net's speedup as the report gives it is XLA's own flop count's
    flops = [xla_flops(lambda v, x, m=m: m.apply(v, x, train=False), v, x)
             for m, v in ((model, variables), (upsamplers.module, upsamplers.variables))]
    assert flops[0] / flops[1] == pytest.approx(upsamplers.report.speedup, rel=1e-3)
    onnx = export.to_onnx(upsamplers.module, upsamplers.variables, x,
                          str(tmp_path / "unet.onnx"), train=False)
    assert onnx.max_abs_error <= export.ATOL + export.RTOL * onnx.scale


class TwoUpsamplers(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.ConvTranspose(4, (3, 3), strides=2, transpose_kernel=True, name="full")(x)
        # and a PyTorch port's own upsampler: lax.conv_transpose of NCHW by an OIHW kernel
        w = self.param("torch_kernel", nn.initializers.lecun_normal(), (4, 4, 3, 3))
        own = jax.lax.conv_transpose(jnp.transpose(x, (0, 3, 1, 2)), w, (2, 2), "SAME",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        pair = LowRankConvTranspose(4, (3, 3), rank=2, strides=2, name="pair")(x)
        return y + pair + jnp.transpose(own, (0, 2, 3, 1))


@pytest.mark.slow  # (ONNX's: test_unet_whole_net_rule_and_onnx_export)
def test_transposed_convs_export_to_litert(tmp_path):
    """3x3 stride-2 SAME upsamplers (rows and columns padded (2, 1), whose output shape the TFLite
    converter gets wrong as written) reach LiteRT, full and split, linen and NNX, Flax's layers
    and a model's own ``lax.conv_transpose`` in another layout alike (each input-dilated conv is
    rewritten where the export traces it, :func:`lrjax.litert_math.conv_transpose`)."""
    model = TwoUpsamplers()
    x = jax.random.normal(jax.random.key(4), (1, 5, 6, 4))
    result = export.to_tflite(model, init(model, 0, x), x, str(tmp_path / "up.tflite"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale
    nnx_model = UpNNX(CASES[1], nnx.Rngs(0))
    split = lrjax.decompose_nnx(nnx_model, X, rule={"up": 3}).module
    result = export.to_tflite(split, None, X, str(tmp_path / "nnx.tflite"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale
    assert type(split.up.vertical) is nnx.ConvTranspose  # the export worked on a copy


class Dilated(nn.Module):
    """An upsampler written as a conv on its dilated input (scenic's U-Net ``DeConv3x3``)."""
    kwargs: dict

    @nn.compact
    def __call__(self, x):
        return nn.Conv(6, name="up", **self.kwargs)(nn.relu(x))


class DilatedNNX(nnx.Module):
    def __init__(self, kwargs, rngs):
        self.up = nnx.Conv(4, 6, rngs=rngs, **kwargs)

    def __call__(self, x):
        return self.up(nnx.relu(x))


DILATED = [dict(kernel_size=(3, 3), input_dilation=(2, 2), padding=((1, 2), (1, 2))),
           pytest.param(dict(kernel_size=(3, 2), input_dilation=(2, 1), padding=((2, 1), (0, 1)),
                             kernel_dilation=(1, 2)), marks=pytest.mark.slow)]


@pytest.mark.parametrize("kwargs", DILATED, ids=("3x3 deconv", "3x2 rows only"))
def test_input_dilated_convs_split_as_transposed_convs(kwargs, tmp_path):
    """``nn.Conv(input_dilation=d)`` is ``nn.ConvTranspose(strides=d)`` with the same kernel and
    explicit padding: split, costed, calibrated and exported as one, in linen and NNX."""
    model = Dilated(kwargs)
    variables = init(model, 0, X)
    (site,) = surgery.find_convs(model, X)
    assert site.candidate and site.kind == "transposed" and not site.transpose_kernel
    assert site.shape.strides == kwargs["input_dilation"]
    top = costs.max_rank(site.shape.kernel_shape)
    result = lrjax.decompose_linen(model, variables, X, rule={"up": top})
    want = apply(model, variables, X)
    np.testing.assert_allclose(apply(result.module, result.variables, X), want,
                               atol=2e-5 * float(jnp.abs(want).max()))
    kh, kw = kwargs["kernel_size"]
    assert result.variables["params"]["up"]["vertical"]["kernel"].shape == (kh, 1, 4, top)
    assert costs.conv_cost(site.shape).macs == _traced(
        lambda v, x: model.apply(v, x), variables, X)
    assert costs.lowrank_cost(site.shape, 2).macs == _traced(
        lambda v, x: r2.module.apply(v, x), (r2 := lrjax.decompose_linen(
            model, variables, X, rule={"up": 2})).variables, X)
    calib = jax.random.normal(jax.random.key(2), (8, 5, 6, 4)) * jnp.linspace(0.1, 3.0, 4)
    want = apply(model, variables, calib)
    errors = [float(jnp.linalg.norm(apply(r.module, r.variables, calib) - want)
                    / jnp.linalg.norm(want))
              for r in (lrjax.decompose_linen(model, variables, X, rule={"up": 4},
                                              calibration=c) for c in (None, calib))]
    assert errors[1] < 0.85 * errors[0]
    onnx = export.to_onnx(r2.module, r2.variables, X, str(tmp_path / "pair.onnx"))
    assert onnx.max_abs_error <= export.ATOL + export.RTOL * onnx.scale
    nnx_model = DilatedNNX(kwargs, nnx.Rngs(0))
    (nnx_site,) = nnx_surgery.find_convs_nnx(nnx_model, X)
    assert nnx_site.kind == "transposed" and nnx_site.shape == site.shape
    nnx_result = lrjax.decompose_nnx(nnx_model, X, rule={"up": top})
    nnx_want = nnx_model(X)
    np.testing.assert_allclose(nnx_result.module(X), nnx_want,
                               atol=2e-5 * float(jnp.abs(nnx_want).max()))


def test_input_dilated_convs_that_stay_whole_say_why():
    strided = Dilated(dict(kernel_size=(3, 3), input_dilation=2, strides=2, padding=1))
    (site,) = surgery.find_convs(strided, X)
    assert not site.candidate and "input dilation 2 with strides 2" in site.skip
    with pytest.raises(ValueError, match="layer 'up' cannot be decomposed: input dilation"):
        apply(LowRankModel.wrap(strided, {"up": 2}), init(strided, 0, X), X)


class Upsamplers(nn.Module):
    """Explicitly padded upsamplers the TFLite converter takes only in its full-padding form."""

    @nn.compact
    def __call__(self, x):
        x = nn.ConvTranspose(4, (4, 4), strides=2, padding=1, transpose_kernel=True,
                             name="torch_style")(x)
        x = nn.Conv(4, (3, 3), input_dilation=2, padding=((1, 2), (1, 2)), name="deconv")(x)
        x = nn.ConvTranspose(4, (3, 3), strides=2, padding=((1, 2), (0, 0)), name="lopsided")(x)
        return nn.ConvTranspose(4, (3, 3), strides=2, padding=1, kernel_dilation=2,
                                name="dilated")(x)  # input and kernel dilation in one conv


@pytest.mark.slow  # 8 s: two LiteRT conversions
def test_explicitly_padded_and_input_dilated_upsamplers_export_to_litert(tmp_path):
    """Padding (1, 2), (1, 1) or (0, 0) along a strided axis converted wrong or not at all;
    each runs as the full-padding transposed conv, cropped (same numbers): whole and split. A
    strided transposed conv with a dilated kernel did not convert ('failed to legalize
    mhlo.convolution'); its kernel is written out with its zeros."""
    model = Upsamplers()
    x = jax.random.normal(jax.random.key(5), (1, 3, 4, 4))
    variables = init(model, 0, x)
    split = lrjax.decompose_linen(model, variables, x,
                                  rule={"torch_style": 3, "deconv": 3, "lopsided": 3,
                                        "dilated": 3})
    for name, (m, v) in {"whole": (model, variables),
                         "split": (split.module, split.variables)}.items():
        result = export.to_tflite(m, v, x, str(tmp_path / f"{name}.tflite"))
        assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale
    nnx_model = DilatedNNX(DILATED[0], nnx.Rngs(0))  # an nnx.Conv with input_dilation
    result = export.to_tflite(nnx_model, None, X[:1], str(tmp_path / "nnx.tflite"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


CASES_1D = [dict(kernel_size=(4,), strides=(2,)),
            dict(kernel_size=(5,), strides=(3,), padding=((1, 2),), kernel_dilation=(2,)),
            dict(kernel_size=(10,), strides=(5,), padding=2)]
X1 = normal(2, (2, 9, 4))


class Up1D(nn.Module):
    """An audio U-Net's upsampler (google-research/perch's SoundStream separator: kernels of
    4 and 10, strides 2 and 5) on ``(batch, time, channels)``."""
    kwargs: dict

    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(6, name="up", **self.kwargs)(nn.relu(x))


@pytest.mark.parametrize("kwargs", [  # (the first in the default run, the others in the slow run)
    pytest.param(k, id=",".join(f"{a}={v}" for a, v in k.items()), marks=() if i == 0 else pytest.mark.slow)
    for i, k in enumerate(CASES_1D)])
def test_1d_transposed_convs_split_exactly_costed_calibrated_and_exported(kwargs, tmp_path):
    """Before: left as "not a 2-D transposed conv", and ONNX refused the model."""
    model = Up1D(kwargs)
    variables = init(model, 0, X1)
    site = {s.path: s for s in surgery.find_convs(model, X1)}["up"]
    assert (site.kind, site.conv_dims, site.kernel_variable_shape) == \
        ("transposed", 1, (kwargs["kernel_size"][0], 4, 6))
    exact = lrjax.decompose_linen(model, variables, X1, rule={"up": 6})  # full rank: N = 6
    want = model.apply(variables, X1)
    np.testing.assert_allclose(exact.module.apply(exact.variables, X1), want, atol=1e-5)
    calibration = jax.random.normal(jax.random.key(3), (8, 9, 4))
    free, fitted = (lrjax.decompose_linen(model, variables, X1, rule={"up": 2}, calibration=c)
                    for c in (None, calibration))
    assert jax.tree.map(jnp.shape, fitted.variables["params"]["up"]) == {
        "vertical": {"kernel": (kwargs["kernel_size"][0], 4, 2)},
        "horizontal": {"kernel": (1, 2, 6), "bias": (6,)}}
    assert fitted.report.speedup == pytest.approx(xla_flops(model.apply, variables, X1) / xla_flops(
        fitted.module.apply, fitted.variables, X1), rel=1e-6)
    errors = [float(jnp.linalg.norm(r.module.apply(r.variables, calibration) -
                                    model.apply(variables, calibration))) for r in (fitted, free)]
    assert errors[0] < errors[1]
    result = export.to_onnx(fitted.module, fitted.variables, (X1,), str(tmp_path / "up.onnx"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale
    nnx_model = nnx.ConvTranspose(4, 6, rngs=nnx.Rngs(0), **kwargs)
    split = lrjax.decompose_nnx(nnx_model, X1, rule={"": 6})
    np.testing.assert_allclose(split.module(X1), nnx_model(X1), atol=1e-5)


@pytest.mark.slow  # 3 s on the 2-core machine: the default run stays under 5 minutes
def test_1d_and_3d_transposed_convs_with_transpose_kernel_split(tmp_path):
    """A 1-D ``nn.ConvTranspose(transpose_kernel=True)`` (a PyTorch vocoder port's layout) was
    left whole too, and a 3-D one (a PyTorch volumetric U-Net port's) until the thirty-seventh
    session; they split now, their factors read flipped as the layer reads its kernel."""
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.ConvTranspose(4, (3,), strides=(2,), transpose_kernel=True, name="flipped")(x)
            video = nn.ConvTranspose(2, (2, 2, 2), strides=(2, 2, 2), transpose_kernel=True,
                                     name="video")(y[:, :, None, None, :].repeat(2, 2).repeat(2, 3))
            return video.mean((2, 3))

    model = Odd()
    variables = init(model, 0, X1)
    found = {s.path: s.skip for s in surgery.find_convs(model, X1)}
    assert found == {"flipped": None, "video": None}
    exact = lrjax.decompose_linen(model, variables, X1, rule={"flipped": 4, "video": 4})  # full
    want = model.apply(variables, X1)
    np.testing.assert_allclose(exact.module.apply(exact.variables, X1), want,
                               atol=2e-5 * float(jnp.abs(want).max()))
    assert jax.tree.map(jnp.shape, exact.variables["params"]["flipped"]) == {
        "vertical": {"kernel": (3, 4, 4)}, "horizontal": {"kernel": (1, 4, 4), "bias": (4,)}}
    assert jax.tree.map(jnp.shape, exact.variables["params"]["video"]) == {  # (N and K swapped)
        "vertical": {"kernel": (2, 2, 1, 4, 4)}, "horizontal": {"kernel": (1, 1, 2, 2, 4),
                                                              "bias": (2,)}}
    nnx_layer = nnx.ConvTranspose(4, 4, (3,), strides=(2,), transpose_kernel=True,
                                  rngs=nnx.Rngs(0))
    np.testing.assert_allclose(lrjax.decompose_nnx(nnx_layer, X1, rule={"": 4}).module(X1),
                               nnx_layer(X1), atol=1e-5)
    nnx_video = nnx.ConvTranspose(3, 5, (3, 2, 3), strides=(2, 1, 2), transpose_kernel=True,
                                  rngs=nnx.Rngs(1))
    np.testing.assert_allclose(lrjax.decompose_nnx(nnx_video, VOLUME, rule={"": 15}).module(
        VOLUME), nnx_video(VOLUME), atol=2e-5 * float(jnp.abs(nnx_video(VOLUME)).max()))
    half = lrjax.decompose_linen(model, variables, X1, rule={"flipped": 2, "video": 1})
    result = export.to_onnx(half.module, half.variables, (X1,), str(tmp_path / "odd.onnx"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


VOLUME = normal(5, (2, 4, 5, 6, 3))


class Upsampler3D(nn.Module):
    """A volumetric U-Net's upsampler (google-research/jax3d's ``UNet3D``, MAGVIT's ``deconv``
    decoder) after a 3x3x3 conv: an ``nn.ConvTranspose`` over three spatial dims."""
    kernel: tuple
    strides: tuple
    padding: object = "SAME"
    dilation: tuple = (1, 1, 1)
    transpose_kernel: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3, 3), name="conv")(x))
        return nn.ConvTranspose(6, self.kernel, strides=self.strides, padding=self.padding,
                                kernel_dilation=self.dilation,
                                transpose_kernel=self.transpose_kernel, name="up")(x)


def _split_3d_exactly_as_xla_counts(model, path: str, rank: int):
    """``model`` (on :data:`VOLUME`) with its layer ``path`` a transposed-conv candidate, exact
    at full rank, and split at ``rank`` with the report's speedup XLA's lowered ratio."""
    variables = init(model, 0, VOLUME)
    site = {s.path: s for s in surgery.find_convs(model, VOLUME)}[path]
    assert site.kind == "transposed" and site.candidate
    full = lrjax.decompose_linen(model, variables, VOLUME,
                                 rule={path: costs.max_rank(site.shape.kernel_shape)})
    np.testing.assert_allclose(full.module.apply(full.variables, VOLUME),
                               model.apply(variables, VOLUME), atol=1e-5)
    assert full.report.net_flops[0] * VOLUME.shape[0] == lowered_flops(
        model.apply, variables, VOLUME)
    split = lrjax.decompose_linen(model, variables, VOLUME, rule={path: rank})
    assert split.report.speedup == pytest.approx(lowered_flops(
        model.apply, variables, VOLUME) / lowered_flops(split.module.apply, split.variables,
                                                        VOLUME), rel=1e-9)
    return split


@pytest.mark.parametrize("geometry", [  # (the last three: the slow run)
    ((2, 2, 2), (2, 2, 2)), ((3, 3, 3), (2, 1, 2), "VALID"),
    *(pytest.param(g, marks=pytest.mark.slow) for g in [
        ((3, 2, 3), (2, 2, 1), ((1, 0), (2, 1), (0, 2))), ((3, 3, 2), (2, 2, 2), "SAME", (2, 1, 1)),
        ((3, 2, 3), (2, 1, 2), "VALID", (1, 1, 1), True)])])
def test_3d_transposed_convs_split_exactly_and_are_costed_as_xla_counts(geometry):
    """A 3-D transposed conv splits as a 3-D conv does (leading dims, then the last; input
    dilation is separable): exact at full rank, its cost XLA's to the flop (taps on padding and
    dilation holes not counted), for strides, explicit padding, kernel dilation and
    ``transpose_kernel=True`` (its factors read flipped, their channel axes swapped)."""
    split = _split_3d_exactly_as_xla_counts(Upsampler3D(*geometry), "up", 2)
    channels = (2, 8) if len(geometry) > 4 else (8, 2)
    assert split.variables["params"]["up"]["vertical"]["kernel"].shape == (
        *geometry[0][:-1], 1, *channels)


def test_an_input_dilated_3d_conv_splits_as_the_transposed_conv_it_is():
    class Dilated(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(5, (3, 3, 3), input_dilation=(2, 1, 2),
                           padding=((1, 1), (2, 0), (1, 2)), name="d")(x)

    _split_3d_exactly_as_xla_counts(Dilated(), "d", 3)


def test_3d_transposed_convs_calibrate_in_linen_and_nnx_and_export(tmp_path):
    """Calibrated factors of a 3-D transposed conv fit its output better than data-free ones
    (its vertical conv's patches on the input dilated along the leading dims); an
    ``nnx.ConvTranspose`` splits alike; the pair exports to ONNX."""
    model = Upsampler3D((3, 3, 3), (2, 1, 2))
    variables = init(model, 0, VOLUME)
    scales = jnp.linspace(0.2, 2.0, 3)
    calibration, held_out = (jax.random.normal(jax.random.key(k), (8, *VOLUME.shape[1:])) * scales
                             for k in (6, 7))
    reference = model.apply(variables, held_out)
    errors = []
    for data in (None, calibration):
        result = lrjax.decompose_linen(model, variables, VOLUME, rule={"up": 3}, calibration=data)
        errors.append(float(jnp.linalg.norm(result.module.apply(result.variables, held_out)
                                            - reference)))
    assert errors[1] < 0.95 * errors[0]
    onnx_result = export.to_onnx(result.module, result.variables, (VOLUME,),
                                 str(tmp_path / "up.onnx"))
    assert onnx_result.max_abs_error <= export.ATOL + export.RTOL * onnx_result.scale
    layer = nnx.ConvTranspose(3, 6, (3, 3, 3), strides=(2, 1, 2), rngs=nnx.Rngs(0))
    split = lrjax.decompose_nnx(layer, VOLUME, rule={"": 18}, calibration=calibration)
    np.testing.assert_allclose(split.module(VOLUME), layer(VOLUME), atol=1e-5)


class Volumetric(nn.Module):
    """google-research/jax3d's 3-D U-Net upsampler (``nn.ConvTranspose``, 2x2x2 at stride 2) and
    a grouped, strided input-dilated 3x3x3 conv, on a ``(N, D, H, W, C)`` volume."""

    @nn.compact
    def __call__(self, x):
        cube = x[:, :, None, None, :].repeat(3, 2).repeat(3, 3)
        up = nn.ConvTranspose(4, (2, 2, 2), strides=(2, 2, 2), name="up")(cube)
        grouped = nn.Conv(4, (3, 3, 3), input_dilation=(2, 1, 2), strides=(1, 2, 1),
                          padding=((1, 1), (2, 0), (1, 1)), feature_group_count=2,
                          name="grouped")(cube)
        return up.mean((1, 2, 3)) + grouped.mean((1, 2, 3))


@pytest.mark.slow  # 4 s: a LiteRT conversion
def test_3d_input_dilated_convs_export_to_litert_with_zeros_inserted(tmp_path):
    """The TFLite converter cannot legalize an input-dilated 3-D conv ("'vhlo.convolution_v1'
    op is not part of the vhlo support yet"): the input gets its zeros, then a plain conv."""
    pytest.importorskip("ai_edge_litert")
    model = Volumetric()
    variables = init(model, 0, X1)
    result = export.to_tflite(model, variables, (X1,), str(tmp_path / "v.tflite"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


def test_strided_input_dilated_1d_and_3d_convs_export_with_zeros_inserted(tmp_path):
    """No ONNX ``ConvTranspose`` computes these (window strides): the input gets its zeros, in
    any number of spatial dims (before: 2-D only)."""

    class Dilated1D3D(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.Conv(4, (3,), input_dilation=(2,), strides=(2,), padding=((1, 1),),
                        name="a")(x)
            cube = x[:, :, None, None, :].repeat(3, 2).repeat(3, 3)
            b = nn.Conv(4, (3, 3, 3), input_dilation=(2, 1, 2), strides=(1, 2, 1),
                        padding=((1, 1),) * 3, name="b")(cube)
            return a, b

    model = Dilated1D3D()
    variables = init(model, 0, X1)
    result = export.to_onnx(model, variables, (X1,), str(tmp_path / "d.onnx"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


class VocoderUp(nn.Module):
    """A vocoder port's upsampler written by hand: PyTorch's ``ConvTranspose1d`` weight
    ``(C_in, C_out, k)`` read through ``lax.conv_transpose(..., transpose_kernel=True)`` (its
    kernel flipped and its channel axes swapped by JAX), its own bias."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(), (4, self.features, x.shape[-1]))
        b = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return jax.lax.conv_transpose(x, w, strides=[2], padding=[(1, 1)],
                                      transpose_kernel=True) + b


class TorchUp(nn.Module):
    """A PyTorch port's ``ConvTranspose2d`` on NCHW data, its ``(C_in, C_out, kh, kw)`` weight."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(), (x.shape[1], self.features, 4, 4))
        return jax.lax.conv_transpose(x, w, (2, 2), ((2, 2), (2, 2)), transpose_kernel=True,
                                      dimension_numbers=("NCHW", "OIHW", "NCHW"))


class WrittenUps(nn.Module):
    @nn.compact
    def __call__(self, x1d, x2d):
        y = VocoderUp(16, name="voc")(nn.relu(nn.Conv(12, (3,))(x1d)))
        z = TorchUp(8, name="torch")(nn.relu(TorchUp(12, name="torch_in")(x2d)))
        return y, z


class WrittenUpNNX(nnx.Module):
    """An NNX module's own ``lax.conv_transpose`` with an ``HIO`` kernel, ``SAME`` padding."""

    def __init__(self, cin, cout, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, cin, cout)) / np.sqrt(3 * cin))

    def __call__(self, x):
        return jax.lax.conv_transpose(x, self.w[...], (2,), "SAME")


@pytest.mark.slow  # 4 s on the 2-core machine: the default run stays under 5 minutes
def test_transposed_convs_written_by_hand_split_as_the_layers_they_compute():
    """Before: a module's own ``lax.conv_transpose`` (a conv of its input dilated by the strides,
    its kernel flipped with ``transpose_kernel=True``) stayed its own code, a fixed cost. Now it
    runs as the input-dilated conv it is (its kernel read flipped and transposed as the code
    reads it), split as a transposed conv, 1-D too, in linen and NNX."""
    x1d = jax.random.normal(jax.random.key(3), (2, 9, 6))
    x2d = jax.random.normal(jax.random.key(4), (2, 6, 5, 5))
    model = WrittenUps()
    variables = init(model, 0, x1d, x2d)
    found = {s.path: s for s in surgery.find_convs(model, x1d, x2d)}
    assert all(found[p].candidate and found[p].kind == "transposed" and found[p].written
               for p in ("voc", "torch", "torch_in"))
    assert found["voc"].conv_dims == 1 and found["torch"].shape.strides == (2, 2)
    want = model.apply(variables, x1d, x2d)
    exact = lrjax.decompose_linen(model, variables, x1d, x2d,
                                  rule={"voc": 16, "torch": 32, "torch_in": 24})
    for got, w in zip(exact.module.apply(exact.variables, x1d, x2d), want, strict=True):
        np.testing.assert_allclose(got, w, atol=2e-5 * float(jnp.abs(w).max()))
    shapes = jax.tree.map(jnp.shape, exact.variables["params"])
    assert shapes["voc"] == {"bias": (16,), "vertical": {"kernel": (4, 12, 16)},
                             "horizontal": {"kernel": (1, 16, 16)}}  # (the bias its own)
    assert shapes["torch"] == {"vertical": {"kernel": (4, 1, 12, 32)},
                               "horizontal": {"kernel": (1, 4, 32, 8)}}

    split = lrjax.decompose_linen(model, variables, x1d, x2d, rule="speedup:1.4")
    assert set(split.ranks) & {"voc", "torch", "torch_in"}
    ratio = lowered_flops(model.apply, variables, x1d, x2d) / lowered_flops(
        split.module.apply, split.variables, x1d, x2d)
    assert ratio == pytest.approx(split.report.speedup, rel=1e-6) and ratio >= 1.4

    calibration = (jax.random.normal(jax.random.key(5), (16, 9, 6)),
                   jax.random.normal(jax.random.key(6), (16, 6, 5, 5)) *
                   jnp.linspace(0.1, 3.0, 6)[:, None, None])
    ranks = {"voc": 4, "torch": 6, "torch_in": 6}
    fitted, free = (lrjax.decompose_linen(model, variables, x1d, x2d, rule=ranks, calibration=c)
                    for c in (calibration, None))
    want = model.apply(variables, *calibration)
    errors = [[float(jnp.linalg.norm(g - w)) for g, w in zip(
        r.module.apply(r.variables, *calibration), want, strict=True)] for r in (fitted, free)]
    assert errors[0][0] < errors[1][0] and errors[0][1] < errors[1][1]


@pytest.mark.slow  # 2 s: an export (the default run splits these layers above)
def test_transposed_convs_written_by_hand_export_and_split_in_nnx(tmp_path):
    x1d = jax.random.normal(jax.random.key(3), (2, 9, 6))
    x2d = jax.random.normal(jax.random.key(4), (2, 6, 5, 5))
    model = WrittenUps()
    variables = init(model, 0, x1d, x2d)
    split = lrjax.decompose_linen(model, variables, x1d, x2d,
                                  rule={"voc": 4, "torch": 6, "torch_in": 6})
    done = export.to_onnx(split.module, split.variables, (x1d, x2d), str(tmp_path / "w.onnx"))
    assert done.max_abs_error <= export.ATOL + export.RTOL * done.scale

    nnx_model = WrittenUpNNX(6, 16, nnx.Rngs(0))
    (site,) = nnx_surgery.find_convs_nnx(nnx_model, x1d)
    assert site.path == "w" and site.candidate and site.kind == "transposed"
    nnx_exact = lrjax.decompose_nnx(nnx_model, x1d, rule={"w": 16})
    np.testing.assert_allclose(nnx_exact.module(x1d), nnx_model(x1d), atol=1e-5)


def test_1d_input_dilated_convs_split_as_1d_transposed_convs(tmp_path):
    """Before: "input dilation (2,) of a 1-D conv", left as it is."""
    model = Dilated(dict(kernel_size=(3,), input_dilation=(2,), padding=((1, 2),)))
    variables = init(model, 0, X1)
    (site,) = surgery.find_convs(model, X1)
    assert site.candidate and (site.kind, site.conv_dims) == ("transposed", 1)
    exact = lrjax.decompose_linen(model, variables, X1, rule={"up": 6})
    want = model.apply(variables, X1)
    np.testing.assert_allclose(exact.module.apply(exact.variables, X1), want,
                               atol=2e-5 * float(jnp.abs(want).max()))
    half = lrjax.decompose_linen(model, variables, X1, rule={"up": 2})
    assert half.report.speedup == pytest.approx(lowered_flops(model.apply, variables, X1) /
                                                lowered_flops(half.module.apply, half.variables,
                                                              X1), rel=1e-6)
    done = export.to_onnx(half.module, half.variables, (X1,), str(tmp_path / "d.onnx"))
    assert done.max_abs_error <= export.ATOL + export.RTOL * done.scale
    nnx_model = DilatedNNX(dict(kernel_size=(3,), input_dilation=(2,), padding=((1, 2),)),
                           nnx.Rngs(0))
    np.testing.assert_allclose(lrjax.decompose_nnx(nnx_model, X1, rule={"up": 6}).module(X1),
                               nnx_model(X1), atol=1e-5)


class TorchUpNNX(nnx.Module):
    """:class:`TorchUp` in NNX: its kernel flipped and transposed as the conv reads it."""

    def __init__(self, cin, cout, rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (cin, cout, 4, 4)) / 8.0)

    def __call__(self, x):
        return jax.lax.conv_transpose(x, self.weight[...], (2, 2), ((2, 2), (2, 2)),
                                      transpose_kernel=True,
                                      dimension_numbers=("NCHW", "OIHW", "NCHW"))


def test_nnx_transposed_convs_written_by_hand_with_flipped_kernels_split():
    model, x = TorchUpNNX(6, 8, nnx.Rngs(1)), jax.random.normal(jax.random.key(4), (2, 6, 5, 5))
    (site,) = nnx_surgery.find_convs_nnx(model, x)
    assert site.candidate and site.kind == "transposed" and site.shape.kernel_size == (4, 4)
    exact = lrjax.decompose_nnx(model, x, rule={"weight": 24})
    np.testing.assert_allclose(exact.module(x), model(x), atol=2e-5 * float(jnp.abs(model(x)).max()))
    half = lrjax.decompose_nnx(model, x, rule={"weight": 6})
    assert half.report.speedup == pytest.approx(lowered_flops(lambda m, x: m(x), model, x) /
                                                lowered_flops(lambda m, x: m(x), half.module, x),
                                                rel=1e-6)
