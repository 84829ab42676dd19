"""A mixture of experts' products in a module's own code, each expert's matrix split in the
closed form and calibrated on its own tokens:

* computed by ``lax.ragged_dot`` (:mod:`lrjax.ragged`): the form of Gemma 4's ``MoERagged`` as
  google/tunix ports it to NNX (its ``(E, 2, H, F)`` gating kernel transposed and reshaped to
  ``(E, F, 2H)``, tokens sorted by expert, ``group_sizes`` the tokens per expert), costed as
  XLA:CPU computes a ragged product (the report equals XLA's ratio);
* computed in a loop over the experts, ``x_i @ w[i]`` (tunix's Qwen 3 ``MoELayer`` off a mesh),
  in NNX or linen: the pieces of each parameter one einsum of their data stacked
  (:attr:`lrjax.written_products.Product.stacked`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import export, macs, ragged
from tests.helpers import apply, init, lowered_flops, normal

E, F, H, TOP = 4, 32, 24, 2


def _normal(rngs, shape, fan_in):
    return nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(fan_in))


class MoERagged(nnx.Module):
    """Top-2 routing, tokens sorted by expert, two ragged products (tunix's form)."""

    def __init__(self, rngs, scale: float | None = None, dtype=None):
        self.router = _normal(rngs, (F, E), F)
        self.gating = nnx.Param(_normal(rngs, (E, 2, H, F), F)[...],  # (tunix's names)
                                sharding=("expert", None, None, "model"), eager_sharding=False)
        self.linear = _normal(rngs, (E, H, F), H)
        self.per_expert_scale = nnx.Param(jnp.linspace(0.5, 1.5, E))
        self.scale, self.dtype = scale, dtype

    def __call__(self, x):
        tokens = x.reshape(-1, F)
        weights, choices = jax.lax.top_k(jax.nn.softmax(tokens @ self.router), TOP)
        order = choices.ravel().argsort()
        sorted_x = tokens[jnp.repeat(jnp.arange(tokens.shape[0]), TOP)[order]]
        sizes = jnp.sum(jax.nn.one_hot(choices, E, dtype=jnp.int32), axis=(0, 1))
        w = jnp.transpose(self.gating[...], (0, 3, 1, 2)).reshape(E, F, 2 * H)
        if self.scale is not None:  # (a kernel scaled on its way: not a layout step)
            w = w * self.scale
        linear = self.linear[...]
        if self.dtype is not None:  # mixed precision: data and kernels cast to compute
            sorted_x, w, linear = (a.astype(self.dtype) for a in (sorted_x, w, linear))
        gate = jax.lax.ragged_dot(sorted_x, w, sizes).reshape(-1, 2, H)
        h = jax.nn.gelu(gate[:, 0]) * gate[:, 1]
        out = jax.lax.ragged_dot(h, linear, sizes).astype(x.dtype)
        out = out * self.per_expert_scale[jnp.repeat(jnp.arange(E), sizes,
                                                     total_repeat_length=out.shape[0])][:, None]
        out = out[order.argsort()].reshape(tokens.shape[0], TOP, F)
        return jnp.einsum("tkf,tk->tf", out, weights).reshape(x.shape)


class Block(nnx.Module):
    def __init__(self, rngs, scale=None, dtype=None):
        self.proj_in = nnx.Linear(F, F, rngs=rngs)
        self.moe = MoERagged(rngs, scale, dtype)
        self.proj_out = nnx.Linear(F, F, rngs=rngs)

    def __call__(self, x):
        h = self.proj_in(x)
        return self.proj_out(h + self.moe(h))


X = normal(1, (2, 8, F))
HELD_OUT = normal(2, (8, 8, F))


def _flops(model):
    graphdef, state = nnx.split(model)
    return lowered_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, X)


