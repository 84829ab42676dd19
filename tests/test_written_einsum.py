"""Einsums written by hand (:mod:`lrjax.written_products`), as google-deepmind/gemma writes its
layers: one ``Einsum`` module holding a parameter ``w`` and called with the equation,
``jnp.einsum(eqn, x, w)``, whose kernel axes are contracted in any position (``'BTD,NDH->BTNH'``:
the middle one) and whose output may be reordered (``'BSD,CKDH->CBSKH'``); a feed-forward
whose two einsums share its scope (``nn.share_scope``: their kernels are its variables
``gating_einsum`` and ``linear``); the model's ``__call__`` under ``nn.jit``. A kernel
transposed on its way (PyTorch's layout) is a dense layer too; a batch of per-head kernels
(block-diagonal) is an ``nn.Einsum`` with a batch letter, each head's matrix split; a module
sharing its scope with a Flax layer it runs (the Flax docs' LoRA) runs as written."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import linen_cells, surgery
from tests.helpers import init, whole_net_rule


class Einsum(nn.Module):
    """Gemma's ``_layers.Einsum``: the equation is the call's first argument."""
    shape: tuple
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param(self.weight_name, nn.initializers.normal(0.2), self.shape)
        return jnp.einsum(eqn, x, w)


class FeedForward(nn.Module):
    """Gemma's: both einsums in this module's own scope."""
    features: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        gating = Einsum((2, self.features, self.hidden), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        gate = gating("...F,NFH->...NH", x)
        linear = Einsum((self.hidden, self.features), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", nn.gelu(gate[..., 0, :]) * gate[..., 1, :])


class PerHead(nn.Module):
    """One kernel per head (block-diagonal): an ``nn.Einsum`` with a batch letter."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.2), (x.shape[-2], x.shape[-1], x.shape[-1]))
        return jnp.einsum("BTHi,Hij->BTHj", x, w)


class Block(nn.Module):
    def setup(self):
        self.q_einsum = Einsum((4, 32, 8))
        self.kv_einsum = Einsum((2, 4, 32, 8))
        self.per_head = PerHead()
        self.attn_vec_einsum = Einsum((4, 8, 32))
        self.mlp = FeedForward(32, 64)

    def __call__(self, x):
        q = self.q_einsum("BTD,NDH->BTNH", x)
        k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        probs = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BTNS", q, k) / 8.0)
        encoded = self.per_head(jnp.einsum("BTNS,BSNH->BTNH", probs, v))
        x = x + self.attn_vec_einsum("BTNH,NHD->BTD", encoded)
        return x + self.mlp(x)


class Transformer(nn.Module):
    """Gemma's ``Transformer.__call__`` is ``nn.jit``-ed."""

    def setup(self):
        self.blocks = [Block(name=f"layer_{i}") for i in range(2)]

    @functools.partial(nn.jit, static_argnames=("self",))
    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


X = jax.random.normal(jax.random.key(0), (2, 6, 32))
SPLIT = {f"layer_{i}/{name}": shape for i in range(2) for name, shape in (
    ("q_einsum", ((32,), (4, 8))), ("kv_einsum", ((32,), (2, 4, 8))),
    ("attn_vec_einsum", ((4, 8), (32,))), ("mlp/gating_einsum", ((32,), (2, 64))),
    ("mlp/linear", ((64,), (32,))), ("per_head", ((8,), (8,))))}


@pytest.fixture(scope="module")
def net():
    model = Transformer()
    return model, init(model, 1, X)


def test_gemma_einsums_are_found_named_by_their_kernels_and_init_as_written(net):
    model, variables = net
    found = {s.path: s for s in surgery.find_convs(model, X)}
    assert {p: s.dense_dims for p, s in found.items() if s.candidate} == SPLIT
    per_head = found["layer_0/per_head"]  # a batch of 4 kernels (8, 8), one per head
    assert (per_head.batched, per_head.stack, per_head.stack_axis) == (True, 4, 0)
    gating = found["layer_1/mlp/gating_einsum"]
    assert gating.named_by_kernel and gating.kernel_key == ("layer_1", "mlp", "gating_einsum")
    assert found["layer_1/q_einsum"].kernel_key == ("layer_1", "q_einsum", "w")
    with linen_cells.as_sublayers():  # the model's own variables, from the same keys
        jax.tree.map(np.testing.assert_array_equal, init(model, 1, X), variables)


