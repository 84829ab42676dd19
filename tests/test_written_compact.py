"""Products written by hand in compact linen modules, under any parameter name
(:mod:`lrjax.linen_products`): flaxmodels' StyleGAN2 layers (``self.param("weight", ...)``
scaled by a constant, the equalized learning rate, then ``lax.conv_general_dilated`` or
``jnp.matmul``, a bias, an activation) and score_sde's ``NIN`` (``W``, ``b``, an einsum) are
split as the Flax layers their products are; the scale is a re-parametrization the closed form
factors (the pair computes with the scaled kernel). A kernel masked by a constant, or in a
layout no Flax layer computes, stays the module's own product."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import partitioning as nn_partitioning

import lrjax
from lrjax import export, linen_cells, surgery
from tests.helpers import init, normal, whole_net_rule


def _leaky(x):
    return jnp.where(x >= 0, x, 0.2 * x) * np.sqrt(2.0)


class EqualizedConv(nn.Module):
    """StyleGAN2's ``DiscriminatorLayer`` as written: a unit-variance ``weight`` scaled at run
    time by ``lr_multiplier / sqrt(fan_in)``, cast, a conv (strided when it downsamples), its
    bias scaled too, a leaky ReLU."""
    fmaps: int
    kernel: int = 3
    down: bool = False
    lr_multiplier: float = 1.0

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel, self.kernel, x.shape[-1], self.fmaps)
        w = self.param("weight", nn.initializers.normal(1.0 / self.lr_multiplier), shape)
        b = self.param("bias", nn.initializers.normal(0.1), (self.fmaps,))
        w = w * (self.lr_multiplier / np.sqrt(np.prod(shape[:-1])))
        x = jax.lax.conv_general_dilated(
            x, w.astype(x.dtype), (2, 2) if self.down else (1, 1), "SAME",
            dimension_numbers=nn.linear._conv_dimension_numbers(x.shape))
        return _leaky(x + (b * self.lr_multiplier).astype(x.dtype))


class EqualizedLinear(nn.Module):
    """StyleGAN2's ``LinearLayer``: ``jnp.matmul`` of the scaled weight, bias, a constant."""
    features: int
    lr_multiplier: float = 0.01

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(1.0 / self.lr_multiplier),
                       (x.shape[-1], self.features))
        x = jnp.matmul(x, (w * (self.lr_multiplier / np.sqrt(x.shape[-1]))).astype(x.dtype))
        b = self.param("bias", nn.initializers.normal(10.0), (self.features,))
        return _leaky(x + b * self.lr_multiplier + 0.5)


class NIN(nn.Module):
    """score_sde's ``NIN``: ``W`` and ``b``, contracted by an einsum over the channels."""
    num_units: int

    @nn.compact
    def __call__(self, x):
        w = self.param("W", nn.initializers.lecun_normal(), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.normal(0.1), (self.num_units,))
        return jnp.einsum("bhwc,cn->bhwn", x, w) + b


class Masked(nn.Module):
    """A kernel masked by a constant (MADE's autoregressive dense layer written by hand): no
    Flax layer computes that, its own product stays, listed."""

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(), (x.shape[-1], x.shape[-1]))
        return x @ (w * np.triu(np.ones(w.shape, np.float32)))


