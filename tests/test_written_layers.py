"""Linear layers written by hand in NNX (:mod:`lrjax.nnx_written`): a module of the user's own
computing ``x @ kernel + bias`` is split as ``nnx.Linear`` is (bonsai's ``ShardedLinear`` in
Qwen 3-VL and LLaDA), one computing one einsum of the data and its kernel as ``nnx.Einsum`` is
(tunix's ``Einsum`` in its Llama 3, Qwen and Gemma models; a PyTorch-layout ``x @ kernel.T``);
one that computes anything else has its product split as its own code's
(:mod:`lrjax.nnx_products`) where it is one, else is left as it is, a fixed cost."""

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx

import lrjax
from lrjax import export
from tests.helpers import lowered_flops, normal, xla_flops


class ShardedLinear(nnx.Module):
    """As bonsai's: ``nnx.Linear``'s variables, its own call (``out_sharding`` keyword-only), a
    bias of zeros that is not a variable when it has none (LLaDA's)."""

    def __init__(self, i, o, *, use_bias=True, rngs):
        self.kernel = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), (i, o)))
        self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (o,))) if use_bias \
            else nnx.data(jnp.zeros((o,)))

    def __call__(self, x, *, out_sharding):
        return jnp.matmul(x, self.kernel[...], out_sharding=out_sharding) + self.bias[...]


class Activated(ShardedLinear):
    """Holds a kernel and a bias, computes ``gelu(x @ kernel + bias)``: not a dense layer."""

    def __call__(self, x, *, out_sharding):
        return jax.nn.gelu(super().__call__(x, out_sharding=out_sharding))


class Transposed(nnx.Module):
    """A PyTorch-style ``(out, in)`` kernel used as ``x @ kernel.T``: not ``x @ kernel``, the
    einsum ``abc,Ac->abA``."""

    def __init__(self, i, o, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (o, i)) / np.sqrt(i))

    def __call__(self, x):
        return x @ self.kernel[...].T


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up = ShardedLinear(32, 96, rngs=rngs)
        self.act = Activated(96, 96, rngs=rngs)
        self.down = ShardedLinear(96, 32, use_bias=False, rngs=rngs)
        self.square = Transposed(32, 32, rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        h = self.up(x, out_sharding=None)
        h = self.down(self.act(h, out_sharding=None), out_sharding=None)
        return self.head(self.square(h).mean(1))


X = normal(1, (4, 12, 32))


def test_written_dense_layers_are_found_split_and_the_others_as_their_own_codes_products():
    model = Block(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"up": 8, "down": 8, "square": 8,
                                                 "act/kernel": 8})
    assert result.ranks == {"up": 8, "down": 8, "square": 8, "act/kernel": 8}
    assert not result.report.skipped
    # gelu(x @ kernel + bias) is no dense layer: its product is split as its own code's
    # (lrjax.nnx_products), the bias and the activation kept as written
    assert result.problem.site("act/kernel").equation == "abc,cA->abA"
    assert isinstance(result.module.act.kernel, lrjax.nnx_surgery.LowRankEinsumNNX)
    np.testing.assert_allclose(result.module.act.bias[...], model.act.bias[...])
    assert result.problem.site("square").equation == "abc,Ac->abA"
    square = result.module.square
    assert square.vertical.kernel.shape == (32, 8) and square.horizontal.kernel.shape == (8, 32)
    up = result.module.up
    assert isinstance(up, lrjax.nnx_surgery.LowRankLinearNNX)
    assert up.vertical.kernel.shape == (32, 8) and up.horizontal.kernel.shape == (8, 96)
    assert up.kernel.shape == (32, 96)  # the replaced kernel's shape, as code may read it
    np.testing.assert_allclose(up.horizontal.bias[...], model.up.bias[...])
    assert result.module.down.horizontal.bias is None  # LLaDA's zeros: no bias variable
    # whose adds (12 rows of 32 per example) the split saves, as XLA counts them
    assert result.problem.site("down").parametrization_flops == 12 * 32
    assert result.problem.site("up").parametrization_flops == 0
    assert isinstance(result.module.act, Activated)
    # the whole-net speedup is XLA's flop ratio (the weights arguments, not folded constants)
    flops = []
    for m in (model, result.module):
        graphdef, state = nnx.split(m)
        flops.append(xla_flops(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, X))
    assert flops[0] / flops[1] == pytest.approx(result.report.speedup, rel=0.01)


