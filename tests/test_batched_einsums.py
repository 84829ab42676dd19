"""Einsums whose kernel is a batch of matrices (a letter shared by the input, the kernel and the
output: a mixture of experts' ``'bsem,emh->bseh'``): each matrix split in the closed form, as a
stack costed as groups, one rank per matrix; calibrated on each matrix's own slice of the input;
NNX pairs saved and loaded; partition names kept; exported."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import costs, export, nnx_surgery, surgery
from lrjax.einsums import batched_dense_equation, einsum_split
from tests.helpers import init, lowered_flops, normal

E, M, H = 4, 16, 32
# kernel layouts of the experts' two products: the batch letter first, in the middle, last
LAYOUTS = {"first": (("bsem,emh->bseh", (E, M, H)), ("bseh,ehm->bsem", (E, H, M))),
           "middle": (("bsem,meh->bseh", (M, E, H)), ("bseh,hem->bsem", (H, E, M))),
           "last": (("bsem,mhe->bseh", (M, H, E)), ("bseh,hme->bsem", (H, M, E)))}
X = normal(0, (2, 8, M))
CALIB = normal(1, (8, 8, M))


class Experts(nn.Module):
    """A dense mixture of experts as MaxText and Mixtral ports write it: every token dispatched
    to every expert by its gate, each expert's matrices one einsum over all experts."""

    layout: str = "first"
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        (up_eq, up_shape), (down_eq, down_shape) = LAYOUTS[self.layout]
        gates = jax.nn.softmax(nn.Dense(E, name="router")(x))
        dispatched = jnp.einsum("bsm,bse->bsem", x, gates)
        h = nn.gelu(nn.Einsum(up_shape, up_eq, use_bias=self.bias, name="up")(dispatched))
        return nn.Einsum(down_shape, down_eq, use_bias=self.bias, name="down")(h).sum(2)


class ExpertsNNX(nnx.Module):
    """The same in NNX."""

    def __init__(self, layout: str, rngs: nnx.Rngs, bias: bool = False):
        (up_eq, up_shape), (down_eq, down_shape) = LAYOUTS[layout]
        self.router = nnx.Linear(M, E, rngs=rngs)
        self.up = nnx.Einsum(up_eq, up_shape, (E, H) if bias else None, rngs=rngs)
        self.down = nnx.Einsum(down_eq, down_shape, (E, M) if bias else None, rngs=rngs)

    def __call__(self, x):
        gates = jax.nn.softmax(self.router(x))
        return self.down(nnx.gelu(self.up(jnp.einsum("bsm,bse->bsem", x, gates)))).sum(2)


def _full(found) -> dict:
    return {s.path: costs.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
            for s in found if s.candidate}


def test_the_split_of_a_batch_of_kernels_keeps_the_batch_letter_where_the_kernel_has_it():
    split = einsum_split("bsem,meh->bseh")
    assert (split.batch, split.batch_axis, split.batch_input_axis) == ("e", 1, 2)
    assert (split.first, split.second) == ("bsem,mez->bsez", "bsez,zeh->bseh")
    assert split.dims((M, E, H)) == ((M,), (H,))
    assert split.factor_shapes((M, E, H), 5) == ((M, E, 5), (5, E, H))
    assert einsum_split("bsem,mhe->bseh").factor_shapes((M, H, E), 5) == ((M, 5, E), (5, H, E))
    assert "kernel letters 'ef' are batch dims" in einsum_split("bsefm,efmh->bsefh")


@pytest.mark.parametrize("layout", ["first", pytest.param("middle", marks=pytest.mark.slow),
                                    pytest.param("last", marks=pytest.mark.slow)])