class Discriminator(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = EqualizedConv(16, kernel=1, name="fromrgb")(x)
        x = EqualizedConv(16, name="conv0")(x)
        x = EqualizedConv(32, down=True, name="down")(x)
        x = x + NIN(32, name="nin")(x)
        x = EqualizedConv(32, name="conv1")(x).mean((1, 2))
        x = Masked(name="masked")(x)
        x = EqualizedLinear(32, name="fc")(x)
        return EqualizedLinear(1, lr_multiplier=1.0, name="out")(x)


X = normal(0, (2, 16, 16, 3))
WRITTEN = {"fromrgb": "1x1", "conv0": "kxk", "down": "kxk", "nin": "dense", "conv1": "kxk",
           "fc": "dense", "out": "dense"}


@pytest.fixture(scope="module")
def net():
    model = Discriminator()
    return model, init(model, 1, X)


def test_written_products_under_any_name_are_found_and_init_as_written(net):
    model, variables = net
    found = {s.path: s for s in surgery.find_convs(model, X)}
    assert {p: s.kind for p, s in found.items() if s.candidate} == WRITTEN
    assert all(found[p].written for p in WRITTEN) and found["nin"].kernel_name == "W"
    assert found["conv0"].kernel_name == "weight" and found["conv0"].parametrization is not None
    assert found["down"].shape.strides == (2, 2) and not found["down"].shape.use_bias
    with linen_cells.as_sublayers():  # the module's own variables, from the same keys
        under = init(model, 1, X)
    jax.tree.map(np.testing.assert_array_equal, under, variables)


@pytest.mark.slow  # 4 s on the 2-core machine: the default run stays under 5 minutes
def test_full_rank_pairs_factor_the_scaled_kernels(net):
    model, variables = net
    full = {"fromrgb": 3, "conv0": 48, "down": 48, "nin": 32, "conv1": 96, "fc": 32, "out": 1}
    result = lrjax.decompose_linen(model, variables, X, rule=full)
    shapes = jax.tree.map(jnp.shape, result.variables["params"])
    assert shapes["conv0"] == {"bias": (16,), "vertical": {"kernel": (3, 1, 16, 48)},
                               "horizontal": {"kernel": (1, 3, 48, 16)}}
    assert shapes["nin"] == {"b": (32,), "vertical": {"kernel": (32, 32)},
                             "horizontal": {"kernel": (32, 32)}}
    np.testing.assert_allclose(result.module.apply(result.variables, X),
                               model.apply(variables, X), rtol=1e-4, atol=1e-5)
    # the pair computes with the kernel as scaled: its product is the scaled kernel's
    w = variables["params"]["fc"]["weight"] * (0.01 / np.sqrt(32))
    pair = result.variables["params"]["fc"]
    np.testing.assert_allclose(pair["vertical"]["kernel"] @ pair["horizontal"]["kernel"], w,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_whole_net_rule_is_xlas_ratio_calibrated_exported_and_saved(net, tmp_path):
    model, variables = net  # (the scaling each call does counts as the layer's work)
    calibration = jax.random.normal(jax.random.key(2), (8, 16, 16, 3))
    free, fitted, done = whole_net_rule(model, variables, X, "speedup:2", calibration, tmp_path,
                                        onnx_input=X)
    for result in (free, fitted):
        assert len(set(result.ranks) & set(WRITTEN)) >= 2
        assert "left as is: masked: its own code" in result.report.table()
    assert done.checked_batches == (2, 3)


class Clipped(nn.Module):
    """Its kernel clipped when trained: the inference call's product is a dense layer's."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 16))
        return jnp.tanh(x @ (jnp.clip(w, -0.1, 0.1) if train else w))


class Holder(nn.Module):
    """A parameter whose product feeds its dropout (drawing a key) and a layer of its own: a
    layer, its calls made from its replay (:mod:`lrjax.linen_calls`)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 16))
        x = nn.Dropout(0.5, deterministic=not train)(x @ w)
        return nn.Dense(16)(x)


class Trained(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return Holder(name="holder")(Clipped(name="clipped")(x, train=train), train=train)


def test_other_calls_run_as_written_or_fail_naming_the_layer():
    x, model = jax.random.normal(jax.random.key(3), (4, 24)), Trained()
    variables = init(model, 0, x)
    found = {s.path: s for s in surgery.find_convs(model, x)}
    assert found["clipped"].written and not found["holder/Dense_0"].written
    assert found["holder/w"].written and found["holder/w"].candidate
    with linen_cells.as_sublayers():  # a training call draws its dropout key as written
        train = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(
        train, model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(5)}))
    result = lrjax.decompose_linen(model, variables, x, rule={"clipped": 4})
    assert not result.report.skipped
    result.module.apply(result.variables, x)
    with pytest.raises(ValueError, match=r"'clipped' was split as the product of its kernel that "
                                         r"its code computes, but its call no longer traces so"):
        result.module.apply(result.variables, x, train=True, rngs={"dropout": jax.random.key(5)})


class Quantizer(nn.Module):
    """MAGVIT's vector quantizer: declares its codebook, then reads it back through
    ``self.variables`` in a helper (in an init too), and multiplies by it twice: its own."""

    @nn.compact
    def __call__(self, x):
        self.param("codebook", nn.initializers.normal(1.0), (8, x.shape[-1]))
        codebook = self.variables["params"]["codebook"]
        codes = jnp.argmin(-2 * x @ codebook.T + jnp.sum(codebook ** 2, axis=1), axis=-1)
        return jnp.take(codebook, codes, axis=0) + 0 * (x @ codebook.T).sum()


