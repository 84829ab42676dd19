"""Cost model and rank selection."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import cost_report, costs, macs, ranks
from lrjax.decompose import max_rank, relative_errors, singular_values
from tests.helpers import xla_flops


def test_vgg16_authors_ranks_cost():
    net = costs.net_cost(cost_report.zoo_conv_shapes("vgg16", 224), ranks.load_ranks("vgg16"))
    # multiply-adds performed (taps on padding skipped, as XLA counts); counting every output's
    # whole window, the papers' convention, gives 15.35 G -> 4.94 G (3.10x)
    assert round(net.full_macs / 1e9, 2) == 14.85
    assert round(net.lowrank_macs / 1e9, 2) == 4.86
    assert round(net.speedup, 2) == 3.06
    assert net.full_params == 14_714_688  # VGG-16 conv weights + biases
    assert "conv5_3" in net.table()


def test_caffenet_authors_ranks_cost():
    net = costs.net_cost(cost_report.zoo_conv_shapes("caffenet", 227), ranks.load_ranks("caffenet"))
    assert round(net.full_macs / 1e9, 3) == 0.613  # 0.666 G -> 0.126 G (5.29x) whole windows
    assert round(net.lowrank_macs / 1e9, 3) == 0.121
    assert net.speedup == pytest.approx(5.06, abs=0.01)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Checked:
    """A pytree class checking its fields are arrays when made (as openpi's ``Observation``,
    type-checked by jaxtyping and beartype): JAX's lowering rebuilds argument trees with
    ``ArgInfo`` leaves, which such a class refuses."""

    image: jax.Array

    def __post_init__(self):
        if not isinstance(self.image, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            raise TypeError(f"image must be an array, not {type(self.image).__name__}")


def test_element_wise_work_is_counted_for_arguments_of_a_checking_pytree_class():
    """Before: XLA's count of the lowered call failed on the argument tree, unseen, and the
    element-wise work was counted as 0 (openpi's pi0 reported "0 element-wise")."""
    w = jnp.ones((8, 16))

    def net(w, batch):
        return jnp.tanh(batch.image @ w + 1.0).sum()

    got = macs.traced_macs(net, w, Checked(jnp.ones((4, 8))))
    want = macs.traced_macs(lambda w, image: net(w, Checked(image)), w, jnp.ones((4, 8)))
    assert got["elementwise"] == want["elementwise"] > 0


@pytest.mark.parametrize("kernel,strides,padding,lhs_dilation,rhs_dilation", [
    ((3, 3), (1, 1), "SAME", (1, 1), (1, 1)),
    ((3, 3), (2, 2), "SAME", (1, 1), (1, 1)),
    ((7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), (1, 1)),
    ((3, 3), (1, 1), ((1, 2), (2, 1)), (2, 2), (1, 1)),  # a transposed conv's input dilation
    ((3, 1), (2, 1), ((2, 2), (0, 0)), (1, 1), (2, 1)),
    ((1, 1), (2, 2), ((1, 0), (0, 1)), (1, 1), (1, 1)),
    ((3, 3), (1, 1), "VALID", (1, 1), (1, 1)),
])
def test_conv_macs_are_xlas_flop_count(kernel, strides, padding, lhs_dilation, rhs_dilation):
    """A conv's multiply-adds are the taps that land on the input: XLA's flops, exactly twice."""
    x, w = jnp.ones((2, 9, 8, 5)), jnp.ones((*kernel, 5, 7))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation, rhs_dilation,
                                            ("NHWC", "HWIO", "NHWC"))

    flops = xla_flops(conv, x, w)
    assert 2 * macs.traced_macs(conv, x, w)["total"] == flops
    if lhs_dilation == (1, 1):  # the cost model's count of the same conv
        shape = costs.ConvShape("c", (9, 8), 5, 7, kernel, strides, padding, rhs_dilation)
        assert 2 * 2 * costs.conv_cost(shape).macs == flops


def test_valid_taps():
    assert costs.valid_taps(5, 3, 1, 1, 1, 5) == 15 - 2  # SAME: one tap off each edge
    assert costs.valid_taps(5, 3, 1, 0, 1, 3) == 9  # VALID: every tap on the input
    assert costs.valid_taps(3, 3, 1, 2, 1, 7, input_dilation=2) == 9  # each input read 3 times
    assert costs.valid_taps(4, 1, 2, 0, 1, 2) == 2