def test_the_experts_are_found_as_batches_of_kernels_through_their_layout_steps():
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(Block(nnx.Rngs(0)), X)}
    assert {"proj_in", "moe/router", "moe/gating", "moe/linear", "proj_out"} == set(found)
    for path, (c, n) in {"moe/gating": (F, 2 * H), "moe/linear": (H, F)}.items():
        site = found[path]
        assert site.candidate and site.batched and site.stack == E, path
        assert site.equation == ragged.EQUATION and site.written_spec[0] == "ragged"
        assert site.shape.kernel_shape == (1, 1, c, E * n)  # (each expert a group)
    assert found["moe/gating"].written_spec[1] == (("transpose", (0, 3, 1, 2)),
                                                   ("reshape", (E, F, 2 * H)))


def test_full_rank_pairs_reproduce_the_model_in_the_parameters_places():
    model = Block(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"moe/gating": E * F, "moe/linear": E * H})
    np.testing.assert_allclose(result.module(HELD_OUT), model(HELD_OUT), rtol=1e-4, atol=2e-5)
    shapes = {"/".join(map(str, p)): v.shape
              for p, v in nnx.to_flat_state(nnx.state(result.module.moe))}
    assert shapes == {"gating/vertical/kernel": (E, F, F), "gating/horizontal/kernel": (E, F, 2 * H),
                      "linear/vertical/kernel": (E, H, H), "linear/horizontal/kernel": (E, H, F),
                      "router": (F, E), "per_expert_scale": (E,)}
    assert isinstance(model.moe.gating, nnx.Param)  # the user's model untouched
    names = [k.get_metadata()["out_sharding"] for k in (result.module.moe.gating.vertical.kernel,
                                                        result.module.moe.gating.horizontal.kernel)]
    assert names == [("expert", "model", None), ("expert", None, None)]  # (E, F, K), (E, K, 2H)