class Coded(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Quantizer(name="quantizer")(EqualizedLinear(24, name="fc")(x))


def test_a_module_reading_its_own_variables_runs_as_written():
    x, model = jax.random.normal(jax.random.key(3), (4, 24)), Coded()
    variables = init(model, 0, x)
    with linen_cells.as_sublayers():  # (its parameters stored as they are made)
        jax.tree.map(np.testing.assert_array_equal, init(model, 0, x), variables)
    result = lrjax.decompose_linen(model, variables, x, rule={"fc": 4})
    assert "quantizer" in result.report.skipped and result.ranks == {"fc": 4}
    assert jax.tree.map(jnp.shape, result.variables["params"]["fc"]) == {
        "bias": (24,), "vertical": {"kernel": (24, 4)}, "horizontal": {"kernel": (4, 24)}}


class DenseGeneral(nn.Module):
    """MaxText's ``DenseGeneral`` as written: a kernel of the contracted axes then the features
    (``(embed, heads, head_dim)``), cast, ``lax.dot_general`` of the data's last axes with its
    first."""
    features: tuple
    axis: tuple = (-1,)

    @nn.compact
    def __call__(self, inputs):
        axis = tuple(a % inputs.ndim for a in self.axis)
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            tuple(inputs.shape[a] for a in axis) + tuple(self.features))
        return jax.lax.dot_general(inputs, jnp.asarray(kernel, jnp.float32),
                                   ((axis, tuple(range(len(axis)))), ((), ())))


class FlatDenseGeneral(DenseGeneral):
    """t5x's: the kernel stored flattened to 2-D by ``param_with_axes`` (its axis names sown in
    ``params_axes``), reshaped to ``(heads, head_dim, embed)`` in its call."""

    @nn.compact
    def __call__(self, inputs):
        axis = tuple(a % inputs.ndim for a in self.axis)
        shape = tuple(inputs.shape[a] for a in axis) + tuple(self.features)
        flat = (int(np.prod(shape[:len(axis)])), int(np.prod(self.features)))
        kernel = nn_partitioning.param_with_axes(
            "kernel", nn.initializers.lecun_normal(), flat, jnp.float32, axes=("joined", "embed"))
        return jax.lax.dot_general(inputs, jnp.reshape(kernel, shape),
                                   ((axis, tuple(range(len(axis)))), ((), ())))


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = (DenseGeneral((4, 16), name=n)(x) for n in ("query", "key", "value"))
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0)
        return FlatDenseGeneral((64,), axis=(-2, -1), name="out")(
            jnp.einsum("bhqk,bkhd->bqhd", weights, v))


def test_hand_written_general_dense_layers_split_as_dense_general():
    x, model = jax.random.normal(jax.random.key(0), (2, 10, 64)), Attention()
    variables = init(model, 1, x)
    found = {s.path: s.dense_dims for s in surgery.find_convs(model, x) if s.candidate}
    assert found == {"query": ((64,), (4, 16)), "key": ((64,), (4, 16)),
                     "value": ((64,), (4, 16)), "out": ((4, 16), (64,))}
    assert variables["params"]["out"]["kernel"].shape == (64, 64)  # stored flattened
    full = lrjax.decompose_linen(model, variables, x, rule=dict.fromkeys(found, 64))
    assert jax.tree.map(jnp.shape, full.variables["params"]["out"]) == {
        "vertical": {"kernel": (4, 16, 64)}, "horizontal": {"kernel": (64, 64)}}
    assert "params_axes" in full.variables  # (sown by t5x's param_with_axes: kept as given)
    np.testing.assert_allclose(full.module.apply(full.variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-6)
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5",
                                   calibration=jax.random.normal(jax.random.key(3), (8, 10, 64)))
    lowered = [jax.jit(m.apply).lower(v, x).cost_analysis()["flops"]
               for m, v in ((model, variables), (result.module, result.variables))]
    assert result.report.speedup == pytest.approx(lowered[0] / lowered[1], rel=1e-6)


