"""Several products written by hand in one NNX module (:mod:`lrjax.nnx_products`): a module of
the user's own holding only parameters, whose call multiplies the data by some of them (the
hand-written MLP ``relu(x @ self.w1 + self.b1) @ self.w2 + self.b2``, a hand-written attention
of ``wq``, ``wk``, ``wv``, ``wo``): each such product is split as an ``nnx.Einsum``, its pair in
the parameter's place; the module's other parameters and code stay as written."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import export
from tests.helpers import lowered_flops, normal


def _normal(rngs, shape):
    return nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(shape[0]))


class MLP(nnx.Module):
    """Two products, the second's kernel stored PyTorch-style ``(out, in)`` and transposed."""

    def __init__(self, d, h, rngs):
        self.w1, self.b1 = _normal(rngs, (d, h)), nnx.Param(jnp.full((h,), 0.1))
        self.w2, self.b2 = nnx.Param(_normal(rngs, (h, d))[...].T), nnx.Param(jnp.zeros((d,)))

    def __call__(self, x):
        h = jax.nn.relu(x @ self.w1 + self.b1)
        return h @ self.w2[...].T + self.b2


class Attention(nnx.Module):
    """Projections as einsums of per-head kernels, a norm's scale among the parameters, the
    output projection contracting two axes."""

    def __init__(self, d, heads, rngs):
        self.scale = nnx.Param(jnp.ones((d,)))
        self.wq, self.wk, self.wv = (_normal(rngs, (d, heads, d // heads)) for _ in range(3))
        self.wo = nnx.Param(_normal(rngs, (heads * d // heads, d))[...].reshape(heads, -1, d))

    def __call__(self, x):
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * self.scale
        q, k, v = (jnp.einsum("btd,dnh->btnh", x, w) for w in (self.wq, self.wk, self.wv))
        a = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
        return jnp.einsum("btnh,nhd->btd", jnp.einsum("bnts,bsnh->btnh", a, v), self.wo)


class Tied(nnx.Module):
    """One table used twice (in and out): no product a layer computes, its own code."""

    def __init__(self, d, rngs):
        self.w = _normal(rngs, (d, d))

    def __call__(self, x):
        return jnp.tanh(x @ self.w) @ self.w.T


class Net(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(8, 32, rngs=rngs)
        self.attn = Attention(32, 4, rngs)
        self.mlp = MLP(32, 96, rngs)
        self.tied = Tied(32, rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(self.tied(x).mean(1))


X = normal(1, (4, 12, 8))
HELD_OUT = normal(2, (16, 12, 8))
PRODUCTS = {"attn/wq": "abc,cAB->abAB", "attn/wk": "abc,cAB->abAB", "attn/wv": "abc,cAB->abAB",
            "attn/wo": "abcd,cdA->abA", "mlp/w1": "abc,cA->abA", "mlp/w2": "abc,Ac->abA"}


def _full(found):
    return {s.path: lrjax.costs.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
            for s in found if s.candidate}


def test_products_are_found_as_einsums_named_by_their_parameters():
    found = {s.path: s for s in lrjax.nnx_surgery.find_convs_nnx(Net(nnx.Rngs(0)), X)}
    equations = {p: s.equation for p, s in found.items() if s.equation is not None}
    assert equations == PRODUCTS
    assert all(found[p].candidate for p in PRODUCTS)
    assert not any(p.startswith("tied") for p in found)  # its own code: no layer
    assert {"embed", "head"} <= set(found)


@pytest.mark.parametrize("calibrated", [False, True])
def test_full_rank_pairs_take_the_parameters_places_and_reproduce_the_model(calibrated):
    model = Net(nnx.Rngs(0))
    found = lrjax.nnx_surgery.find_convs_nnx(model, X)
    result = lrjax.decompose_nnx(model, X, rule=_full(found),
                                 calibration=[X] if calibrated else None)
    assert set(PRODUCTS) <= set(result.ranks)
    np.testing.assert_allclose(result.module(HELD_OUT), model(HELD_OUT), rtol=1e-4, atol=2e-5)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(result.module))}
    assert {"mlp/w1/vertical/kernel", "mlp/w1/horizontal/kernel", "mlp/b1", "attn/scale",
            "attn/wo/vertical/kernel", "tied/w"} <= paths
    assert not {"mlp/w1", "attn/wq"} & paths
    assert type(model.mlp) is MLP and isinstance(model.mlp.w1, nnx.Param)  # untouched


def test_calibrated_factors_fit_each_products_own_input_better():
    model = Net(nnx.Rngs(0))
    want = model(HELD_OUT)
    rule = {"mlp/w1": 6, "mlp/w2": 6, "attn/wo": 6}
    errors = [float(jnp.linalg.norm(lrjax.decompose_nnx(
        model, X, rule=rule, calibration=c).module(HELD_OUT) - want))
        for c in (None, [HELD_OUT[:8]])]
    assert errors[1] < 0.8 * errors[0]


def test_a_whole_net_rule_is_xlas_ratio_exported_and_saved(tmp_path):
    model = Net(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule="speedup:1.5")
    assert set(result.ranks) & set(PRODUCTS)
    flops = []
    for m in (model, result.module):
        graphdef, state = nnx.split(m)
        flops.append(lowered_flops(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, X))
    assert flops[0] / flops[1] == pytest.approx(result.report.speedup, rel=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(result.module, X), result.module(X),
                               rtol=1e-5, atol=1e-6)
    done = export.to_onnx(result.module, None, (X,), str(tmp_path / "m.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
    path = lrjax.save_decomposed(str(tmp_path / "saved"), result)
    loaded = lrjax.load_decomposed(path, Net(nnx.Rngs(1)), X)
    np.testing.assert_allclose(loaded(X), result.module(X), rtol=1e-6, atol=1e-6)


class Reading(nnx.Module):
    """A parent reading its child's parameter (a tied head): that module's products stay its
    own code; the model still decomposes."""

    def __init__(self, rngs):
        self.mlp = MLP(8, 16, rngs)
        self.other = MLP(8, 16, rngs)

    def __call__(self, x):
        return self.other(x) + (x @ self.mlp.w1[...]) @ self.mlp.w1[...].T


def test_a_parameter_its_parent_reads_is_left_in_its_own_code():
    model = Reading(nnx.Rngs(0))
    found = {s.path for s in lrjax.nnx_surgery.find_convs_nnx(model, X)}
    assert found == {"other/w1", "other/w2"}
    result = lrjax.decompose_nnx(model, X, rule={"other/w1": 4})
    assert result.ranks == {"other/w1": 4}
    assert result.module(X).shape == model(X).shape


class Root(MLP):
    """The model itself holds the products."""


def test_the_model_itself_holding_products_and_a_call_on_other_data_is_named():
    model = Root(8, 32, nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"w1": 4, "w2": 4})
    assert result.ranks == {"w1": 4, "w2": 4}
    assert result.module(HELD_OUT).shape == HELD_OUT.shape
    with pytest.raises(ValueError, match=r"Root's parameter 'w1' was found as the product "
                                         r"'abc,cA->abA'"):
        result.module(X[0])  # (a rank-2 input: another product)


class GatedBlock(nnx.Module):
    """Products among children: a norm, a Flax layer (itself a layer), a dropout, a list of
    layers; the module's own parameters multiplied between them."""

    def __init__(self, d, rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.w_in, self.w_out = _normal(rngs, (d, 2 * d)), _normal(rngs, (2 * d, d))
        self.gate = nnx.Linear(d, 2 * d, rngs=rngs)
        self.extra = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(2)])
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        y = self.drop(jax.nn.silu(h @ self.w_in) * self.gate(h)) @ self.w_out
        for layer in self.extra:
            y = y + layer(x)
        return x + y


class Headed(nnx.Module):
    """The model itself multiplies by a parameter of its own (a hand-written head) among its
    children."""

    def __init__(self, rngs):
        self.embed = nnx.Linear(8, 32, rngs=rngs)
        self.blocks = nnx.List([GatedBlock(32, rngs)])
        self.head = _normal(rngs, (32, 10))

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(1) @ self.head


@pytest.mark.slow  # 4 s on the 2-core machine: the default run stays under 5 minutes
def test_products_among_children_are_split_and_the_children_run_as_themselves(tmp_path):
    model = Headed(nnx.Rngs(0))
    found = lrjax.nnx_surgery.find_convs_nnx(model, X)
    assert [s.path for s in found] == [  # in call order, the children's layers among them
        "embed", "blocks/0/w_in", "blocks/0/gate", "blocks/0/w_out", "blocks/0/extra/0",
        "blocks/0/extra/1", "head"]
    view = lrjax.nnx_surgery.eval_view  # (its dropout on: the model as built)
    full = lrjax.decompose_nnx(model, X, rule=_full(found), calibration=[X])
    np.testing.assert_allclose(view(full.module)(HELD_OUT), view(model)(HELD_OUT), rtol=1e-4,
                               atol=1e-5)
    # calibrated on each product's own input (the norm's output, the gated hidden layer)
    rule = {s.path: 4 for s in found}
    errors = [float(jnp.linalg.norm(view(lrjax.decompose_nnx(
        model, X, rule=rule, calibration=c).module)(HELD_OUT) - view(model)(HELD_OUT)))
        for c in (None, [HELD_OUT])]
    assert errors[1] < 0.8 * errors[0]
    result = lrjax.decompose_nnx(model, X, rule="speedup:1.5")
    assert {"blocks/0/w_in", "head"} & set(result.ranks)
    flops = []
    for m in (model, result.module):
        graphdef, state = nnx.split(view(m))
        flops.append(lowered_flops(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, X))
    assert flops[0] / flops[1] == pytest.approx(result.report.speedup, rel=1e-6)
    done = export.to_onnx(result.module, None, (X,), str(tmp_path / "m.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale


def test_a_decomposed_model_trains_with_its_childrens_dropout_on():
    """The children run for real in the replay, as built (dropout on, drawing from its
    stream), eagerly and under nnx.jit; gradients reach the pairs."""
    model = Headed(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule={"blocks/0/w_in": 4, "head": 4})
    decomposed = result.module
    first, second = decomposed(X), decomposed(X)
    assert first.shape == (4, 10) and not np.allclose(first, second)  # dropout draws anew

    def loss(m, x):
        return jnp.mean(m(x) ** 2)

    grads = nnx.jit(nnx.grad(loss))(decomposed, X)
    assert float(jnp.abs(grads["blocks"][0]["w_in"]["vertical"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(grads["head"]["horizontal"]["kernel"][...]).max()) > 0


class RngsBlock(nnx.Module):
    """Its children given the call's ``nnx.Rngs`` (as the Flax docs' DETR passes them down)."""

    def __init__(self, rngs):
        self.w = _normal(rngs, (32, 32))
        self.drop = nnx.Dropout(0.5)

    def __call__(self, x, *, rngs=None):
        return x + self.drop(jax.nn.relu(x @ self.w), rngs=rngs)


def test_a_child_given_the_calls_rngs_draws_from_them():
    model = RngsBlock(nnx.Rngs(0))
    found = lrjax.nnx_surgery.find_convs_nnx(model, X[..., :1].repeat(32, -1), rngs=nnx.Rngs(1))
    assert [(s.path, s.candidate) for s in found] == [("w", True)]
    x = jax.random.normal(jax.random.key(3), (4, 12, 32))
    result = lrjax.decompose_nnx(model, x, rule={"w": 32}, rngs=nnx.Rngs(1))
    # the same stream, the same draws: the full-rank pair computes what the module did
    np.testing.assert_allclose(result.module(x, rngs=nnx.Rngs(7)), model(x, rngs=nnx.Rngs(7)),
                               rtol=1e-4, atol=1e-5)
    rngs = nnx.Rngs(7)
    first, second = result.module(x, rngs=rngs), result.module(x, rngs=rngs)
    assert not np.allclose(first, second)  # the caller's stream moves on




class Row(nnx.Module):
    def __init__(self, rngs):
        self.w, self.b = _normal(rngs, (16, 32)), nnx.Param(jnp.full((32,), 0.1))

    def __call__(self, row):
        return jnp.tanh(row @ self.w[...] + self.b[...])


class TransformsItself(Row):
    """Its own call transforms itself (``nnx.vmap`` over the examples, ``nnx.remat``): NNX
    refuses a module made outside the trace lrjax records its call in to its transforms, unless
    told it was made there."""

    def __init__(self, rngs, transform):
        super().__init__(rngs)
        self.transform = transform

    def __call__(self, x):
        def product(m, row):
            return jnp.tanh(row @ m.w[...] + m.b[...])
        if self.transform == "remat":
            return nnx.remat(product)(self, x)
        return nnx.vmap(product, in_axes=(None, 0))(self, x)


class PerExample(nnx.Module):
    """A hand-written product ``nnx.vmap``-ed over the batch: each call multiplies one vector (no
    batch axis) by the kernel, a dense layer still."""

    def __init__(self, rngs, itself=None):
        self.itself = itself
        self.row = Row(rngs) if itself is None else TransformsItself(rngs, itself)
        self.head = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        if self.itself:
            return self.head(self.row(x))
        return self.head(nnx.vmap(lambda m, r: m(r), in_axes=(None, 0))(self.row, x))


@pytest.mark.parametrize("itself", [None, "vmap", "remat"])
def test_a_product_of_one_vector_by_a_kernel_is_split(itself, tmp_path):
    x = jax.random.normal(jax.random.key(3), (6, 16))
    model = PerExample(nnx.Rngs(0), itself)
    want = model(x)
    full = lrjax.decompose_nnx(model, x, rule={"row/w": 16})
    np.testing.assert_allclose(full.module(x), want, rtol=1e-5, atol=1e-5)
    result = lrjax.decompose_nnx(model, x, rule="speedup:1.5", calibration=x)
    assert "row/w" in result.ranks
    flops = []
    for m in (model, result.module):
        graphdef, state = nnx.split(m)
        flops.append(lowered_flops(lambda s, v, g=graphdef: nnx.merge(g, s)(v), state, x))
    assert flops[0] / flops[1] == pytest.approx(result.report.speedup, rel=1e-6)
    np.testing.assert_allclose(model(x), want)  # (the model as it was: no tracer left in it)
    done = export.to_onnx(result.module, None, (x,), str(tmp_path / "m.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