@pytest.mark.slow
def test_a_whole_net_rule_is_xlas_ratio_calibrated_per_expert_trained_exported_saved(tmp_path):
    model = Block(nnx.Rngs(0))
    want = model(HELD_OUT)
    data_free = lrjax.decompose_nnx(model, X, rule="speedup:1.5")
    assert {"moe/gating", "moe/linear"} & set(data_free.ranks)
    # the pairs' second products mask their input by group on CPU too: in the report's cost;
    # not their group offsets (a cumulative sum, E (E - 1) flops a call): 3e-5 of this net's
    assert _flops(model) / _flops(data_free.module) == pytest.approx(data_free.report.speedup,
                                                                     rel=1e-4)
    calibrated = lrjax.decompose_nnx(model, X, rule=dict(data_free.ranks), calibration=[HELD_OUT])
    errors = [float(jnp.linalg.norm(r.module(HELD_OUT) - want)) for r in (data_free, calibrated)]
    assert errors[1] < errors[0]
    pairs = calibrated.module
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(pairs, X), pairs(X), rtol=1e-5,
                               atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(pairs)
    assert float(jnp.abs(grads.moe.gating.vertical.kernel[...]).sum()) > 0
    done = export.to_onnx(pairs, None, (X,), str(tmp_path / "m.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
    path = lrjax.save_decomposed(str(tmp_path / "saved"), calibrated)
    loaded = lrjax.load_decomposed(path, Block(nnx.Rngs(1)), X)
    np.testing.assert_allclose(loaded(X), pairs(X), rtol=1e-6, atol=1e-6)


def test_a_scaled_expert_kernel_stays_its_own_code_listed():
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(Block(nnx.Rngs(0), 0.5), X)}
    assert found["moe/linear"].candidate
    assert "moe/gating" not in found or not found["moe/gating"].candidate
    report = lrjax.decompose_nnx(Block(nnx.Rngs(0), 0.5), X, rule="speedup:1.2").report
    assert "moe" in " ".join(report.skipped)  # its own code's products, named


def test_a_ragged_product_is_costed_as_xla_counts_it_and_dispatched_by_group():
    x, w = jnp.ones((10, 6)), jnp.ones((3, 6, 5))
    sizes = jnp.array([4, 0, 5], jnp.int32)  # one row past the groups' total
    counts = macs.traced_macs(lambda x, w, s: jax.lax.ragged_dot(x, w, s), x, w, sizes)
    assert counts["dot"] == 3 * 10 * 6 * 5
    assert 2 * counts["dot"] + counts["elementwise"] == lowered_flops(
        jax.lax.ragged_dot, x, w, sizes)
    rows = ragged.dispatched(jnp.arange(10.0)[:, None], sizes, 3)[..., 0]
    np.testing.assert_array_equal(rows, [[0, 1, 2, 3, 0, 0, 0, 0, 0, 0], [0] * 10,
                                         [0, 0, 0, 0, 4, 5, 6, 7, 8, 0]])
    # the moments of the buffer, taken one group at a time without it
    site = ragged.site("moe", ragged.RaggedDot(nnx.Param(w)), (3, 10, 6))
    x = jax.random.normal(jax.random.key(0), (10, 6))
    want = lrjax.sites.input_moments(site, ragged.dispatched(x, sizes, 3), (-1,))
    got = ragged.grouped_moments(ragged.Grouped(x, sizes, 3), site, (-1,))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ragged.used_names(("e", None, "h", "f"), (("transpose", (0, 3, 1, 2)),
                                                     ("reshape", (3, 6, 10))), (3, 2, 5, 6)) == \
        ("e", "f", None)
    assert ragged.used_names(("e", "f"), (), (3, 6, 5)) == (None, None, None)  # another rank


class MoELoop(nnx.Module):
    """Experts in a loop, each on the tokens dispatched to it (zeros elsewhere), as tunix's
    Qwen 3 ``MoELayer`` computes them off a mesh; the down projection's data is the gate's and
    up's pieces' products."""

    def __init__(self, rngs, dtype=jnp.float32):
        self.router = nnx.Linear(F, E, use_bias=False, rngs=rngs)
        self.gate, self.up = (_normal(rngs, (E, F, H), F) for _ in range(2))
        self.down = _normal(rngs, (E, H, F), H)
        self.dtype = dtype

    def __call__(self, x):
        weights, choices = jax.lax.top_k(jax.nn.softmax(self.router(x)), TOP)
        mask = jnp.swapaxes(jax.nn.one_hot(choices, E), -1, -2)  # (B, T, E, TOP)
        dispatched = jnp.einsum("btd,btek->bted", x, mask).astype(self.dtype)
        outs = []
        for i in range(E):  # (tunix's: each expert's kernels cast to the compute dtype)
            xi = dispatched[:, :, i, :]
            gate, up, down = (w[i].astype(self.dtype) for w in (self.gate, self.up, self.down))
            h = jax.nn.silu(jnp.einsum("btd,df->btf", xi, gate)) * jnp.einsum(
                "btd,df->btf", xi, up)
            outs.append(jnp.einsum("btf,fd->btd", h, down).astype(x.dtype))
        return jnp.einsum("bted,btek,btk->btd", jnp.stack(outs, 2), mask, weights)


class Chained(nnx.Module):
    """Pieces whose data is the previous piece's product: one after the other, no stack."""

    def __init__(self, rngs):
        self.w = _normal(rngs, (3, F, F), F)

    def __call__(self, x):
        for i in range(3):
            x = jnp.tanh(x @ self.w[i])
        return x


class LoopBlock(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.proj_in = nnx.Linear(F, F, rngs=rngs)
        self.moe = MoELoop(rngs, dtype)
        self.chained = Chained(rngs)

    def __call__(self, x):
        h = self.proj_in(x)
        return self.chained(h + self.moe(h))


@pytest.mark.slow  # 4 s on the 2-core machine: the default run stays under 5 minutes
def test_experts_in_a_loop_are_one_einsum_of_their_stacked_data_each():
    model = LoopBlock(nnx.Rngs(0))
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(model, X)}
    for name in ("gate", "up", "down"):
        site = found[f"moe/{name}"]
        assert site.candidate and site.batched and site.stack == E
        assert site.equation == "Babc,BcA->BabA"  # (the pieces' data stacked first)
    assert not any(p.startswith("chained") for p in found)  # its own code
    rule = {"moe/gate": E * H, "moe/up": E * H, "moe/down": E * H}  # (full: min(F, H) each)
    full = lrjax.decompose_nnx(model, X, rule=rule)
    np.testing.assert_allclose(full.module(HELD_OUT), model(HELD_OUT), rtol=1e-4, atol=2e-5)
    assert full.module.moe.down.vertical.kernel.shape == (E, H, H)
    data_free = lrjax.decompose_nnx(model, X, rule="speedup:1.5")
    assert _flops(model) / _flops(data_free.module) == pytest.approx(data_free.report.speedup,
                                                                     rel=1e-6)
    experts = {p: r for p, r in data_free.ranks.items() if p.startswith("moe/")}
    assert experts
    inputs = model.proj_in(HELD_OUT)  # (what the experts' module is given in the model)
    want = model.moe(inputs)
    errors = [float(jnp.linalg.norm(lrjax.decompose_nnx(
        model, X, rule=experts, calibration=c).module.moe(inputs) - want))
        for c in (None, [HELD_OUT])]
    assert errors[1] < 0.8 * errors[0]


@pytest.mark.parametrize("block", [Block, LoopBlock])
def test_experts_cast_to_bfloat16_in_the_call_compute_so_split(block):
    """Mixed precision (float32 parameters, each kernel cast to bfloat16 where it is used, as
    tunix casts to its config's dtype): the layer computes in bfloat16, its pair too, and
    the casts' work is in the whole net's cost."""
    model = block(nnx.Rngs(0), dtype=jnp.bfloat16)
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(model, X)}
    experts = [s for p, s in found.items() if p.startswith("moe/") and s.batched]
    assert len(experts) == (2 if block is Block else 3)
    assert all(s.candidate and s.param_cast_flops > 0 for s in experts)  # (per example)
    result = lrjax.decompose_nnx(model, X, rule="speedup:1.3")
    assert any(p.startswith("moe/") for p in result.ranks)
    assert _flops(model) / _flops(result.module) == pytest.approx(result.report.speedup,
                                                                  rel=1e-4)
    pair = getattr(result.module.moe, next(p for p in result.ranks if p.startswith("moe/"))[4:])
    assert jnp.dtype(pair.vertical.dtype) == jnp.bfloat16