class Scale(nn.Module):
    """A layer scale: a parameter, no product."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("gamma", nn.initializers.constant(0.1), (x.shape[-1],))


class Scaled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(6):
            x = Scale()(nn.Dense(8)(x))
        return x


def test_a_call_holding_no_product_is_traced_once_per_configuration(monkeypatch):
    """Each compact module's call is traced to look for its product; one found to hold none
    (a norm's, a layer scale's) runs as written at once the next times (the same class,
    configuration and argument shapes): six layer scales, every stage of a decomposition, one
    trace."""
    from lrjax import linen_products, replay
    real, traced = replay.traced_inlined, []

    def counted(fn, *args, **kwargs):
        traced.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(replay, "traced_inlined", counted)
    monkeypatch.setattr(linen_products, "_AS_WRITTEN", set())  # nothing seen yet
    x, model = jax.random.normal(jax.random.key(0), (2, 8)), Scaled()
    lrjax.decompose_linen(model, init(model, 0, x), x, rule="speedup:1.5")
    assert len(traced) == 1


class GatedFeedForward(nn.Module):
    """big_vision's Gemma ``FeedForward`` as written: a ``(2, C, H)`` gating parameter whose two
    slices are two products (``jnp.dot(x, w[0])``, ``jnp.dot(x, w[1])``), and a ``linear``
    parameter in one product."""

    @nn.compact
    def __call__(self, x):
        gating = self.param("gating_einsum", nn.initializers.normal(0.1), (2, 16, 32))
        hidden = nn.gelu(jnp.dot(x, gating[0])) * jnp.dot(x, gating[1])
        return jnp.dot(hidden, self.param("linear", nn.initializers.normal(0.1), (32, 16)))


class HandAttention(nn.Module):
    """Self-attention written by hand in one compact module: four projections, ``x @ w``."""

    @nn.compact
    def __call__(self, x):
        w = {n: self.param(n, nn.initializers.lecun_normal(), (16, 16))
             for n in ("wq", "wk", "wv", "wo")}
        q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
        a = jax.nn.softmax(q @ k.swapaxes(-1, -2) / 4.0)
        return (a @ v) @ w["wo"]


class GatedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="embed")(x)
        x = x + HandAttention(name="attn")(x)
        return x + GatedFeedForward(name="mlp")(x)


GATED = {"embed": (8, 16), "attn/wq": (16, 16), "attn/wk": (16, 16), "attn/wv": (16, 16),
         "attn/wo": (16, 16), "mlp/gating_einsum": (2, 16, 32), "mlp/linear": (32, 16)}


@pytest.mark.slow  # 6 s on the 2-core machine: the default run stays under 5 minutes
def test_a_modules_several_products_split_each_named_by_its_parameter(tmp_path):
    """A module whose own code computes several products (a hand-written attention's four
    projections; a gated feed-forward's ``linear`` and its gating parameter, whose two slices
    are one product of the whole parameter, the slice axis kept in its output): each is a
    layer named ``{module}/{parameter}``, its pair in that parameter's place (before: the
    attention was left as one fixed cost, "4 parameters used in one product each", and the
    gating slices were listed as the module's own code beside ``linear``); at full rank the
    model is reproduced; a whole-net rule is XLA's ratio, data-free and calibrated; it
    exports."""
    x = jax.random.normal(jax.random.key(0), (2, 10, 8))
    model = GatedNet()
    variables = init(model, 1, x)
    found = {s.path: s for s in surgery.find_convs(model, x)}
    assert {p: s.shape.kernel_shape[-2:] for p, s in found.items() if s.candidate} == {
        p: (int(np.prod(k[:-1])) if p != "mlp/gating_einsum" else 16,
            k[-1] if p != "mlp/gating_einsum" else 64) for p, k in GATED.items()}
    full = {"attn/wq": 16, "mlp/gating_einsum": 16, "mlp/linear": 16}
    result = lrjax.decompose_linen(model, variables, x, rule=full)
    shapes = jax.tree.map(jnp.shape, result.variables["params"])
    assert shapes["mlp"]["gating_einsum"] == {"vertical": {"kernel": (16, 16)},
                                              "horizontal": {"kernel": (16, 2, 32)}}
    assert shapes["attn"]["wq"] == {"vertical": {"kernel": (16, 16)},
                                    "horizontal": {"kernel": (16, 16)}}
    assert shapes["attn"]["wk"] == (16, 16) and shapes["mlp"]["linear"] == {
        "vertical": {"kernel": (32, 16)}, "horizontal": {"kernel": (16, 16)}}
    np.testing.assert_allclose(result.module.apply(result.variables, x),
                               model.apply(variables, x), rtol=1e-4, atol=1e-5)
    made = result.module.init(jax.random.key(3), x)["params"]
    assert jax.tree.map(jnp.shape, made) == shapes  # its init makes the same variables
    calibration = jax.random.normal(jax.random.key(2), (8, 10, 8))
    for given in (None, calibration):
        done = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5",
                                     calibration=given)
        assert {"mlp/gating_einsum", "mlp/linear"} <= set(done.report.kinds)
        assert not done.report.skipped
        lowered = [jax.jit(m.apply).lower(v, x).cost_analysis()["flops"]
                   for m, v in ((model, variables), (done.module, done.variables))]
        assert done.report.speedup == pytest.approx(lowered[0] / lowered[1], rel=1e-6)
    exported = export.to_onnx(done.module, done.variables, (x,), str(tmp_path / "g.onnx"))
    assert exported.max_abs_error <= 1e-5 * max(1.0, exported.scale)


class GatedForms(nn.Module):
    """A gated feed-forward whose gating parameter is cut as others write it: ``w[0]`` and
    ``w[1]``, ``a, b = w``, ``jnp.unstack`` (of the parameter scaled by a constant first), or
    one ``(C, 2H)`` kernel cut into halves of its output axis (``w[:, :h]``, ``jnp.split``)."""
    form: str

    @nn.compact
    def __call__(self, x):
        fused = self.form in ("range", "split")
        w = self.param("w", nn.initializers.normal(0.3), (16, 64) if fused else (2, 16, 32))
        if self.form == "index":
            gate, up = w[0], w[1]
        elif self.form == "unpack":
            gate, up = w
        elif self.form == "unstack":
            gate, up = jnp.unstack(w * 0.5)
        elif self.form == "range":
            gate, up = w[:, :32], w[:, 32:]
        else:
            gate, up = jnp.split(w, 2, axis=-1)
        return nn.gelu(x @ gate) * (x @ up) @ self.param("out", nn.initializers.normal(0.1),
                                                         (32, 16))


@pytest.mark.parametrize("form", ["index", *(pytest.param(f, marks=pytest.mark.slow)  # (slow run)
                                  for f in ("unpack", "unstack")), "range", "split"])
def test_a_parameter_cut_into_products_of_the_same_data_is_one_layer(form):
    """Each form is one layer of the whole parameter (a one-index piece: an einsum keeping the
    axis; a range of the output axis: the dense layer of the whole kernel); at full rank the
    model is reproduced and a rule's cost is XLA's (before: its own code, a fixed cost)."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    model = GatedForms(form)
    variables = init(model, 0, x)
    found = {s.path: s for s in surgery.find_convs(model, x) if s.candidate}
    assert set(found) == {"w", "out"} and found["w"].shape.kernel_shape[-2:] == (16, 64)
    result = lrjax.decompose_linen(model, variables, x, rule={"w": 16})
    want = (16, 64) if form in ("range", "split") else (16, 2, 32)
    assert result.variables["params"]["w"]["horizontal"]["kernel"].shape == want
    np.testing.assert_allclose(result.module.apply(result.variables, x),
                               model.apply(variables, x), rtol=1e-4, atol=1e-5)
    done = lrjax.decompose_linen(model, variables, x, rule={"w": 4})
    lowered = [jax.jit(m.apply).lower(v, x).cost_analysis()["flops"]
               for m, v in ((model, variables), (done.module, done.variables))]
    assert done.report.speedup == pytest.approx(lowered[0] / lowered[1], rel=1e-6)


