"""Models written for sharded training, and layers Flax's wrappers re-parametrize.

Parameters annotated with ``nn.with_partitioning`` / ``nn.with_logical_partitioning`` (linen
boxes) or ``nnx.with_partitioning`` (NNX ``out_sharding`` metadata) are read through and the
factors come back annotated (:mod:`lrjax.boxes`); layers run by Flax's ``WeightNorm`` /
``SpectralNorm``: ``tests/test_weight_wrappers.py``.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import boxes, export, surgery
from tests.helpers import normal

X = normal(0, (4, 12, 12, 8))
P = nn.with_partitioning
INIT = nn.initializers.lecun_normal()


class Sharded(nn.Module):
    """A conv net annotated as sharded training code annotates it (t5x, maxtext style)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(32, (3, 3), kernel_init=P(INIT, ("h", "w", "in", "model")),
                    bias_init=P(nn.initializers.zeros, ("model",)), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train,
                         scale_init=P(nn.initializers.ones, ("model",)), name="bn")(x)
        x = nn.Conv(32, (1, 1), name="point", kernel_init=nn.with_logical_partitioning(
            INIT, (None, None, "embed", "mlp")))(nn.relu(x))
        x = nn.Conv(16, (3, 3), name="plain")(x)
        return nn.Dense(10, kernel_init=P(INIT, ("embed", "vocab")), name="head")(x.mean((1, 2)))


def _spec(variables):
    return nn.get_partition_spec(variables)["params"]


@pytest.mark.parametrize("calibrated", [False, True])
def test_partitioned_linen_variables_are_read_through_and_given_to_the_factors(calibrated):
    """Before: ``AttributeError: 'Partitioned' object has no attribute 'shape'``."""
    model = Sharded()
    variables = model.init(jax.random.key(1), X)
    full_ranks = {"conv": 24, "point": 32, "plain": 48, "head": 10}
    result = lrjax.decompose_linen(model, variables, X, rule=dict(full_ranks), train=False,
                                   calibration=X if calibrated else None)
    want = model.apply(variables, X)
    got = result.module.apply(result.variables, X)
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))
    spec = _spec(result.variables)
    assert spec["conv"]["vertical"]["kernel"] == jax.sharding.PartitionSpec("h", None, "in", None)
    assert spec["conv"]["horizontal"]["kernel"] == jax.sharding.PartitionSpec(
        None, "w", None, "model")
    assert spec["conv"]["horizontal"]["bias"] == jax.sharding.PartitionSpec("model")
    assert spec["bn"]["scale"] == jax.sharding.PartitionSpec("model")
    point = result.variables["params"]["point"]
    assert isinstance(point["vertical"]["kernel"], nn.LogicallyPartitioned)
    assert point["vertical"]["kernel"].names == (None, None, "embed", None)
    assert point["horizontal"]["kernel"].names == (None, None, None, "mlp")
    assert spec["head"]["vertical"]["kernel"] == jax.sharding.PartitionSpec("embed", None)
    assert spec["head"]["horizontal"]["kernel"] == jax.sharding.PartitionSpec(None, "vocab")
    plain = result.variables["params"]["plain"]  # an unannotated layer stays unannotated
    assert not isinstance(plain["vertical"]["kernel"], nn.meta.AxisMetadata)
    # the annotations place the variables on a mesh, and the model runs on them
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("model", "data"))
    rules = (("embed", "data"), ("mlp", "model"), ("vocab", None))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(result.variables), mesh, rules)
    placed = jax.device_put(nn.meta.unbox(result.variables), shardings)
    np.testing.assert_allclose(jax.jit(result.module.apply)(placed, X), got, atol=1e-6)


def test_a_scanned_stack_keeps_its_stack_axis_name_on_both_factors():
    """``nn.scan`` with ``metadata_params={nn.PARTITION_NAME: "layers"}`` names the stack axis."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.gelu(nn.Dense(16, kernel_init=P(INIT, ("embed", "mlp")), name="fc")(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=3, metadata_params={nn.PARTITION_NAME: "layers"})
            return scan(name="blocks")(x, None)[0]

    x = jax.random.normal(jax.random.key(2), (4, 5, 16))
    model = Stack()
    variables = model.init(jax.random.key(3), x)
    kernel = variables["params"]["blocks"]["fc"]["kernel"]
    assert kernel.names == ("layers", "embed", "mlp") and kernel.value.shape == (3, 16, 16)
    result = lrjax.decompose_linen(model, variables, x, rule={"blocks/fc": 12})
    fc = result.variables["params"]["blocks"]["fc"]
    assert fc["vertical"]["kernel"].names == ("layers", "embed", None)
    assert fc["vertical"]["kernel"].value.shape == (3, 16, 4)
    assert fc["horizontal"]["kernel"].names == ("layers", None, "mlp")
    assert result.module.apply(result.variables, x).shape == x.shape


def test_factor_names_leave_axes_of_another_size_unnamed():
    site = surgery.find_convs(nn.Conv(8, (3, 1)), X)[0]  # a 3x1 conv: kw = 1
    assert boxes.factor_names(site, ("h", "w", "in", "out"), (3, 1, 8, 8), (3, 1, 8, 2),
                              (1, 1, 2, 8)) == (("h", None, "in", None), (None, "w", None, "out"))
    assert boxes.factor_names(site, ("h", "w", "in", "out"), (3, 1, 8, 8), (3, 1, 6, 2),
                              (1, 1, 2, 8))[0] == ("h", None, None, None)


class MisNamed(nn.Module):
    """As Flax's lm1b example annotates its attention: two names for the 3-D query, key and
    value kernels ``(embed, heads, head_dim)`` (Flax checks names only when it shards)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, name="embed")(x)
        return nn.MultiHeadDotProductAttention(num_heads=4, kernel_init=nn.with_logical_partitioning(
            INIT, ("embed", "kv")), name="attention")(x)