@pytest.mark.parametrize("calibrated", [False, True])
def test_full_rank_written_pairs_reproduce_the_model(calibrated):
    model = Block(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"up": 32, "down": 32, "square": 32,
                                                 "act/kernel": 96},
                                 calibration=[X] if calibrated else None)
    np.testing.assert_allclose(result.module(X), model(X), rtol=1e-4, atol=1e-5)


def test_calibrated_written_factors_fit_the_data_better():
    """At a low rank, the calibrated pair's output error on the calibration data is lower."""
    model = Block(nnx.Rngs(0))
    errors = []
    for calibration in (None, [X]):
        result = lrjax.decompose_nnx(model, X, rule={"up": 6}, calibration=calibration)
        want = model.up(X, out_sharding=None)
        errors.append(float(jnp.linalg.norm(result.module.up(X, out_sharding=None) - want)))
    assert errors[1] < 0.9 * errors[0]


def test_a_written_layer_called_with_other_arguments_splits_as_its_own_codes_product():
    class Flagged(ShardedLinear):
        def __call__(self, x, scale=1.0, *, out_sharding=None):
            return super().__call__(x, out_sharding=out_sharding) * scale

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.proj = Flagged(32, 32, rngs=rngs)

        def __call__(self, x):
            return self.proj(x, 2.0)

    model = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown layers \['proj'\]; the model's decomposable "
                                         r"layers are \['proj/kernel'\]"):
        lrjax.decompose_nnx(model, X, rule={"proj": 4})
    result = lrjax.decompose_nnx(model, X, rule={"proj/kernel": 32})  # (the call's scale kept)
    np.testing.assert_allclose(result.module(X), model(X), rtol=1e-4, atol=1e-5)


