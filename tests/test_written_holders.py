"""A product written by hand in a linen module that also calls other modules
(:mod:`lrjax.linen_calls`): google-research/nested-transformer's attention computes its query and
key-value projections with ``nn.DenseGeneral`` layers, then its output projection with its own
``proj_kernel`` in an einsum; CLIP's vision tower, a ``setup`` module, declares its output
projection ``proj`` beside its layers; open_clip's attention computes its fused ``x @
in_proj_weight.T`` and gives what it computes to its ``out_proj`` layer. Each product is a layer
named by its parameter (``attn/proj_kernel``, ``proj``, ``attn/in_proj_weight``), found, costed,
calibrated, split and exported; a call given what a product computes is made from the replay,
once (its dropout draws once, its batch statistics move once, its output is captured once, as
written)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import decompose, linen_cells, surgery
from tests.helpers import init, lowered_flops, normal, whole_net_rule

X = normal(1, (2, 5, 16))


class Attention(nn.Module):
    """NesT's ``MultiHeadAttention`` in short (libml/self_attention.py at 59c0d6a)."""
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        q = nn.DenseGeneral((self.heads, d // self.heads), name="query")(x)
        kv = nn.DenseGeneral((2, self.heads, d // self.heads), name="kv")(x)
        a = jax.nn.softmax(jnp.einsum("blhd,bmhd->bhlm", q, kv[:, :, 0]) / 2.0)
        o = jnp.einsum("bhlm,bmhd->bhld", a, kv[:, :, 1])
        w = self.param("proj_kernel", nn.initializers.lecun_normal(),
                       (self.heads, d // self.heads, d))
        return jnp.einsum("bhld,hdf->blf", o, w) + self.param("bias", nn.initializers.zeros,
                                                              (d,))


class Block(nn.Module):
    """A holder holding a holder: a norm, the attention, a layer scale of its own, and a
    classifier written by hand on the mean of what its calls returned."""

    @nn.compact
    def __call__(self, x):
        x = x + self.param("gamma", nn.initializers.ones, (x.shape[-1],)) * Attention(
            name="attn")(nn.LayerNorm()(x))
        head = self.param("head", nn.initializers.lecun_normal(), (x.shape[-1], 10))
        return nn.gelu(x.mean(1)) @ head


LAYERS = {"attn/query", "attn/kv", "attn/proj_kernel", "head"}


@pytest.fixture(scope="module")
def net():
    model = Block()
    return model, init(model, 0, X)


def test_its_own_products_are_layers_named_by_their_parameters(net):
    model, variables = net
    found = {s.path: s for s in surgery.find_convs(model, X)}
    assert {p for p, s in found.items() if s.candidate} == LAYERS
    assert found["attn/proj_kernel"].written and found["head"].written
    assert found["attn/proj_kernel"].kernel_name == "proj_kernel"
    with linen_cells.as_sublayers():  # an init runs it as written: the same variables
        under = init(model, 0, X)
    jax.tree.map(np.testing.assert_array_equal, under, variables)
    with linen_cells.as_sublayers():
        np.testing.assert_allclose(model.apply(variables, X), model.apply(variables, X))
    full = {"attn/query": 16, "attn/kv": 16, "attn/proj_kernel": 16, "head": 10}
    result = lrjax.decompose_linen(model, variables, X, rule=full)
    shapes = jax.tree.map(jnp.shape, result.variables["params"]["attn"])
    assert shapes["proj_kernel"] == {"vertical": {"kernel": (4, 4, 16)},
                                     "horizontal": {"kernel": (16, 16)}}
    assert shapes["bias"] == (16,)  # its other parameters stay its own
    np.testing.assert_allclose(result.module.apply(result.variables, X),
                               model.apply(variables, X), rtol=1e-5, atol=1e-5)
    made = result.module.init(jax.random.key(3), X)  # a decomposed model's init: its pairs
    assert jax.tree.map(jnp.shape, made) == jax.tree.map(jnp.shape, result.variables)


@pytest.mark.slow  # 6 s on the 2-core machine: the default run stays under 5 minutes
def test_a_whole_net_rule_is_xlas_ratio_calibrated_exported_and_saved(net, tmp_path):
    model, variables = net
    calibration = jax.random.normal(jax.random.key(2), (8, 5, 16))
    for result in whole_net_rule(model, variables, X, "speedup:1.5,multiple=1", calibration,
                                 tmp_path)[:2]:
        assert "attn/proj_kernel" in result.ranks and not result.report.skipped


class Fed(nn.Module):
    """Its product computes what its norm is given, unless ``direct``."""

    @nn.compact
    def __call__(self, x, direct: bool = False):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 16))
        return x @ w + nn.LayerNorm()(x) if direct else nn.LayerNorm()(x @ w)


class Drawn(nn.Module):
    """A shared layer called twice, and a dropout of its own code drawing a key."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        dense = nn.Dense(16)
        h = dense(x) + dense(2 * x)
        if train:
            h = h * jax.random.bernoulli(self.make_rng("dropout"), 0.5, h.shape)
        return h @ self.param("w", nn.initializers.lecun_normal(), (16, 8))


class Both(nn.Module):
    @nn.compact
    def __call__(self, x, direct: bool = False, train: bool = False):
        return Drawn(name="drawn")(Fed(name="fed")(x, direct=direct), train=train)


def test_a_product_feeding_its_call_is_a_layer_and_draws_stay_as_written():
    model = Both()
    variables = init(model, 0, X)
    found = {s.path for s in surgery.find_convs(model, X) if s.candidate}
    assert found == {"fed/w", "drawn/Dense_0", "drawn/w"}
    result = lrjax.decompose_linen(model, variables, X, rule={"drawn/w": 4, "fed/w": 4})
    assert result.ranks == {"drawn/w": 4, "fed/w": 4} and not result.report.skipped
    keys = {"dropout": jax.random.key(7)}  # its own draw: the key it drew as written
    with linen_cells.as_sublayers():
        np.testing.assert_array_equal(model.apply(variables, X, train=True, rngs=keys),
                                      model.apply(variables, X, train=True, rngs=keys))
    exact = lrjax.decompose_linen(model, variables, X, rule={"drawn/w": 8, "fed/w": 16})
    np.testing.assert_allclose(exact.module.apply(exact.variables, X, train=True, rngs=keys),
                               model.apply(variables, X, train=True, rngs=keys),
                               rtol=1e-5, atol=1e-5)
    out, state = exact.module.apply(exact.variables, X, capture_intermediates=True,
                                    mutable=["intermediates"])  # (its calls' outputs, once)
    captured = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert sum("Dense_0" in p for p in captured) == 2
    assert sum("LayerNorm_0" in p for p in captured) == 1
    np.testing.assert_allclose(out, model.apply(variables, X), rtol=1e-5, atol=1e-5)


def test_a_split_product_that_now_feeds_a_call_feeds_it_from_its_pair():
    model = Both()
    variables = init(model, 0, X)
    result = lrjax.decompose_linen(model, variables, X, rule={"fed/w": 4}, direct=True)
    assert result.ranks == {"fed/w": 4}
    pair = result.variables["params"]["fed"]["w"]
    low = jax.tree.map(lambda a: a, variables)  # the original with its kernel of rank 4
    low["params"]["fed"]["w"] = pair["vertical"]["kernel"] @ pair["horizontal"]["kernel"]
    for direct in (True, False):
        np.testing.assert_allclose(result.module.apply(result.variables, X, direct=direct),
                                   model.apply(low, X, direct=direct), rtol=1e-5, atol=1e-5)


class FusedAttention(nn.Module):
    """open_clip's attention as its JAX ports write it: ``setup`` declares ``in_proj_weight``
    (PyTorch's layout, used as ``x @ w.T``) beside an ``out_proj`` layer, given what the
    product computes."""
    dim: int

    def setup(self):
        self.in_proj_weight = self.param("in_proj_weight", nn.initializers.normal(0.1),
                                         (3 * self.dim, self.dim))
        self.out_proj = nn.Dense(self.dim)

    def __call__(self, x):
        q, k, v = jnp.split(x @ self.in_proj_weight.T, 3, axis=-1)
        return self.out_proj(jax.nn.softmax(q @ k.transpose(0, 2, 1) / 4.0) @ v)


class Tower(nn.Module):
    """CLIP's vision tower in short: a ``setup`` module holding its layers, its class token and
    its output projection ``proj`` (``pooled @ self.proj``) declared beside them."""

    def setup(self):
        self.conv1 = nn.Conv(32, (4, 4), strides=4, use_bias=False)
        self.class_embedding = self.param("class_embedding", nn.initializers.normal(0.1), (32,))
        self.attn = FusedAttention(32)
        self.ln_post = nn.LayerNorm()
        self.proj = self.param("proj", nn.initializers.normal(0.1), (32, 16))

    def __call__(self, image):
        x = self.conv1(image).reshape(image.shape[0], -1, 32)
        cls = jnp.broadcast_to(self.class_embedding, (x.shape[0], 1, 32))
        x = jnp.concatenate([cls, x], axis=1)
        return self.ln_post((x + self.attn(x))[:, 0]) @ self.proj


def test_a_setup_modules_own_product_beside_its_layers_is_a_layer():
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    model = Tower()
    variables = init(model, 0, images)
    found = {s.path: s for s in surgery.find_convs(model, images)}
    assert {p for p, s in found.items() if s.candidate} == {
        "conv1", "attn/in_proj_weight", "attn/out_proj", "proj"}
    with linen_cells.as_sublayers():
        jax.tree.map(np.testing.assert_array_equal, init(model, 0, images), variables)
    exact = lrjax.decompose_linen(model, variables, images, rule={"proj": 16})
    assert jax.tree.map(jnp.shape, exact.variables["params"]["proj"]) == {
        "vertical": {"kernel": (32, 16)}, "horizontal": {"kernel": (16, 16)}}
    np.testing.assert_allclose(exact.module.apply(exact.variables, images),
                               model.apply(variables, images), rtol=1e-5, atol=1e-5)
    result = lrjax.decompose_linen(model, variables, images, rule="speedup:1.2",
                                   calibration=jax.random.normal(jax.random.key(2), (8, 16, 16, 3)))
    assert {"proj", "attn/in_proj_weight"} <= set(result.ranks) and not result.report.skipped
    assert result.report.speedup == pytest.approx(
        lowered_flops(model.apply, variables, images)
        / lowered_flops(result.module.apply, result.variables, images), rel=1e-6)
    made = result.module.init(jax.random.key(3), images)
    assert jax.tree.map(jnp.shape, made) == jax.tree.map(jnp.shape, result.variables)


class TorchLinear(nn.Module):
    """A PyTorch port's linear layer: ``weight`` declared in ``setup``, ``x @ weight.T + bias``
    (a setup module's scope is not rewound between calls, unlike a compact one's)."""
    features: int

    def setup(self):
        self.weight = self.param("weight", nn.initializers.normal(0.3), (self.features, 16))
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

    def __call__(self, x):
        return x @ self.weight.T + self.bias


class Dropped(nn.Module):
    """open_clip's attention with a dropout and a batch norm among the calls its product feeds,
    then its output layer a PyTorch port's (a class of its own: its first call here is its
    first anywhere, made as written then)."""

    def setup(self):
        self.in_proj_weight = self.param("in_proj_weight", nn.initializers.normal(0.3), (48, 16))
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm()
        self.out_proj = TorchLinear(16)

    def __call__(self, x, train: bool = False):
        q, k, v = jnp.split(x @ self.in_proj_weight.T, 3, axis=-1)
        a = self.drop(jax.nn.softmax(q @ k.transpose(0, 2, 1)), deterministic=not train)
        return self.out_proj(self.norm(a @ v, use_running_average=not train))


class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        attn = Dropped(name="attn")
        return attn(x + attn(x, train), train)


@pytest.mark.slow  # (2-3 s)
def test_the_calls_a_product_feeds_are_made_once_from_the_first_call_on():
    model = Twice()
    variables = init(model, 0, X)
    keys, mutable = {"dropout": jax.random.key(5)}, ["batch_stats", "intermediates"]
    written = model.apply(variables, X, True, rngs=keys, mutable=mutable,
                          capture_intermediates=True)
    with linen_cells.as_sublayers():  # (its product's layer part of its call, as written)
        ours = model.apply(variables, X, True, rngs=keys, mutable=mutable,
                           capture_intermediates=True)
        jax.tree.map(np.testing.assert_array_equal, ours, written)  # draws, statistics: once
        jax.tree.map(np.testing.assert_array_equal, init(model, 0, X), variables)
    calibration = jax.random.normal(jax.random.key(2), (8, 5, 16))
    result = lrjax.decompose_linen(model, variables, X, rule={"attn/in_proj_weight": 8},
                                   calibration=calibration)
    assert jax.tree.map(jnp.shape, result.variables["params"]["attn"]["in_proj_weight"]) == {
        "vertical": {"kernel": (16, 8)}, "horizontal": {"kernel": (8, 48)}}
    twin = TwinTwice()  # the same net, its product an nn.Dense: the same closed form
    twin_variables = jax.tree.map(lambda a: a, variables)
    twin_variables["params"]["attn"]["in_proj"] = {
        "kernel": twin_variables["params"]["attn"].pop("in_proj_weight").T}
    expected = lrjax.decompose_linen(twin, twin_variables, X, rule={"attn/in_proj": 8},
                                     calibration=calibration)
    np.testing.assert_allclose(result.module.apply(result.variables, X),
                               expected.module.apply(expected.variables, X), rtol=1e-4,
                               atol=1e-5)
    assert result.report.speedup == pytest.approx(
        lowered_flops(model.apply, variables, X)
        / lowered_flops(result.module.apply, result.variables, X), rel=1e-6)


class Twin(Dropped):
    def setup(self):
        self.in_proj = nn.Dense(48, use_bias=False)
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm()
        self.out_proj = TorchLinear(16)

    def __call__(self, x, train: bool = False):
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        a = self.drop(jax.nn.softmax(q @ k.transpose(0, 2, 1)), deterministic=not train)
        return self.out_proj(self.norm(a @ v, use_running_average=not train))


class TwinTwice(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        attn = Twin(name="attn")
        return attn(x + attn(x, train), train)


class PatchEmbedding(nn.Module):
    """NobuoTsukamoto/jax_examples' ViT input layer in short: ``setup`` declares its class token
    and position embedding, its compact ``__call__`` makes the patch conv."""

    def setup(self):
        self.class_token = self.param("class token", nn.initializers.normal(1.0), (1, 1, 16))
        self.pos_emb = self.param("positional embedding", nn.initializers.normal(1.0),
                                  (1, 17, 16))

    @nn.compact
    def __call__(self, x):
        z = jax.lax.collapse(nn.Conv(16, (4, 4), strides=4, use_bias=False)(x), 1, -1)
        z = jnp.concatenate([jnp.repeat(self.class_token, x.shape[0], axis=0), z], axis=1)
        return z + self.pos_emb


class SetupProjection(nn.Module):
    """The same habit with a product of its own: ``kernel`` declared in ``setup``, a conv made
    in the compact call, ``h @ self.kernel``."""

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(), (16, 24))

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(16, (3, 3))(x)).reshape(x.shape[0], -1, 16) @ self.kernel


class Classifier(nn.Module):
    embed: type = PatchEmbedding

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.gelu(nn.Dense(32)(self.embed(name="embed")(x))).mean(1))


IMAGES = normal(4, (2, 16, 16, 3))
CALIBRATION = normal(5, (8, 16, 16, 3))  # (another batch size than the example's)


@pytest.mark.parametrize("embed", [PatchEmbedding, SetupProjection])
def test_a_setup_module_whose_compact_call_makes_layers(embed, tmp_path):
    """A ``setup`` module whose compact call makes its layers runs as a holder: its layers'
    calls traced inside a search for its own products stopped calibration ("unexpected tracer":
    the statistics they sowed in that trace were kept), on a batch of another size than the
    example's with no product of its own, on any batch with one."""
    model = Classifier(embed)
    variables = init(model, 0, IMAGES)
    found = {s.path: s for s in surgery.find_convs(model, IMAGES) if s.candidate}
    own = {"embed/Conv_0"} | ({"embed/kernel"} if embed is SetupProjection else set())
    assert set(found) == {"Dense_0", "Dense_1"} | own
    free, fitted, _ = whole_net_rule(model, variables, IMAGES, {p: 4 for p in own}, CALIBRATION,
                                     tmp_path)
    assert set(fitted.ranks) == own and not fitted.report.skipped and fitted.report.speedup > 1
    assert jax.tree.map(jnp.shape, fitted.module.init(jax.random.key(3), IMAGES)) == \
        jax.tree.map(jnp.shape, fitted.variables)
    top = {p: decompose.max_rank(found[p].shape.kernel_shape) for p in own}
    exact = lrjax.decompose_linen(model, variables, IMAGES, rule=top, calibration=CALIBRATION)
    np.testing.assert_allclose(exact.module.apply(exact.variables, IMAGES),
                               model.apply(variables, IMAGES), rtol=1e-5, atol=1e-5)