def test_pair_cost_counts_vertical_at_input_width():
    # stride 2: the vertical conv runs over the full input width. SAME pads one row and column
    # at the end, so the last output's window has 2 of its 3 taps on the input: 11 taps per axis
    layer = costs.ConvShape("c", (8, 8), 4, 6, (3, 3), strides=(2, 2), padding="SAME")
    assert layer.output_hw == (4, 4) and layer.taps_hw == (3 + 3 + 3 + 2,) * 2
    c = costs.lowrank_cost(layer, 5)
    assert c.macs == 11 * 8 * 4 * 5 + 4 * 11 * 5 * 6
    assert c.params == 3 * 4 * 5 + 3 * 5 * 6 + 6
    assert costs.conv_cost(layer).macs == 11 * 11 * 4 * 6
    grouped = costs.ConvShape("g", (5, 5), 4, 6, (3, 3), padding="VALID", groups=2)
    assert costs.lowrank_cost(grouped, 4).macs == 3 * 5 * 3 * 2 * 4 + 3 * 3 * 3 * 2 * 6
    with pytest.raises(ValueError, match="rank 3 is invalid for layer 'g'"):
        costs.lowrank_cost(grouped, 3)


@pytest.mark.parametrize("padding,expect", [
    ("SAME", (6, 6)), ("VALID", (4, 4)), (1, (6, 6)), ([(2, 0), (0, 0)], (6, 4)), ((1, 2), (6, 8)),
])
def test_output_size(padding, expect):
    assert costs.output_size((6, 6), (3, 3), 1, padding) == expect


def test_output_size_dilation_stride():
    assert costs.output_size((9, 9), (3, 3), 2, "VALID", 2) == (3, 3)
    with pytest.raises(ValueError, match="too small"):
        costs.output_size((2, 2), (5, 5), 1, "VALID")


def test_net_cost_rejects_unknown_layers():
    with pytest.raises(ValueError, match=r"unknown layers \['conv9'\]"):
        costs.net_cost(cost_report.zoo_conv_shapes("vgg16"), {"conv9": 3})


def test_load_ranks_files(tmp_path):
    assert ranks.load_ranks("caffenet")["conv5"] == 200
    assert ranks.load_ranks("nin") == {"conv1": 10, "conv2": 51}
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"conv1": 3}))
    assert ranks.load_ranks(str(p)) == {"conv1": 3}
    p.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        ranks.load_ranks(str(p))
    p.write_text(json.dumps({"conv1": "three"}))
    with pytest.raises(ValueError, match="integer ranks"):
        ranks.load_ranks(str(p))
    with pytest.raises(ValueError, match="cannot read rank file"):
        ranks.load_ranks(str(tmp_path / "missing.json"))


def test_energy_rank_and_rounding():
    rng = np.random.default_rng(0)
    # a kernel with a known spectrum: energies 16, 4, 1, 0.25 ... on a 3x3x4x4 (12 x 12) matrix
    w = rng.standard_normal((3, 3, 4, 4)).astype(np.float64)
    curve = np.asarray(relative_errors(w)) ** 2  # fraction of energy lost at rank k
    for frac in (0.5, 0.9, 0.99):
        k = ranks.energy_rank(w, frac)
        assert 1 - curve[k] >= frac - 1e-9 and 1 - curve[k - 1] < frac
    assert ranks.energy_rank(w, 1.0) == 12
    assert ranks.energy_rank(w, 0.5, multiple=8) % 8 == 0
    g = rng.standard_normal((3, 3, 2, 8))
    assert ranks.energy_rank(g, 0.9, groups=2) % 2 == 0
    assert ranks.round_rank(37, 8, top=100) == 40
    assert ranks.round_rank(3, 8, top=100) == 8
    assert ranks.round_rank(97, 16, top=100) == 96
    assert ranks.round_rank(30, 8, top=100, groups=2) == 32
    with pytest.raises(ValueError, match=r"energy fraction must be in \(0, 1\]"):
        ranks.energy_rank(w, 1.5)


def _vgg_kernels(image_size=32):
    """VGG-16's layers and kernels ``U diag(s) V^T`` (reshaped to HWIO) with decaying singular
    values ``s``, like trained ones, and random signed permutations ``U``, ``V`` (orthonormal and
    cheap): ``{name: s}`` is their exact spectrum, no SVD needed."""
    rng = np.random.default_rng(0)
    layers = cost_report.zoo_conv_shapes("vgg16", image_size)
    kernels, spectra = {}, {}
    for layer in layers:
        kh, kw, c, n = layer.kernel_shape
        r = min(c * kh, kw * n)
        decay = np.exp(-np.arange(r) / (0.1 * r)).astype(np.float32)
        m = np.zeros((c * kh, kw * n), np.float32)
        m[rng.permutation(c * kh)[:r], rng.permutation(kw * n)[:r]] = \
            decay * rng.choice([-1.0, 1.0], r)
        kernels[layer.name] = m.reshape(c, kh, kw, n).transpose(1, 2, 0, 3)
        spectra[layer.name] = decay[None]
    return layers, kernels, spectra