def test_split_written_layers_export_to_onnx(tmp_path):
    model = Block(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule="speedup:2")
    assert {"up", "down"} & set(result.ranks) and "act/kernel" in result.ranks
    done = export.to_onnx(result.module, None, (X,), str(tmp_path / "w.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
    names = {i.name for i in onnx.load(done.path).graph.initializer}
    assert names  # the factors are stored as constants of the graph


class MeshAware(ShardedLinear):
    """As Qwen 3-VL's: its ``out_sharding`` (a ``PartitionSpec``) is used only under a mesh."""

    def __call__(self, x, *, out_sharding):
        if jax.sharding.get_abstract_mesh().empty:
            return jnp.matmul(x, self.kernel[...]) + self.bias[...]
        return jnp.matmul(x, self.kernel[...], out_sharding=out_sharding) + self.bias[...]


def test_a_partition_spec_outside_a_mesh_is_no_sharding_for_the_pair():
    """The model passes ``out_sharding=P(None, None, None)`` with no mesh, which its own layer
    ignores; the pair does the same (before: JAX's "Using PartitionSpec when you are not under a
    mesh context is not allowed")."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.proj = MeshAware(32, 32, rngs=rngs)

        def __call__(self, x):
            return self.proj(x, out_sharding=jax.sharding.PartitionSpec(None, None, None))

    model = Net(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"proj": 32})
    np.testing.assert_allclose(result.module(X), model(X), rtol=1e-4, atol=1e-5)


def test_a_zero_bias_read_inside_a_trace_is_not_an_error():
    """Inside lrjax's jitted calibration pass, LLaDA's zero bias (not a variable) is a tracer:
    whether it is zeros is not known there, which must not raise (before: the tracer's
    conversion error sent the whole calibration to eager execution, 4.6 s instead of 1.0 s)."""
    from lrjax import nnx_written

    layer = ShardedLinear(4, 4, use_bias=False, rngs=nnx.Rngs(0))
    assert nnx_written.is_written(layer, ())
    graphdef, state = nnx.split(layer)
    seen = []

    def traced(state):
        seen.append(nnx_written.is_written(nnx.merge(graphdef, state), ()))
        return 0

    jax.jit(traced)(state)
    assert seen == [False]


class Named(nnx.Module):
    """A dense layer written with parameters of other names (``w``, ``b``), as PyTorch-minded
    NNX code names them."""

    def __init__(self, i, o, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (i, o)) / np.sqrt(i))
        self.b = nnx.Param(0.1 * jax.random.normal(rngs.params(), (o,)))

    def __call__(self, x):
        return x @ self.w[...] + self.b[...]


class NamedNet(nnx.Module):
    def __init__(self, rngs):
        self.fc = Named(32, 64, rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc(x)).mean(1))


@pytest.mark.parametrize("calibrated", [False, True])
def test_written_layers_under_other_names_are_split(calibrated):
    model = NamedNet(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"fc": 32},
                                 calibration=[X] if calibrated else None)
    fc = result.module.fc
    assert fc.vertical.kernel.shape == (32, 32) and fc.horizontal.kernel.shape == (32, 64)
    np.testing.assert_allclose(fc.horizontal.bias[...], model.fc.b[...])
    np.testing.assert_allclose(result.module(X), model(X), rtol=1e-4, atol=1e-5)


class Embedder(nnx.Module):
    """An embedding table of its own: a 2-D parameter, but no dense layer."""

    def __init__(self, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (50, 32)))

    def __call__(self, tokens):
        return self.table[...][tokens]


class PositionCode(nnx.Module):
    """A learned position code, added: a 2-D parameter, no dense layer either."""

    def __init__(self, rngs):
        self.code = nnx.Param(jax.random.normal(rngs.params(), (12, 32)))

    def __call__(self, x):
        return x + self.code[...]


class Tokens(nnx.Module):
    def __init__(self, rngs):
        self.embed, self.position = Embedder(rngs), PositionCode(rngs)
        self.fc = Named(32, 64, rngs)

    def __call__(self, tokens):
        return self.fc(self.position(self.embed(tokens))).mean(1)


def test_other_modules_holding_a_2d_parameter_are_not_listed_as_layers():
    model = Tokens(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, 50)
    result = lrjax.decompose_nnx(model, tokens, rule={"fc": 16})
    assert result.ranks == {"fc": 16} and not result.report.skipped


class Einsum(nnx.Module):
    """As tunix's (its Llama 3, Qwen 2 / 3 and Gemma models): one parameter ``w`` of any
    shape, the equation and the shape kept as plain attributes."""

    def __init__(self, einsum_str, shape, rngs, bias=False):
        self.einsum_str, self.shape = einsum_str, shape
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(shape[-2]))
        self.b = nnx.Param(0.1 * jax.random.normal(rngs.params(), shape[-1:])) if bias else None

    def __call__(self, x):
        y = jnp.einsum(self.einsum_str, x, self.w[...])
        return y if self.b is None else y + self.b[...]


class GatedEinsum(Einsum):
    """An einsum then an activation: not one einsum."""

    def __call__(self, x):
        return jax.nn.silu(super().__call__(x))


class EinsumAttention(nnx.Module):
    """Grouped-query attention written with such modules: Gemma's fused key-value einsum (its
    stacking axis a kernel output axis), a head reading ``o.shape``, an output transposed by
    its equation, a per-head (batched: a batch of kernels) einsum, a biased one, one gated."""

    def __init__(self, rngs):
        self.q = Einsum("BTD,DNH->BTNH", (32, 4, 8), rngs)
        self.kv = Einsum("BSD,CKDH->CBSKH", (2, 2, 32, 8), rngs)
        self.o = Einsum("BTNH,NHD->BTD", (4, 8, 32), rngs)
        self.per_head = Einsum("BTNH,NHG->BTNG", (4, 8, 8), rngs)
        self.up = Einsum("BTD,DF->BTF", (32, 48), rngs, bias=True)
        self.gated = GatedEinsum("BTF,FD->BTD", (48, 32), rngs)
        self.head = Einsum("BTD,DV->BVT", (32, 10), rngs)

    def __call__(self, x):
        q, (k, v) = self.q(x), self.kv(x)
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        head_dim = self.o.shape[1]  # model code reading its layer's attribute, as tunix's does
        a = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(head_dim), axis=-1)
        x = x + self.o(self.per_head(jnp.einsum("BNTS,BSNH->BTNH", a, v)))
        return self.head(x + self.gated(jax.nn.gelu(self.up(x))))


SPLIT_EINSUMS = {"q": "BTD,DNH->BTNH", "kv": "BSD,CKDH->CBSKH", "o": "BTNH,NHD->BTD",
                 "per_head": "BTNH,NHG->BTNG", "up": "BTD,DF->BTF", "head": "BTD,DV->BVT"}


@pytest.mark.parametrize("calibrated", [pytest.param(False, marks=pytest.mark.slow), True])
def test_written_einsums_are_split_as_nnx_einsums(calibrated):
    model = EinsumAttention(nnx.Rngs(0))
    full = {"q": 32, "kv": 32, "o": 32, "per_head": 4 * 8, "up": 32, "head": 10, "gated/w": 32}
    result = lrjax.decompose_nnx(model, X, rule=full, calibration=[X] if calibrated else None)
    assert set(result.ranks) == set(SPLIT_EINSUMS) | {"gated/w"}
    # the equations read from the traced calls (the data's axes a, b, ..., the kernel's A, B,
    # ...): each its layer's, the head's transposed output included
    equations = {p: result.problem.site(p).equation for p in SPLIT_EINSUMS}
    assert equations.pop("up") is None  # a dense layer: x @ kernel + bias
    assert equations == {"q": "abc,cAB->abAB", "kv": "abc,ABcC->AabBC", "o": "abcd,cdA->abA",
                         "per_head": "abcd,cdA->abcA", "head": "abc,cA->aAb"}
    per_head = result.problem.site("per_head")  # a batch of 4 kernels (8, 8), one per head
    assert (per_head.batched, per_head.stack, per_head.stack_axis) == (True, 4, 0)
    # silu(einsum): no einsum layer, its product split as its own code's (lrjax.nnx_products)
    assert not result.report.skipped and result.problem.site("gated/w").equation == "abc,cA->abA"
    np.testing.assert_allclose(result.module(X), model(X), rtol=1e-4, atol=1e-5)
    kv = result.module.kv
    assert isinstance(kv, lrjax.nnx_surgery.LowRankEinsumNNX)
    assert kv.vertical.kernel.shape == (32, 32) and kv.horizontal.kernel.shape == (32, 2, 2, 8)
    assert result.module.o.shape == (4, 8, 32)  # the layer's plain attributes, kept
    np.testing.assert_allclose(result.module.up.horizontal.bias[...], model.up.b[...])


def test_written_einsums_whole_net_cost_and_export(tmp_path):
    model = EinsumAttention(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule="speedup:1.3", calibration=[X])
    assert set(result.ranks) <= set(SPLIT_EINSUMS) | {"gated/w"} and len(result.ranks) >= 2
    flops = []
    for m in (model, result.module):
        graphdef, state = nnx.split(m)
        flops.append(lowered_flops(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, X))
    assert flops[0] / flops[1] == pytest.approx(result.report.speedup, rel=1e-6)
    done = export.to_onnx(result.module, None, (X,), str(tmp_path / "e.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale


class ScaledEinsum(Einsum):
    """As tunix's Gemma 4 ``Einsum(w_scale=...)``: the kernel scaled by a constant and cast,
    then one einsum."""

    def __call__(self, x):
        w = jnp.astype(self.w[...] * (self.shape[0] ** -0.5), jnp.float32)
        return jnp.einsum(self.einsum_str, x, w)


class Projected(nnx.Module):
    def __init__(self, rngs):
        self.proj = ScaledEinsum("BTD,DNH->BTNH", (32, 4, 16), rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.gelu(self.proj(x)).reshape(*x.shape[:2], 64))


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_written_einsum_of_a_scaled_kernel_is_split_on_the_kernel_it_uses(calibrated):
    """The pair factors the kernel as the code uses it (scaled); the scaling, which the model
    computes on every call, is saved in the whole net's cost, as XLA counts it."""
    model = Projected(nnx.Rngs(0))
    calibration = [X] if calibrated else None
    full = lrjax.decompose_nnx(model, X, rule={"proj": 32}, calibration=calibration)
    np.testing.assert_allclose(full.module(X), model(X), rtol=1e-4, atol=1e-5)
    site = full.problem.site("proj")
    assert site.equation == "abc,cAB->abAB" and site.parametrization is not None
    assert site.parametrization_flops > 0
    low = lrjax.decompose_nnx(model, X, rule={"proj": 8}, calibration=calibration)
    flops = [lowered_flops(lambda s, x, g=g: nnx.merge(g, s)(x), s, X)
             for g, s in (nnx.split(m) for m in (model, low.module))]
    assert flops[0] / flops[1] == pytest.approx(low.report.speedup, rel=1e-6)


class ScannedBlocks(nnx.Module):
    """Written dense layers in blocks made by ``nnx.vmap`` and run by ``nnx.scan`` (Flax's
    ``06_scan_over_layers`` with a hand-written layer): a stack of 3, kernel ``(3, 32, 32)``,
    bias ``(3, 32)``."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(axis_size=3)
        def block(rngs):
            return Named(32, 32, rngs)

        self.blocks, self.head = block(rngs), nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        @nnx.scan
        def step(x, layer):
            return jax.nn.gelu(layer(x)), None

        return self.head(step(x, self.blocks)[0].mean(1))


@pytest.mark.parametrize("calibrated", [False, True])
def test_stacked_written_layers_are_split_per_iteration(calibrated):
    model = ScannedBlocks(nnx.Rngs(0))
    calibration = [X] if calibrated else None
    full = lrjax.decompose_nnx(model, X, rule={"blocks": 96}, calibration=calibration)
    assert full.problem.site("blocks").stack == 3
    np.testing.assert_allclose(full.module(X), model(X), rtol=1e-4, atol=1e-5)
    low = lrjax.decompose_nnx(model, X, rule={"blocks": 24}, calibration=calibration)
    blocks = low.module.blocks
    assert blocks.vertical.kernel.shape == (3, 32, 8) and blocks.horizontal.kernel.shape == (3, 8, 32)
    np.testing.assert_allclose(blocks.horizontal.bias[...], model.blocks.b[...])


class PositionBiased(nnx.Module):
    """An einsum plus a bias per position (``(tokens, N * H)``): no ``nnx.Einsum`` computes it
    (its bias is not the kernel's output axes); its product is split as its own code's, its
    bias added as written."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (32, 4, 8)) / np.sqrt(32))
        self.b = nnx.Param(jax.random.normal(rngs.params(), (12, 32)))

    def __call__(self, x):
        return jnp.einsum("btd,dnh->btnh", x, self.w[...]) + self.b[...].reshape(12, 4, 8)


def test_a_written_einsum_with_a_bias_no_einsum_layer_takes_splits_its_product():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.proj, self.head = PositionBiased(rngs), nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            return self.head(self.proj(x).reshape(*x.shape[:2], 32))

    model = Net(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"head": 4, "proj/w": 32})
    assert result.ranks == {"head": 4, "proj/w": 32} and not result.report.skipped
    np.testing.assert_allclose(result.module.proj(X), model.proj(X), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.module.proj.b[...], model.proj.b[...])


def test_a_written_layer_whose_kernel_is_read_elsewhere_is_kept():
    """A tied output product reading a written layer's kernel under its own name
    (``h @ self.proj.w[...].T``): splitting the layer would remove ``w`` (before: the rank was
    taken, and the decomposed model failed when called, no attribute 'w')."""
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.proj = Einsum("BTD,DV->BTV", (32, 48), rngs)
            self.mid = nnx.Linear(48, 48, rngs=rngs)

        def __call__(self, x):
            return self.mid(self.proj(x)) @ self.proj.w[...].T

    model = Tied(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule="speedup:1.2")
    assert "proj" not in result.ranks and "proj" in result.report.skipped
    assert "outside the layer's own call" in result.report.skipped["proj"]
    assert result.module(X).shape == model(X).shape
    with pytest.raises(ValueError, match=r"layer 'proj' cannot be decomposed: its kernel is also "
                                         r"multiplied into the data outside"):
        lrjax.decompose_nnx(model, X, rule={"proj": 8})


@pytest.mark.parametrize("net, rule", [(EinsumAttention, {"q": 8, "kv": 8, "o": 8, "head": 4}),
                                       (Projected, {"proj": 8}),
                                       (ScannedBlocks, {"blocks": 24})])
def test_split_written_einsums_save_and_load(net, rule, tmp_path):
    """A decomposed model with written einsums (scaled, stacked) rebuilt in another process's
    way: on a fresh instance of the model, from the saved folder."""
    result = lrjax.decompose_nnx(net(nnx.Rngs(0)), X, rule=rule)
    path = lrjax.save_decomposed(str(tmp_path / "m"), result)
    loaded = lrjax.load_decomposed(path, net(nnx.Rngs(1)), X)
    np.testing.assert_allclose(loaded(X), result.module(X), rtol=1e-6, atol=1e-6)
