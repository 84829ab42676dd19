"""Products written by hand in linen modules that declare their ``kernel`` in ``setup``
(:mod:`lrjax.linen_products`): AlgoPerf's Conformer and DeepSpeech subsample with such a conv,
next to a ReLU, a mask and a second output. The product runs as an ``nn.Conv`` (``nn.Dense``)
bound to the module's scope, so it is found, costed, calibrated, split and exported as that layer;
the rest of the module's code runs as written. A kernel used otherwise stays the module's own
product, a fixed cost."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import export, linen_cells, linen_products, surgery
from tests.helpers import init, lowered_flops, normal, whole_net_rule


class Subsampling(nn.Module):
    """AlgoPerf's ``Conv2dSubsampling`` as written: kernel and bias declared in ``setup``, a
    strided conv of the kernel, the bias, a ReLU, and the paddings subsampled by a conv with a
    constant kernel (a second output)."""
    input_channels: int
    output_channels: int

    def setup(self):
        self.filter_shape = (3, 3, self.input_channels, self.output_channels)
        self.kernel = self.param("kernel", nn.initializers.xavier_uniform(), self.filter_shape)
        self.bias = self.param("bias", nn.initializers.normal(0.1), (self.output_channels,))

    @nn.compact
    def __call__(self, inputs, paddings):
        groups = inputs.shape[3] // self.filter_shape[2]
        outputs = jax.lax.conv_general_dilated(
            lhs=inputs, rhs=self.kernel, window_strides=(2, 2), padding="SAME",
            rhs_dilation=(1, 1), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups)
        outputs = nn.relu(outputs + jnp.reshape(self.bias, (1,) * (outputs.ndim - 1) + (-1,)))
        length = paddings.shape[1]
        pad_len = (length + 1) // 2 * 2 - length
        out_padding = jax.lax.conv_general_dilated(
            lhs=paddings[:, :, None], rhs=jnp.ones([1, 1, 1]), window_strides=(2,),
            padding=[(0, pad_len)], dimension_numbers=("NHC", "HIO", "NHC"))[..., 0]
        return outputs * (1.0 - out_padding[:, :, None, None]), out_padding


class Projection(nn.Module):
    """A dense product written by hand, kernel declared in ``setup``, then a tanh."""
    features_in: int
    features: int

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(),
                                 (self.features_in, self.features))

    def __call__(self, x):
        return jnp.tanh(x @ self.kernel)


class Twice(Projection):
    """Its kernel in two products (a weight-tied pair of layers): no one layer's, kept."""

    def __call__(self, x):
        return jnp.tanh(x @ self.kernel) @ self.kernel

    def norm(self):
        return jnp.sum(self.kernel ** 2)


class Speech(nn.Module):
    @nn.compact
    def __call__(self, x, paddings):
        x, paddings = Subsampling(1, 16, name="sub1")(x[..., None], paddings)
        x, paddings = Subsampling(16, 32, name="sub2")(x, paddings)
        x = x.reshape(*x.shape[:2], -1)
        x = Projection(x.shape[-1], 24, name="proj")(x)
        x = Twice(24, 24, name="kept")(x)
        return nn.Dense(10, name="head")(x), paddings


class WithNorm(Projection):
    def norm_of(self, x):
        return x * jnp.sum(self.kernel ** 2)


class Method(nn.Module):
    """Calls its layer's other method when asked."""

    @nn.compact
    def __call__(self, x, norm: bool = False):
        layer = WithNorm(24, 24, name="layer")
        return layer.norm_of(x) if norm else layer(x)


X = normal(0, (2, 32, 16))
PADDINGS = jnp.zeros((2, 32)).at[1, 24:].set(1.0)


@pytest.fixture(scope="module")
def speech():
    model = Speech()
    return model, init(model, 1, X, PADDINGS)


def _lowered(model, variables):
    return jax.jit(lambda x, p: model.apply(variables, x, p)).lower(
        X, PADDINGS).cost_analysis()["flops"]


def test_written_products_are_found_as_the_layers_they_compute(speech):
    model, _ = speech
    found = {s.path: s for s in surgery.find_convs(model, X, PADDINGS)}
    assert {p: s.kind for p, s in found.items() if s.candidate} == {
        "sub1": "kxk", "sub2": "kxk", "proj": "dense", "head": "dense"}
    assert found["sub2"].shape.kernel_size == (3, 3) and found["sub2"].shape.strides == (2, 2)
    assert found["sub2"].shape.use_bias is False  # the module adds its bias in its own code
    assert "kept" not in found