def test_full_rank_pairs_replace_the_kernels_in_place(net):
    model, variables = net
    full = {p: min(int(np.prod(c)), int(np.prod(n))) * (4 if "per_head" in p else 1)
            for p, (c, n) in SPLIT.items()}
    result = lrjax.decompose_linen(model, variables, X, rule=full)
    shapes = jax.tree.map(jnp.shape, result.variables["params"]["layer_0"])
    assert shapes["per_head"] == {"vertical": {"kernel": (4, 8, 8)},
                                  "horizontal": {"kernel": (4, 8, 8)}}
    assert shapes["mlp"] == {
        "gating_einsum": {"vertical": {"kernel": (32, 32)}, "horizontal": {"kernel": (32, 2, 64)}},
        "linear": {"vertical": {"kernel": (64, 32)}, "horizontal": {"kernel": (32, 32)}}}
    assert shapes["q_einsum"] == {"vertical": {"kernel": (32, 32)},
                                  "horizontal": {"kernel": (32, 4, 8)}}
    np.testing.assert_allclose(result.module.apply(result.variables, X),
                               model.apply(variables, X), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_whole_net_rule_is_xlas_ratio_calibrated_exported_and_saved(net, tmp_path):
    model, variables = net
    calibration = jax.random.normal(jax.random.key(2), (8, 6, 32))
    for result in whole_net_rule(model, variables, X, "speedup:1.5", calibration, tmp_path)[:2]:
        assert {p.rsplit("/", 1)[-1] for p in result.ranks} >= {"gating_einsum", "attn_vec_einsum"}
        assert "left as is" not in result.report.table()  # the per-head kernels: a layer


def test_a_jitted_model_keeps_its_cached_trace_outside_lrjax(net):
    """Under lrjax every ``nn.jit``-ed call is traced again (its cache knows no interceptor);
    outside, the user's model caches as before."""
    model, variables = net
    lrjax.decompose_linen(model, variables, X, rule="speedup:1.5")
    proxy = nn.transforms._HashableProxy
    assert proxy.from_module(model).hash_key == proxy.from_module(model).hash_key


class TorchLinear(nn.Module):
    """A kernel stored in PyTorch's ``(out, in)`` layout, transposed in the call among other
    work: a dense layer of the transposed kernel."""
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(0.2), (self.features, x.shape[-1]))
        b = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return jax.nn.relu(x @ w.T + b)


class DenseLoRA(nn.Module):
    """The Flax docs' ``nn.share_scope`` example: a Dense and its adapters in one scope; the
    adapters' products run as written (the module runs another module)."""

    def setup(self):
        self.child = nn.Dense(24)
        nn.share_scope(self, self.child)

    @nn.compact
    def __call__(self, x):
        a = self.param("A", nn.initializers.normal(0.1), (x.shape[-1], 2))
        b = self.param("B", nn.initializers.normal(0.1), (2, 24))
        return self.child(x) + x @ a @ b


class Adapted(nn.Module):
    @nn.compact
    def __call__(self, x):
        return DenseLoRA(name="lora")(TorchLinear(24, name="torch")(x))