def test_linen_experts_split_per_expert_costed_as_xla_counts(layout):
    model = Experts(layout, bias=layout == "middle")
    variables = init(model, 0, X)
    found = {s.path: s for s in surgery.find_convs(model, X)}
    up = found["up"]
    assert (up.kind, up.batched, up.stack, up.dense_dims) == ("dense", True, E, ((M,), (H,)))
    assert up.full_macs == 8 * E * M * H  # per example: 8 tokens through each of 4 experts
    exact = lrjax.decompose_linen(model, variables, X, rule=_full(found.values()))
    want = model.apply(variables, X)
    np.testing.assert_allclose(exact.module.apply(exact.variables, X), want, atol=1e-5)
    split = lrjax.decompose_linen(model, variables, X, rule="speedup:1.5")
    assert set(split.ranks) & {"up", "down"} and all(
        split.ranks[p] % E == 0 for p in split.ranks if p != "router")
    ratio = lowered_flops(model.apply, variables, X) / lowered_flops(
        split.module.apply, split.variables, X)
    assert ratio == pytest.approx(split.report.speedup, rel=1e-6)
    assert ratio >= 1.5
    path = next(p for p in ("up", "down") if p in split.ranks)
    k = split.ranks[path] // E
    shapes = {p: np.shape(v["kernel"]) for p, v in split.variables["params"][path].items()}
    (eq, shape), _ = LAYOUTS[layout] if path == "up" else LAYOUTS[layout][::-1]
    assert shapes == dict(zip(("vertical", "horizontal"),
                              einsum_split(eq).factor_shapes(shape, k), strict=True))
    # calibrated: each expert on its own slice of the dispatched tokens
    calibrated = lrjax.decompose_linen(model, variables, X, rule=dict(split.ranks),
                                       calibration=CALIB)
    errors = [float(jnp.linalg.norm(r.module.apply(r.variables, CALIB) -
                                    model.apply(variables, CALIB))) for r in (calibrated, split)]
    assert errors[0] < 0.9 * errors[1]


@pytest.mark.parametrize("layout", ["first", "last"])
def test_nnx_experts_split_calibrate_save_and_load(layout, tmp_path):
    model = ExpertsNNX(layout, nnx.Rngs(0), bias=True)
    found = nnx_surgery.find_convs_nnx(model, X)
    assert {s.path: (s.batched, s.stack) for s in found if s.candidate} == {
        "router": (False, 1), "up": (True, E), "down": (True, E)}
    exact = lrjax.decompose_nnx(model, X, rule=_full(found))
    np.testing.assert_allclose(exact.module(X), model(X), atol=1e-5)
    rule = {"up": 2 * E, "down": 3 * E}
    data_free = lrjax.decompose_nnx(model, X, rule=rule)
    calibrated = lrjax.decompose_nnx(model, X, rule=rule, calibration=CALIB)
    errors = [float(jnp.linalg.norm(r.module(CALIB) - model(CALIB)))
              for r in (calibrated, data_free)]
    assert errors[0] < 0.9 * errors[1]
    up = calibrated.module.up
    assert isinstance(up, nnx_surgery.LowRankEinsumNNX)
    (eq, shape), _ = LAYOUTS[layout]
    assert (up.vertical.kernel.shape, up.horizontal.kernel.shape) == \
        einsum_split(eq).factor_shapes(shape, 2)
    flops = [lowered_flops(lambda s, x, g=g: nnx.merge(g, s)(x), s, X)  # weights as arguments
             for g, s in (nnx.split(m) for m in (model, calibrated.module))]
    assert flops[0] / flops[1] == pytest.approx(calibrated.report.speedup, rel=1e-6)
    loaded = lrjax.load_decomposed(lrjax.save_decomposed(str(tmp_path / "e"), calibrated),
                                   ExpertsNNX(layout, nnx.Rngs(3), bias=True), X)
    np.testing.assert_array_equal(loaded(X), calibrated.module(X))


class Dispatched(nn.Module):
    """V-MoE's layout: tokens gathered into per-expert buffers ``(E, capacity, M)`` first."""

    @nn.compact
    def __call__(self, x):
        buffers = x.reshape(E, -1, M)  # (experts, capacity, M): the batch letter leads the input
        h = nn.relu(nn.Einsum((E, M, H), "ecm,emh->ech", name="up")(buffers))
        return nn.Einsum((E, H, M), "ech,ehm->ecm", name="down")(h).reshape(x.shape)