def test_full_rank_pairs_reproduce_the_model_the_bias_stays_the_modules(speech):
    model, variables = speech
    want = model.apply(variables, X, PADDINGS)
    result = lrjax.decompose_linen(model, variables, X, PADDINGS,
                                   rule={"sub1": 3, "sub2": 48, "proj": 24})
    shapes = jax.tree.map(jnp.shape, result.variables["params"])
    assert shapes["sub2"] == {"bias": (32,), "vertical": {"kernel": (3, 1, 16, 48)},
                              "horizontal": {"kernel": (1, 3, 48, 32)}}
    assert shapes["proj"] == {"vertical": {"kernel": (128, 24)},
                              "horizontal": {"kernel": (24, 24)}}
    got = result.module.apply(result.variables, X, PADDINGS)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])
    assert "left as is: kept" in result.report.table()  # its own product: a fixed cost


@pytest.mark.slow
def test_a_whole_net_rule_is_xlas_ratio_calibrated_exported_and_saved(speech, tmp_path):
    model, variables = speech
    calibration = [(jax.random.normal(jax.random.key(2), (8, 32, 16)), jnp.zeros((8, 32)))]
    free = lrjax.decompose_linen(model, variables, X, PADDINGS, rule="speedup:1.5")
    fitted = lrjax.decompose_linen(model, variables, X, PADDINGS, rule="speedup:1.5",
                                   calibration=calibration)
    for result in (free, fitted):  # (XLA's lowered count leaves out the dense head's bias
        assert {"sub1", "sub2"} & set(result.ranks)  # adds, which lrjax counts: 0.01% here)
        assert result.report.speedup == pytest.approx(
            _lowered(model, variables) / _lowered(result.module, result.variables), rel=5e-4)
    done = export.to_onnx(fitted.module, fitted.variables, (X, PADDINGS),
                          str(tmp_path / "speech.onnx"))
    assert done.checked_batches == (2, 3) and done.max_abs_error <= 1e-5 * max(1.0, done.scale)
    lrjax.save_decomposed(str(tmp_path / "saved"), fitted)
    module, loaded = lrjax.load_decomposed(str(tmp_path / "saved"), model, X, PADDINGS)
    np.testing.assert_array_equal(module.apply(loaded, X, PADDINGS)[0],
                                  fitted.module.apply(fitted.variables, X, PADDINGS)[0])