def test_a_transposed_kernel_splits_and_a_module_running_others_runs_as_written():
    x, model = jax.random.normal(jax.random.key(3), (4, 24)), Adapted()
    variables = init(model, 0, x)
    found = {s.path: s for s in surgery.find_convs(model, x)}
    assert found["torch"].candidate and found["torch"].kernel_name == "weight"
    assert found["lora"].candidate and not found["lora"].written  # the Dense itself
    full = lrjax.decompose_linen(model, variables, x, rule={"torch": 24, "lora": 24})
    np.testing.assert_allclose(full.module.apply(full.variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    pair = full.variables["params"]["torch"]
    np.testing.assert_allclose(pair["vertical"]["kernel"] @ pair["horizontal"]["kernel"],
                               variables["params"]["torch"]["weight"].T, rtol=1e-4, atol=1e-5)
    assert set(full.variables["params"]["lora"]) == {"A", "B", "vertical", "horizontal"}


class RelativeBias(nn.Module):
    """t5x's ``RelativePositionBiases``: its table contracted with a one-hot of bucketed
    positions built from the call's integers (a gather written as a product): a lookup."""

    @nn.compact
    def __call__(self, qlen, klen):
        table = self.param("rel_embedding", nn.initializers.normal(0.2), (4, 8))
        buckets = jnp.clip(jnp.arange(klen)[None] - jnp.arange(qlen)[:, None], -4, 3) + 4
        one_hot = (buckets[None] == jnp.arange(8)[:, None, None]).astype(jnp.float32)
        return jax.lax.dot_general(table, one_hot, (((1,), (0,)), ((), ())))


class Biased(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        bias = RelativeBias(name="relpos")(x.shape[1], x.shape[1])
        return x + jnp.einsum("hqk,bkd->bqd", jax.nn.softmax(bias), x)


def test_a_parameter_contracted_with_no_input_is_a_lookup_not_a_layer():
    x, model = jax.random.normal(jax.random.key(3), (2, 6, 16)), Biased()
    variables = init(model, 0, x)
    assert [s.path for s in surgery.find_convs(model, x)] == ["Dense_0"]
    result = lrjax.decompose_linen(model, variables, x, rule={"Dense_0": 4})
    assert "relpos" in result.report.skipped


class SetupEinsum(nn.Module):
    """google-deepmind/recurrentgemma's ``layers.Einsum``: ``w`` and ``b`` declared in
    ``setup``, the equation a field (its MLP's ``'...td,cdD->c...tD'``: a reordered output)."""
    w_shape: tuple
    b_shape: tuple
    eqn: str

    def setup(self):
        self.w = self.param("w", nn.initializers.normal(0.2), self.w_shape)
        self.b = self.param("b", nn.initializers.normal(0.1), self.b_shape)

    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.w) + self.b


class GriffinMLP(nn.Module):
    def setup(self):
        self.ffw_up = SetupEinsum((2, 16, 48), (2, 1, 1, 48), "...td,cdD->c...tD")
        self.ffw_down = nn.Dense(16)

    def __call__(self, x):
        gate, up = self.ffw_up(x)
        return self.ffw_down(nn.gelu(gate) * up)


def test_a_setup_parameter_under_another_name_splits_its_bias_stays():
    x, model = jax.random.normal(jax.random.key(3), (2, 6, 16)), GriffinMLP()
    variables = init(model, 0, x)
    found = {s.path: s for s in surgery.find_convs(model, x)}
    assert found["ffw_up"].kernel_name == "w" and found["ffw_up"].dense_dims == ((16,), (2, 48))
    with linen_cells.as_sublayers():  # the model's own variables, from the same keys
        jax.tree.map(np.testing.assert_array_equal, init(model, 0, x), variables)
    full = lrjax.decompose_linen(model, variables, x, rule={"ffw_up": 16})
    assert jax.tree.map(jnp.shape, full.variables["params"]["ffw_up"]) == {
        "b": (2, 1, 1, 48), "vertical": {"kernel": (16, 16)}, "horizontal": {"kernel": (16, 2, 48)}}
    np.testing.assert_allclose(full.module.apply(full.variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5", calibration=x * 2)
    lowered = [jax.jit(m.apply).lower(v, x).cost_analysis()["flops"]
               for m, v in ((model, variables), (result.module, result.variables))]
    assert result.report.speedup == pytest.approx(lowered[0] / lowered[1], rel=1e-6)


class OneHotEmbed(nn.Module):
    """t5x's ``Embed``: its table declared in ``setup``, looked up as a one-hot product (a
    dense layer of the token ids' one-hot vectors), and read by ``attend`` for tied logits."""
    tied: bool

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(1.0), (32, 16))

    def __call__(self, ids):
        return (ids[..., None] == jnp.arange(32)).astype(jnp.float32) @ self.embedding

    def attend(self, query):
        return query @ self.embedding.T


class TiedLM(nn.Module):
    tied: bool

    def setup(self):
        self.embedder = OneHotEmbed(self.tied)
        self.hidden = nn.Dense(16)
        self.logits = nn.Dense(32)

    def __call__(self, ids):
        x = jnp.tanh(self.hidden(self.embedder(ids)))
        return self.embedder.attend(x) if self.tied else self.logits(x)


@pytest.mark.parametrize("tied", [False, True])
def test_a_table_its_module_also_reads_in_another_method_is_kept(tied):
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
    model = TiedLM(tied)
    variables = init(model, 0, ids)
    found = {s.path: s for s in surgery.find_convs(model, ids)}
    assert found["embedder"].candidate is not tied  # (a one-hot product: a dense layer)
    if tied:
        assert "method 'attend' runs too" in found["embedder"].skip
    if tied:
        with pytest.raises(ValueError, match="'embedder' cannot be decomposed: .* 'attend'"):
            lrjax.decompose_linen(model, variables, ids, rule={"embedder": 4})
    result = lrjax.decompose_linen(model, variables, ids, rule="speedup:1.2" if tied else {
        "embedder": 4, "hidden": 4})
    assert ("embedder" in result.ranks) is not tied
    lowered = [jax.jit(m.apply).lower(v, ids).cost_analysis()["flops"]
               for m, v in ((model, variables), (result.module, result.variables))]
    assert result.report.speedup == pytest.approx(lowered[0] / lowered[1], rel=1e-6)


class ScanBlock(Block):
    def __call__(self, x, _):
        return super().__call__(x), None


class Scanned(nn.Module):
    """The blocks stacked by ``nn.scan`` (big_vision's Gemma with ``scan=True``): each einsum's
    kernel has the iterations first, ``(3, 4, 32, 8)``."""

    @nn.compact
    def __call__(self, x):
        return nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="layers")(x, None)[0]


@pytest.mark.slow  # 6 s: a scan's written layers, split and calibrated (the scanned Flax layers'
# split per iteration: test_rules.py, the default run)
def test_written_einsums_stacked_by_scan_split_per_iteration():
    """A written layer whose code reorders its kernel's axes (its re-parametrization) was left
    as it is once stacked by ``nn.scan`` ("stacked layers are left as they are"): each
    iteration's kernel is now read as its code reads it, factored in its own closed form
    (calibrated on its own inputs: each iteration's statistics are told apart by its kernel
    variable, under its own name), exact at full rank."""
    model = Scanned()
    variables = init(model, 1, X)
    found = {s.path: s for s in surgery.find_convs(model, X) if s.candidate}
    assert {p: s.stack for p, s in found.items()} == {f"layers/{n}": 3 for n in (
        "q_einsum", "kv_einsum", "attn_vec_einsum", "mlp/gating_einsum", "mlp/linear")}
    full = lrjax.decompose_linen(model, variables, X, rule={
        p: 3 * min(s.shape.in_channels, s.shape.out_channels) // 3 for p, s in found.items()})
    want = model.apply(variables, X)
    np.testing.assert_allclose(full.module.apply(full.variables, X), want,
                               atol=1e-5 * float(jnp.abs(want).max()))
    calib = jax.random.normal(jax.random.key(7), (16, 6, 32)) * jnp.linspace(0.01, 0.3, 32)
    ranks = {p: 3 * 8 for p in found}
    errors = []
    for calibration in (None, calib):
        split = lrjax.decompose_linen(model, variables, X, rule=ranks, calibration=calibration)
        got, wanted = split.module.apply(split.variables, calib), model.apply(variables, calib)
        errors.append(float(jnp.linalg.norm(got - wanted) / jnp.linalg.norm(wanted)))
    assert errors[1] < 0.8 * errors[0]