class LinenExperts(nn.Module):
    """A compact linen module with the loop (its router a parameter too)."""

    @nn.compact
    def __call__(self, x):
        router, gate, up = (self.param(n, nn.initializers.lecun_normal(), s) for n, s in (
            ("router", (F, E)), ("gate", (E, F, H)), ("up", (E, F, H))))
        down = self.param("down", nn.initializers.lecun_normal(), (E, H, F))
        weights, choices = jax.lax.top_k(jax.nn.softmax(x @ router), TOP)
        mask = jnp.swapaxes(jax.nn.one_hot(choices, E), -1, -2)
        dispatched = jnp.einsum("btd,btek->bted", x, mask)
        outs = [(jax.nn.silu(xi @ gate[i]) * (xi @ up[i])) @ down[i]
                for i, xi in enumerate(jnp.moveaxis(dispatched, 2, 0))]
        return jnp.einsum("bted,btek,btk->btd", jnp.stack(outs, 2), mask, weights)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(F, name="proj_in")(x)
        return nn.Dense(F, name="proj_out")(h + LinenExperts(name="moe")(h))


def test_experts_in_a_loop_in_linen_are_split_in_their_parameters_places():
    model = LinenNet()
    variables = init(model, 0, X)
    found = {s.path: s for s in lrjax.surgery.find_convs(model, X)}
    assert {p: found[p].stack for p in ("moe/gate", "moe/up", "moe/down")} == dict.fromkeys(
        ("moe/gate", "moe/up", "moe/down"), E)
    full = lrjax.decompose_linen(model, variables, X, rule=dict.fromkeys(
        ("moe/gate", "moe/up", "moe/down"), E * H))
    np.testing.assert_allclose(apply(full.module, full.variables, HELD_OUT),
                               apply(model, variables, HELD_OUT), rtol=1e-4, atol=2e-5)
    assert full.variables["params"]["moe"]["gate"]["vertical"]["kernel"].shape == (E, F, H)
    split = lrjax.decompose_linen(model, variables, X, rule="speedup:1.5")
    assert lowered_flops(model.apply, variables, X) / lowered_flops(
        split.module.apply, split.variables, X) == pytest.approx(split.report.speedup, rel=1e-6)