def test_experts_on_dispatch_buffers_are_costed_per_example():
    model = Dispatched()
    variables = init(model, 0, X)
    found = {s.path: s for s in surgery.find_convs(model, X)}
    assert found["up"].full_macs == 8 * M * H  # a token goes to one expert: 2 x 8 per batch
    split = lrjax.decompose_linen(model, variables, X, rule={"up": E * 4, "down": E * 4})
    ratio = lowered_flops(model.apply, variables, X) / lowered_flops(
        split.module.apply, split.variables, X)
    assert ratio == pytest.approx(split.report.speedup, rel=1e-6)


class ExpertsBlock(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return Experts(name="experts")(c), None


class ScannedExperts(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.scan(ExpertsBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=2)(name="layers")(x, None)[0]


def test_a_batch_of_kernels_stacked_again_by_scan_is_left_with_the_reason():
    found = {s.path: s for s in surgery.find_convs(ScannedExperts(), X)}
    assert "a batch of kernels (4, 16, 32) stacked again by a lifted transform" in \
        found["layers/experts/up"].skip
    assert found["layers/experts/router"].stack == 2


class Sharded(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), ("exp", "embed", "mlp"))
        dispatched = jnp.broadcast_to(x[:, :, None], (*x.shape[:2], E, M))
        return nn.Einsum((M, E, H), "bsem,meh->bseh", kernel_init=nn.with_partitioning(
            nn.initializers.lecun_normal(), ("embed", "exp", "mlp")), name="up")(dispatched) + \
            nn.Einsum((E, M, H), "bsem,emh->bseh", kernel_init=init, name="up2")(dispatched)


def test_factors_of_a_batch_of_kernels_keep_its_axis_names():
    variables = init(Sharded(), 0, X)
    split = lrjax.decompose_linen(Sharded(), variables, X, rule={"up": 2 * E, "up2": 2 * E})
    names = {p: tuple(split.variables["params"][p][f]["kernel"].names for f in
                      ("vertical", "horizontal")) for p in ("up", "up2")}
    assert names == {"up": (("embed", "exp", None), (None, "exp", "mlp")),
                     "up2": (("exp", "embed", None), ("exp", None, "mlp"))}


def test_split_experts_export_to_onnx_and_litert(tmp_path):
    model = Experts("middle")
    variables = init(model, 0, X)
    split = lrjax.decompose_linen(model, variables, X, rule={"up": 2 * E, "down": 2 * E})
    scale = float(jnp.abs(split.module.apply(split.variables, X)).max())
    for convert, name in ((export.to_onnx, "e.onnx"), (export.to_tflite, "e.tflite")):
        result = convert(split.module, split.variables, (X,), str(tmp_path / name))
        assert result.max_abs_error <= 1e-5 * scale


class WrittenKernels(nn.Module):
    """The experts' kernels as raw parameters multiplied in a module's own code."""

    @nn.compact
    def __call__(self, dispatched):
        up = self.param("wi", nn.initializers.lecun_normal(), (E, M, H))
        down = self.param("wo", nn.initializers.lecun_normal(), (E, H, M))
        h = nn.gelu(jnp.einsum("bsem,emh->bseh", dispatched, up))
        return jnp.einsum("bseh,ehm->bsem", h, down)


class WrittenExperts(nn.Module):
    @nn.compact
    def __call__(self, x):
        gates = jax.nn.softmax(nn.Dense(E, name="router")(x))
        dispatched = jnp.einsum("bsm,bse->bsem", x, gates)
        return WrittenKernels(name="experts")(dispatched).sum(2)


class ExpertEinsum(nnx.Module):
    """google/tunix's way: one parameter, its equation an attribute."""

    def __init__(self, equation, shape, rngs):
        self.equation = equation
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(shape[1]))

    def __call__(self, x):
        return jnp.einsum(self.equation, x, self.w[...])


class WrittenExpertsNNX(nnx.Module):
    def __init__(self, rngs):
        self.router = nnx.Linear(M, E, rngs=rngs)
        self.up = ExpertEinsum("BSEM,EMH->BSEH", (E, M, H), rngs)
        self.down = ExpertEinsum("BSEH,EHM->BSEM", (E, H, M), rngs)

    def __call__(self, x):
        gates = jax.nn.softmax(self.router(x))
        return self.down(nnx.gelu(self.up(jnp.einsum("bsm,bse->bsem", x, gates)))).sum(2)