class PartlySliced(nn.Module):
    """Slices of a parameter that are not one product of the whole: one index of three unused,
    or two slices multiplying different data."""
    other_data: bool = False

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.1), (3 - self.other_data, 8, 8))
        return jnp.dot(x, w[0]) + jnp.dot(jnp.tanh(x) if self.other_data else x, w[1])


def test_slices_that_are_not_one_product_stay_the_modules_own_code():
    x = jax.random.normal(jax.random.key(0), (2, 8))
    model = PartlySliced()
    variables = init(model, 0, x)
    found = surgery.find_convs(model, x)
    assert not [s for s in found if s.candidate]
    result = lrjax.decompose_linen(model, variables, x, rule={})
    assert "its own code multiplies" in result.report.skipped["w"]


def test_one_index_slices_of_other_data_are_a_batch_of_kernels_of_their_data_stacked():
    """Two slices multiplying different data alike (was: its own code) are the experts of a
    loop, ``x_i @ w[i]``: one einsum of their data stacked, each slice's matrix split."""
    x = jax.random.normal(jax.random.key(0), (2, 8))
    model = PartlySliced(other_data=True)
    variables = init(model, 0, x)
    (site,) = [s for s in surgery.find_convs(model, x) if s.candidate]
    assert (site.stack, site.equation) == (2, "Bab,BbA->BaA")  # (the model itself: path "")
    result = lrjax.decompose_linen(model, variables, x, rule={site.path: 16})
    np.testing.assert_allclose(result.module.apply(result.variables, x),
                               model.apply(variables, x), rtol=1e-4, atol=1e-5)