def test_annotations_that_do_not_fit_the_kernel_name_no_factor_axis():
    """Before: ``ValueError: zip() argument 2 is longer than argument 1`` from the reboxing."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    model = MisNamed()
    variables = model.init(jax.random.key(1), x)
    result = lrjax.decompose_linen(model, variables, x, rule={"attention/query": 8})
    query = result.variables["params"]["attention"]["query"]
    assert query["vertical"]["kernel"].names == (None, None)
    assert query["horizontal"]["kernel"].names == (None, None, None)
    assert np.shape(query["horizontal"]["kernel"].value) == (8, 4, 8)
    assert result.module.apply(result.variables, x).shape == (2, 6, 32)


def test_nnx_sharding_metadata_is_given_to_the_pair():
    mesh = jax.make_mesh((1, 1), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(8, 32, (3, 3), rngs=rngs, kernel_init=nnx.with_partitioning(
                INIT, (None, None, "data", "model")))
            self.head = nnx.Linear(32, 10, rngs=rngs, kernel_init=nnx.with_partitioning(
                INIT, ("model", None)))

        def __call__(self, x):
            return self.head(nnx.relu(self.conv(x)).mean((1, 2)))

    with jax.set_mesh(mesh):
        model = Net(nnx.Rngs(0))
        result = lrjax.decompose_nnx(model, X, rule={"conv": 24, "head": 10})
        np.testing.assert_allclose(result.module(X), model(X), atol=1e-5)
    conv, head = result.module.conv, result.module.head
    assert conv.vertical.kernel.get_metadata()["out_sharding"] == (None, None, "data", None)
    assert conv.horizontal.kernel.get_metadata()["out_sharding"] == (None, None, None, "model")
    assert head.vertical.kernel.get_metadata()["out_sharding"] == ("model", None)
    assert head.horizontal.kernel.get_metadata()["out_sharding"] == (None, None)


def test_nnx_shardings_given_as_named_shardings_or_specs_keep_their_form():
    """jax-ai-stack's miniGPT annotates ``nnx.with_partitioning(init, NamedSharding(mesh,
    P(None, "model")))``: before, a ``TypeError`` ('NamedSharding' object is not iterable)."""
    mesh = jax.make_mesh((1, 1), ("batch", "model"))
    spec = jax.sharding.PartitionSpec

    def named(*names):
        return jax.sharding.NamedSharding(mesh, spec(*names))

    class Net(nnx.Module):
        def __init__(self, rngs, form):
            self.up = nnx.Linear(8, 32, rngs=rngs, kernel_init=nnx.with_partitioning(
                INIT, form(None, "model")), bias_init=nnx.with_partitioning(
                nnx.initializers.zeros_init(), form("model")))

        def __call__(self, x):
            return nnx.relu(self.up(x))

    x = jax.random.normal(jax.random.key(1), (4, 8))
    for form in (named, spec):
        with jax.set_mesh(mesh) if form is spec else contextlib.nullcontext():
            model = Net(nnx.Rngs(0), form)  # (a bare spec needs a mesh to create it)
            result = lrjax.decompose_nnx(model, x, rule={"up": 8})
            np.testing.assert_allclose(result.module(x), model(x), atol=1e-5)
        up = result.module.up
        assert up.vertical.kernel.get_metadata()["out_sharding"] == form(None, None)
        assert up.horizontal.kernel.get_metadata()["out_sharding"] == form(None, "model")
        assert up.horizontal.bias.get_metadata()["out_sharding"] == form("model")



@pytest.mark.slow  # 4 s: a LiteRT conversion
def test_a_model_under_an_explicit_mesh_exports_to_litert(tmp_path):
    """bonsai's LLaDA runs under an explicit mesh and reshards in its code: its LiteRT export
    failed ("context mesh ... Explicit should match the aval mesh ... Auto" inside jax2tf; here,
    the converter's "'tf.XlaCallModule' op is neither a custom op nor a flex op": JAX's export
    under a mesh writes Shardy's dialect, which the converter does not read)."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 64, rngs=rngs)
            self.down = nnx.Linear(64, 8, rngs=rngs)

        def __call__(self, x):
            h = jax.sharding.reshard(nnx.relu(self.up(x)), jax.sharding.PartitionSpec("data"))
            return self.down(h)

    with jax.set_mesh(mesh):
        model = Net(nnx.Rngs(0))
        x = jax.device_put(jax.random.normal(jax.random.key(1), (4, 16)),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        split = lrjax.decompose_nnx(model, x, rule={"up": 8})
        for convert, name in ((export.to_tflite, "m.tflite"), (export.to_onnx, "m.onnx")):
            done = convert(split.module, None, (x,), str(tmp_path / name))
            assert done.max_abs_error <= export.ATOL + export.RTOL * done.scale