def test_a_kernel_read_besides_its_product_is_kept_or_a_clear_error():
    """A module holding a kernel declared in ``setup`` may be called by another method as written
    (the kernel stored as its own ``param`` stores it); a split module whose kernel its parent
    reads (``layer.kernel``) is an error naming the layer when decomposed, and one called by
    another method when that method runs: each would compute with a kernel it no longer has."""

    class Norms(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = Twice(24, 24, name="layer")
            return layer(x) + layer.norm()

    x = jax.random.normal(jax.random.key(3), (2, 24))
    norms = Norms()
    norms_variables = init(norms, 0, x)
    assert not [s for s in surgery.find_convs(norms, x) if s.candidate]
    lrjax.decompose_linen(norms, norms_variables, x, rule={})  # runs as written

    class Called(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = Projection(24, 24, name="layer")
            return layer(x) + jnp.sum(layer.kernel)

    called = Called()
    with pytest.raises(ValueError, match=r"layers \['layer'\] were split as the product of their "
                                         r"kernel .* reads that kernel elsewhere"):
        lrjax.decompose_linen(called, init(called, 0, x), x, rule={"layer": 4})

    method = Method()
    variables = init(method, 0, x)
    result = lrjax.decompose_linen(method, variables, x, rule={"layer": 4})
    result.module.apply(result.variables, x)
    with pytest.raises(ValueError, match=r"'layer' was split as the product of its kernel that "
                                         r"its __call__ computes; its method 'norm_of'"):
        result.module.apply(result.variables, x, norm=True)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Projection(16, 16, name="proj")(x) + x, None


class Scanned(nn.Module):
    """A written product in a block stacked by ``nn.scan`` (its kernel per iteration)."""

    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)()(nn.Dense(16)(x), None)
        return nn.Dense(4)(x)


def test_a_written_product_stacked_by_scan_splits_per_iteration():
    x = jax.random.normal(jax.random.key(4), (4, 8))
    model = Scanned()
    variables = init(model, 0, x)
    (site,) = [s for s in surgery.find_convs(model, x) if s.written]
    assert site.path == "ScanScanBlock_0/proj" and site.stack == 3
    result = lrjax.decompose_linen(model, variables, x, rule={site.path: 48})
    assert jax.tree.map(jnp.shape, result.variables["params"]["ScanScanBlock_0"]["proj"]) == {
        "vertical": {"kernel": (3, 16, 16)}, "horizontal": {"kernel": (3, 16, 16)}}
    np.testing.assert_allclose(result.module.apply(result.variables, x),
                               model.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_numpy_variables_run_the_products_as_layers_and_leave_no_verdict(speech):
    """A loaded tree holds NumPy arrays: the products of ``setup`` parameters still run as their
    layers (the trace keeps the arrays it is given), and no call records "no product" for the
    layers a later trace finds."""
    model, variables = speech
    layers = []

    def seen(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and linen_products.is_written_layer(context.module):
            layers.append(context.module.scope.path[-1])
        return next_fun(*args, **kwargs)

    with linen_cells.as_sublayers(), nn.intercept_methods(seen):
        got = model.apply(jax.tree.map(np.asarray, variables), X, PADDINGS)
    assert {"sub1", "sub2", "proj"} <= set(layers)
    np.testing.assert_allclose(got[0], model.apply(variables, X, PADDINGS)[0], rtol=1e-5,
                               atol=1e-6)
    found = {s.path for s in surgery.find_convs(model, X, PADDINGS) if s.candidate}
    assert {"sub1", "sub2", "proj"} <= found


class HelperFeedForward(nn.Module):
    """openpi's ``lora.FeedForward`` as written: parameters declared in ``setup``, a compact
    ``__call__`` computing each product through a helper method of the module's own
    (``self._dot``), the kernel cast to the data's dtype (bfloat16 in its models)."""

    features: int
    hidden: int

    def setup(self):
        self.w_gating = self.param("gating_einsum", nn.initializers.normal(0.2),
                                   (2, self.features, self.hidden))
        self.w_linear = self.param("linear", nn.initializers.normal(0.2),
                                   (self.hidden, self.features))

    @nn.compact
    def __call__(self, x):
        hidden = nn.gelu(self._dot(x, self.w_gating[0])) * self._dot(x, self.w_gating[1])
        return self._dot(hidden, self.w_linear)

    def _dot(self, x, w):
        return jnp.dot(x, w.astype(x.dtype))


class HelperBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + HelperFeedForward(16, 48, name="mlp")(nn.Dense(16, dtype=x.dtype, name="inp")(x))


def test_a_helper_method_its_call_runs_is_part_of_its_product():
    """A helper method that a module's own call runs (``self._dot(x, w)``) is part of that call,
    not another method reading the parameters from outside (a tied embedding's ``attend``):
    the products are split. Before: both left as they are ("whose method '_dot' runs too and
    may read the same parameters"), openpi's every Gemma feed-forward. A kernel its code casts
    to the data's dtype makes a layer, and a pair, computing in that dtype (bfloat16, as the
    model does; before: in float32, the bfloat16 data promoted)."""
    x = jax.random.normal(jax.random.key(5), (6, 16))
    model = HelperBlock()
    variables = init(model, 0, x)
    found = {s.path: s for s in surgery.find_convs(model, x)}
    assert found["mlp/gating_einsum"].candidate and found["mlp/linear"].candidate
    exact = lrjax.decompose_linen(model, variables, x,
                                  rule={"mlp/gating_einsum": 16, "mlp/linear": 16})
    np.testing.assert_allclose(exact.module.apply(exact.variables, x), model.apply(variables, x),
                               atol=1e-5)
    half = x.astype(jnp.bfloat16)
    split = lrjax.decompose_linen(model, variables, half,
                                  rule={"mlp/gating_einsum": 8, "mlp/linear": 8})
    closed = jax.make_jaxpr(lambda v, x: split.module.apply(v, x))(split.variables, half)

    def dots(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                yield e
            for sub in jax.core.jaxprs_in_params(e.params):
                yield from dots(sub)

    operands = {tuple(str(v.aval.dtype) for v in e.invars) for e in dots(closed.jaxpr)}
    assert operands == {("bfloat16", "bfloat16")}, operands


def _calibrated_is_xlas_ratio(model, variables, x):
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5", calibration=x)
    assert result.report.speedup == pytest.approx(
        lowered_flops(model.apply, variables, x)
        / lowered_flops(result.module.apply, result.variables, x), rel=1e-6)


_LIFTS = {
    "jit": nn.jit,
    "jit_of_remat": lambda cls: nn.jit(nn.remat(cls)),
    # per example: the product of one vector (no batch axis) by the kernel, a dense layer still
    "vmap": lambda cls: nn.vmap(cls, variable_axes={"params": None},
                                split_rngs={"params": False}),
}


class Lifted(nn.Module):
    """Two setup modules' written products, each under a lifted transform of its class
    (``nn.jit(Projection)(...)``): the instance the model holds runs ``setup`` in its scope and
    gives its call to a clone of ``Projection``."""
    lift: str

    @nn.compact
    def __call__(self, x):
        lift = _LIFTS[self.lift](Projection)
        h = lift(16, 32, name="first")(x)
        h = lift(32, 32, name="second")(h)
        return nn.Dense(4, name="head")(h)


@pytest.mark.parametrize("lift", sorted(_LIFTS))
def test_a_setup_modules_product_under_a_lifted_transform_of_its_class_splits(lift, tmp_path):
    x = jax.random.normal(jax.random.key(5), (6, 16))
    model = Lifted(lift)
    variables = init(model, 0, x)
    found = {s.path: s.kind for s in surgery.find_convs(model, x) if s.candidate}
    assert found == {"first": "dense", "second": "dense", "head": "dense"}
    full = lrjax.decompose_linen(model, variables, x, rule={"first": 16, "second": 32})
    assert jax.tree.map(jnp.shape, full.variables["params"]["first"]) == {
        "vertical": {"kernel": (16, 16)}, "horizontal": {"kernel": (16, 32)}}
    np.testing.assert_allclose(full.module.apply(full.variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    if lift == "jit":  # (exported, saved and loaded: as any such split)
        whole_net_rule(model, variables, x, "speedup:1.5", x, tmp_path)
    else:
        _calibrated_is_xlas_ratio(model, variables, x)


def _tanh_product(module, h):
    return jnp.tanh(h @ module.kernel)


_OWN_LIFTS = {
    "vmap": lambda f: nn.vmap(f, variable_axes={"params": None}, split_rngs={"params": False}),
    "remat": nn.remat,
    "jit": nn.jit,
}


class TransformsItself(Projection):
    """Its call runs a lifted transform of a function of itself (Flax runs a clone of it in a
    lifted scope at its path: its ``setup`` again, reading the same parameters)."""
    lift: str = "remat"

    def __call__(self, x):
        return _OWN_LIFTS[self.lift](_tanh_product)(self, x)


class TransformsItselfCompact(nn.Module):
    lift: str = "remat"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 32))
        return _OWN_LIFTS[self.lift](lambda module, h: jnp.tanh(h @ kernel))(self, x)


class OwnLift(nn.Module):
    cls: type
    lift: str

    @nn.compact
    def __call__(self, x):
        layer = self.cls(lift=self.lift, name="own") if self.cls is TransformsItselfCompact \
            else self.cls(16, 32, lift=self.lift, name="own")
        return nn.Dense(4, name="head")(layer(x))


@pytest.mark.parametrize("cls, lift", [(TransformsItself, "vmap"), (TransformsItself, "remat"),
                                       (TransformsItself, "jit"),
                                       (TransformsItselfCompact, "vmap")])
def test_a_product_under_a_lifted_transform_of_its_modules_own_code_splits(cls, lift, tmp_path):
    x = jax.random.normal(jax.random.key(6), (6, 16))
    model = OwnLift(cls, lift)
    variables = init(model, 0, x)
    found = {s.path: s.kind for s in surgery.find_convs(model, x) if s.candidate}
    assert found == {"own": "dense", "head": "dense"}
    full = lrjax.decompose_linen(model, variables, x, rule={"own": 16})
    np.testing.assert_allclose(full.module.apply(full.variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    if (cls, lift) == (TransformsItself, "remat"):
        whole_net_rule(model, variables, x, "speedup:1.5", x, tmp_path)
    else:
        _calibrated_is_xlas_ratio(model, variables, x)