class Mixed(nn.Module):
    """Two projections split, beside a parameter in two products (tied: its own code) and one
    per head (a batch of kernels: an einsum with a batch letter, a layer)."""

    @nn.compact
    def __call__(self, x):
        w = {n: self.param(n, nn.initializers.lecun_normal(), (16, 4, 4)) for n in ("wq", "wk")}
        tied = self.param("tied", nn.initializers.lecun_normal(), (16, 16))
        heads = self.param("heads", nn.initializers.lecun_normal(), (4, 4, 4))
        q, k = (jnp.einsum("btd,dhk->bthk", x, w[n]) for n in ("wq", "wk"))
        q = jnp.einsum("bthk,hkj->bthj", q, heads)
        a = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k))
        y = jnp.einsum("bhts,bshk->bthk", a, k).reshape(x.shape)
        return jnp.tanh(y @ tied) @ tied.T


class MixedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Mixed(name="attn")(x)


def test_a_modules_other_products_beside_its_layers_are_named_by_their_parameters():
    """Listed as ``attn/tied`` (before: as ``attn``, "left as it is", though its projections
    were split); ``attn/heads``, a batch of per-head kernels, is a layer kept full."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    model = MixedNet()
    variables = init(model, 0, x)
    result = lrjax.decompose_linen(model, variables, x, rule={"attn/wq": 4, "attn/wk": 4})
    assert result.report.ranks == {"attn/wq": 4, "attn/wk": 4}
    assert set(result.report.skipped) == {"attn/tied"}
    assert result.problem.site("attn/heads").batched and "attn/heads" in result.report.kinds
    assert "'tied' in dot_general x2" in result.report.skipped["attn/tied"]
    lowered = [jax.jit(m.apply).lower(v, x).cost_analysis()["flops"]
               for m, v in ((model, variables), (result.module, result.variables))]
    assert result.report.speedup == pytest.approx(lowered[0] / lowered[1], rel=1e-6)


class CastDense(nn.Module):
    """flaxformer's ``DenseGeneral`` at ``dtype=jnp.bfloat16`` (its MoE router's default): data
    and kernel cast down by its own code, its float32 bias cast too and added."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (16, 24))
        bias = self.param("bias", nn.initializers.normal(0.1), (24,))
        out = jax.lax.dot_general(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16),
                                  (((x.ndim - 1,), (0,)), ((), ())))
        return out + jnp.asarray(bias, jnp.bfloat16)


def test_a_product_cast_down_by_its_code_keeps_its_dtype():
    """The layer its product runs as computes in its parameters' dtype; its output takes the
    product's own (bfloat16) before the code adds its cast bias (before: "lax.add requires
    arguments to have the same dtypes" from inside lrjax)."""
    x = jax.random.normal(jax.random.key(0), (4, 16))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(CastDense(name="router")(x).astype(jnp.float32))

    model = Net()
    variables = init(model, 0, x)
    want = model.apply(variables, x)
    full = lrjax.decompose_linen(model, variables, x, rule={"router": 16})
    got = full.module.apply(full.variables, x)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=0.02 * float(jnp.abs(want).max()))  # (bfloat16)
    half = lrjax.decompose_linen(model, variables, x, rule={"router": 8}, calibration=x)
    assert half.report.speedup > 1


class CastProduct(nn.Module):
    """``x.astype(bf16) @ w.astype(bf16)``: the kernel's cast is its code's whole
    reparametrization."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (16, 32))
        return x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)


def test_a_split_of_a_product_cast_down_saves_only_the_casts_it_saves():
    """Its pair computes in bfloat16 too, casting its factors: the split saves the casts of the
    parameters it no longer has, not the kernel's whole cast (the report said 1.2752 where
    XLA's lowered count moves 1.2508)."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.LayerNorm(dtype=jnp.bfloat16)(CastProduct(name="w")(x)))
            return nn.Dense(16, dtype=jnp.bfloat16)(h) + nn.Dense(16, dtype=jnp.bfloat16)(x)

    model = Net()
    variables = init(model, 0, x)
    for rule in ({"w": 4}, "speedup:1.5"):
        result = lrjax.decompose_linen(model, variables, x, rule=rule)
        lowered = [jax.jit(m.apply).lower(v, x).cost_analysis()["flops"]
                   for m, v in ((model, variables), (result.module, result.variables))]
        assert result.report.speedup == pytest.approx(lowered[0] / lowered[1], rel=1e-9)