@pytest.fixture(scope="module")
def vgg():
    """VGG-16's layers at 32x32, kernels with decaying spectra, and their spectra."""
    return _vgg_kernels()


def test_vgg_kernels_have_the_spectra_given(vgg):
    _, kernels, spectra = vgg
    for name in ("conv1_1", "conv3_1"):  # two small ones: SVDs of the large ones are slow
        np.testing.assert_allclose(singular_values(kernels[name]), spectra[name], rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("target", [2.0, 3.1, 5.0])
def test_allocate_ranks_reaches_target(target, vgg):
    layers, kernels, spectra = vgg
    alloc = ranks.allocate_ranks(layers, kernels, target_speedup=target, spectra=spectra)
    assert alloc.speedup >= target
    # within rounding: one more rank unit on any layer would miss the target
    by = {layer.name: layer for layer in layers}
    slack = max(costs.rank_cost_slope(by[n]) for n in alloc.ranks)
    assert alloc.full_macs / (alloc.lowrank_macs + slack) < target
    for layer in layers:
        rank = alloc.ranks[layer.name]  # None: kept full
        assert rank is None or 1 <= rank <= max_rank(layer.kernel_shape)
    net = costs.net_cost(layers, alloc.ranks)
    assert net.lowrank_macs == alloc.lowrank_macs


@pytest.mark.parametrize("target", [1.05, 1.3, 2.0])
def test_allocate_ranks_never_splits_a_layer_for_nothing(target, vgg):
    layers, kernels, spectra = vgg
    alloc = ranks.allocate_ranks(layers, kernels, target_speedup=target, spectra=spectra)
    assert alloc.speedup >= target
    for layer in layers:
        rank = alloc.ranks[layer.name]
        if rank is not None:  # every pair chosen saves multiply-adds
            assert costs.lowrank_cost(layer, rank).macs < costs.conv_cost(layer).macs
        else:
            assert alloc.retained_energy[layer.name] == 1.0
    if target < 1.1:  # a small target is met by splitting few layers, the rest stay full
        assert sum(r is None for r in alloc.ranks.values()) >= len(layers) // 2
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="target_speedup must be > 1"):
            ranks.allocate_ranks(layers, kernels, target_speedup=bad, spectra=spectra)


def test_saving_rank_is_the_largest_rank_that_saves(vgg):
    layers, _, _ = vgg
    for layer in layers:
        rank = ranks.saving_rank(layer, 8)
        full = costs.conv_cost(layer).macs
        assert rank % 8 == 0 and costs.lowrank_cost(layer, rank).macs < full
        if rank + 8 <= max_rank(layer.kernel_shape):
            assert costs.lowrank_cost(layer, rank + 8).macs >= full
    thin = costs.ConvShape("thin", (8, 8), 1, 1, (1, 3))  # 1 -> 1, 1x3: no pair saves
    assert ranks.saving_rank(thin) is None


def test_allocate_ranks_prefers_compressible_layers(vgg):
    layers, kernels, spectra = vgg
    flat = dict(kernels)
    rng = np.random.default_rng(1)
    flat["conv3_2"] = rng.standard_normal(flat["conv3_2"].shape)  # incompressible
    flat_spectra = {**spectra, "conv3_2": None}  # None: its own spectrum
    alloc = ranks.allocate_ranks(layers, flat, target_speedup=3.0, spectra=flat_spectra)
    ref = ranks.allocate_ranks(layers, kernels, target_speedup=3.0, spectra=spectra)
    assert ref.ranks["conv3_2"] is not None  # kept full (None) or a larger rank
    assert alloc.ranks["conv3_2"] is None or alloc.ranks["conv3_2"] > ref.ranks["conv3_2"]


def test_allocate_ranks_multiple_and_errors(vgg):
    layers, kernels, spectra = vgg
    alloc = ranks.allocate_ranks(layers, kernels, target_speedup=3.0, multiple=16,
                                 spectra=spectra)
    assert all(r is None or r % 16 == 0 or r == max_rank(by.kernel_shape)
               for by in layers for r in [alloc.ranks[by.name]])
    budget = ranks.allocate_ranks(layers, kernels, macs_budget=alloc.full_macs // 4,
                                  spectra=spectra)
    assert budget.lowrank_macs <= alloc.full_macs // 4
    with pytest.raises(ValueError, match="out of reach"):
        ranks.allocate_ranks(layers, kernels, target_speedup=1e6, spectra=spectra)
    with pytest.raises(ValueError, match="exactly one"):
        ranks.allocate_ranks(layers, kernels)
    with pytest.raises(ValueError, match="no kernel given for layer 'conv1_1'"):
        ranks.allocate_ranks(layers, {}, target_speedup=2)