def test_written_expert_kernels_split_as_batches_of_kernels():
    """Before: each listed as the model's own product ("a batch of products")."""
    model = WrittenExperts()
    variables = init(model, 0, X)
    found = {s.path: s for s in surgery.find_convs(model, X)}
    assert {p: (s.batched, s.stack) for p, s in found.items() if s.candidate} == {
        "router": (False, 1), "experts/wi": (True, E), "experts/wo": (True, E)}
    exact = lrjax.decompose_linen(model, variables, X, rule=_full(found.values()))
    np.testing.assert_allclose(exact.module.apply(exact.variables, X),
                               model.apply(variables, X), atol=1e-5)
    split = lrjax.decompose_linen(model, variables, X, rule="speedup:1.5", calibration=CALIB)
    assert split.report.speedup == pytest.approx(lowered_flops(model.apply, variables, X) /
                                                 lowered_flops(split.module.apply,
                                                               split.variables, X), rel=1e-6)
    nnx_model = WrittenExpertsNNX(nnx.Rngs(0))
    found = nnx_surgery.find_convs_nnx(nnx_model, X)
    assert {s.path: (s.batched, s.stack) for s in found if s.candidate} == {
        "router": (False, 1), "up": (True, E), "down": (True, E)}
    exact = lrjax.decompose_nnx(nnx_model, X, rule=_full(found))
    np.testing.assert_allclose(exact.module(X), nnx_model(X), atol=1e-5)
    assert lrjax.decompose_nnx(nnx_model, X, rule="speedup:1.5", calibration=CALIB).ranks


class EinsumBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Einsum("bsm,mh->bsh", (M, H), rngs=rngs)
        self.experts = ExpertsNNX("first", rngs)

    def __call__(self, x):
        return x + self.experts(nnx.relu(self.up(x))[..., :M])


class EinsumStack(nnx.Module):
    """Flax's scan-over-layers idiom: blocks made by ``nnx.vmap``, run by ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return EinsumBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_nnx_einsums_in_a_stack_split_per_iteration_and_a_stacked_batch_of_kernels_says_why():
    """Before: any ``nnx.Einsum`` in an NNX stack failed to be found (its stacked kernel's shape
    read as one iteration's: "zip() argument 2 is longer than argument 1")."""
    model = EinsumStack(nnx.Rngs(0))
    found = {s.path: s for s in nnx_surgery.find_convs_nnx(model, X)}
    assert (found["blocks/up"].stack, found["blocks/up"].candidate) == (2, True)
    assert "a batch of kernels (4, 16, 32) stacked again" in found["blocks/experts/up"].skip
    exact = lrjax.decompose_nnx(model, X, rule={"blocks/up": 2 * M})
    np.testing.assert_allclose(exact.module(X), model(X), atol=1e-5)


class BatchRowProjections(nn.Module):
    """A DDPM U-Net's residual projections as a public training script writes them:
    ``nn.DenseGeneral(C, axis=-1, batch_dims=(0,))``, one kernel per batch row (and one over two
    axes, without bias)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(16, (3, 3))(x))
        b, rows, cols, c = h.shape
        h = h.reshape(b, rows * cols, c)
        y = nn.DenseGeneral(24, axis=-1, batch_dims=(0,), name="proj")(h)
        z = nn.DenseGeneral((2, 12), axis=(-2, -1), batch_dims=0, use_bias=False,
                            name="mix")(y.reshape(b, rows * cols, 4, 6))
        return y.mean(1), z


def test_dense_general_with_a_batch_dim_splits_as_its_batch_of_kernels(tmp_path):
    """Before: listed, "batch dims: one kernel per batch index, no one matrix to split" (a public
    DDPM U-Net's five residual projections). It is the einsum ``'bsc,bcf->bsf'``: a batch of
    kernels, each split alike, costed as groups, calibrated on its own row."""
    model, x = BatchRowProjections(), jax.random.normal(jax.random.key(0), (3, 4, 4, 8))
    variables = init(model, 0, x)
    with lrjax.linen_cells.as_sublayers():  # run as an nn.Einsum: Flax's own initial values
        again = init(model, 0, x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables, again))
    found = {s.path: s for s in surgery.find_convs(model, x)}
    assert found["proj"].candidate and (found["proj"].batched, found["proj"].stack) == (True, 3)
    assert found["mix"].dense_dims == ((4, 6), (2, 12))
    want = model.apply(variables, x)
    exact = lrjax.decompose_linen(model, variables, x, rule={"proj": 3 * 16, "mix": 3 * 24})
    for got, w in zip(exact.module.apply(exact.variables, x), want, strict=True):
        np.testing.assert_allclose(got, w, atol=2e-5 * float(jnp.abs(w).max()))
    shapes = jax.tree.map(jnp.shape, exact.variables["params"])
    assert shapes["proj"] == {"vertical": {"kernel": (3, 16, 16)},
                              "horizontal": {"kernel": (3, 16, 24), "bias": (3, 24)}}
    assert shapes["mix"] == {"vertical": {"kernel": (3, 4, 6, 24)},
                             "horizontal": {"kernel": (3, 24, 2, 12)}}

    split = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5")
    assert set(split.ranks) & {"proj", "mix"}
    ratio = lowered_flops(model.apply, variables, x) / lowered_flops(
        split.module.apply, split.variables, x)
    assert ratio == pytest.approx(split.report.speedup, rel=1e-6) and ratio >= 1.5

    ranks = {"proj": 3 * 4, "mix": 3 * 6}
    batches = [jax.random.normal(jax.random.key(i), (3, 4, 4, 8)) for i in range(1, 9)]
    calibrated = lrjax.decompose_linen(model, variables, x, rule=ranks, calibration=batches)
    plain = lrjax.decompose_linen(model, variables, x, rule=ranks)
    held_out = jax.random.normal(jax.random.key(20), (3, 4, 4, 8))
    errors = [float(jnp.linalg.norm(r.module.apply(r.variables, held_out)[1] -
                                    model.apply(variables, held_out)[1]))
              for r in (calibrated, plain)]
    assert errors[0] < 0.9 * errors[1]

    done = export.to_onnx(split.module, split.variables, x, str(tmp_path / "p.onnx"),
                          fixed_batch=True)  # (its kernels hold the batch)
    assert done.max_abs_error <= export.ATOL + export.RTOL * done.scale


class BatchRowProjectionsNNX(nnx.Module):
    """:class:`BatchRowProjections` in NNX: ``nnx.LinearGeneral(batch_axis={0: B})``, one kernel
    per batch row (and one over two axes, without bias)."""

    def __init__(self, rngs, batch=3):
        self.conv = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.proj = nnx.LinearGeneral(16, 24, axis=-1, batch_axis={0: batch}, rngs=rngs)
        self.mix = nnx.LinearGeneral((4, 6), (2, 12), axis=(-2, -1), batch_axis={0: batch},
                                     use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv(x))
        b, rows, cols, c = h.shape
        y = self.proj(h.reshape(b, rows * cols, c))
        return y.mean(1), self.mix(y.reshape(b, rows * cols, 4, 6))


def test_nnx_linear_general_with_a_batch_axis_splits_as_its_batch_of_kernels(tmp_path):
    """Before: listed, "a batch axis (NNX): one kernel per batch index, not split". It is the
    einsum ``'abc,acd->abd'``, split as linen's ``nn.DenseGeneral(batch_dims=(0,))``: each
    row's kernel alike, in the parameters' places, costed as XLA counts it, calibrated on its
    own row, saved, loaded and exported."""
    model, x = BatchRowProjectionsNNX(nnx.Rngs(0)), normal(0, (3, 4, 4, 8))
    found = {s.path: s for s in nnx_surgery.find_convs_nnx(model, x)}
    assert found["proj"].candidate and (found["proj"].batched, found["proj"].stack) == (True, 3)
    assert found["mix"].candidate and found["mix"].dense_dims == ((4, 6), (2, 12))
    want = model(x)
    exact = lrjax.decompose_nnx(model, x, rule={"proj": 3 * 16, "mix": 3 * 24})
    for got, w in zip(exact.module(x), want, strict=True):
        np.testing.assert_allclose(got, w, atol=2e-5 * float(jnp.abs(w).max()))
    shapes = jax.tree.map(jnp.shape, nnx.state(exact.module, nnx.Param).to_pure_dict())
    assert shapes["proj"] == {"vertical": {"kernel": (3, 16, 16)},
                              "horizontal": {"kernel": (3, 16, 24), "bias": (3, 24)}}
    assert shapes["mix"] == {"vertical": {"kernel": (3, 4, 6, 24)},
                             "horizontal": {"kernel": (3, 24, 2, 12)}}

    split = lrjax.decompose_nnx(model, x, rule="speedup:1.5")
    assert {"proj", "mix"} <= set(split.ranks)
    flops = [lowered_flops(lambda s, v, g=g: nnx.merge(g, s)(v), s, x)  # weights as arguments
             for g, s in (nnx.split(m) for m in (model, split.module))]
    assert flops[0] / flops[1] == pytest.approx(split.report.speedup, rel=1e-6)
    assert split.report.speedup >= 1.5
    loaded = lrjax.load_decomposed(lrjax.save_decomposed(str(tmp_path / "s"), split),
                                   BatchRowProjectionsNNX(nnx.Rngs(3)), x)
    for got, w in zip(loaded(x), split.module(x), strict=True):
        np.testing.assert_array_equal(got, w)

    ranks = {"proj": 3 * 4, "mix": 3 * 6}
    batches = [normal(i, (3, 4, 4, 8)) for i in range(1, 9)]
    calibrated = lrjax.decompose_nnx(model, x, rule=ranks, calibration=batches)
    plain = lrjax.decompose_nnx(model, x, rule=ranks)
    held_out = normal(20, (3, 4, 4, 8))
    reference = model(held_out)[1]
    errors = [float(jnp.linalg.norm(r.module(held_out)[1] - reference)) for r in (calibrated, plain)]
    assert errors[0] < 0.9 * errors[1]
    np.testing.assert_array_equal(model(x)[1], want[1])  # the model itself unchanged

    done = export.to_onnx(split.module, None, x, str(tmp_path / "p.onnx"), fixed_batch=True)
    assert done.max_abs_error <= export.ATOL + export.RTOL * done.scale


class TwoBatchAxes(nnx.Module):
    def __init__(self, rngs):
        self.two = nnx.LinearGeneral(4, 5, batch_axis={0: 2, 1: 3}, rngs=rngs)

    def __call__(self, x):
        return self.two(x)


def test_nnx_linear_general_with_two_batch_axes_is_listed_with_its_reason():
    (site,) = nnx_surgery.find_convs_nnx(TwoBatchAxes(nnx.Rngs(0)), normal(0, (2, 3, 4)))
    assert not site.candidate
    assert site.skip == "more than one batch axis (NNX): one kernel per index of several axes"


def test_a_batched_dense_layers_equation_is_the_einsum_flax_computes():
    """``lrjax.einsums.batched_dense_equation`` against Flax's own ``nnx.LinearGeneral`` with a
    batch axis, over one and two contracted axes (negative or not); ``None`` for the batch axis
    contracted."""
    for ndim, axis, features, in_shape in [(3, -1, (5,), (2, 4, 3)), (4, (2, 3), (2, 5), (2, 3, 4, 6)),
                                           (4, 1, (3,), (2, 4, 6, 3))]:
        equation = batched_dense_equation(ndim, axis, len(features))
        layer = nnx.LinearGeneral(tuple(in_shape[a] for a in np.atleast_1d(axis)), features,
                                  axis=axis, batch_axis={0: 2}, rngs=nnx.Rngs(0))
        x = normal(ndim, in_shape)
        np.testing.assert_allclose(jnp.einsum(equation, x, layer.kernel[...]),
                                   layer(x) - layer.bias[...].reshape(
                                       2, *[1] * (ndim - 1 - len(np.atleast_1d(axis))), *features),
                                   rtol=1e-5, atol=1e-5)
    assert batched_dense_equation(4, (2, 3), 2) == "abcd,acdef->abef"
    assert batched_dense_equation(3, (0, 2), 1) is None
