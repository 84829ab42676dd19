"""Rank rules parsed once (lrjax.rules), nothing split for nothing, and the traps a model written
by someone else sets: training-mode calls, layers that cannot be split, no candidate at all."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import costs, export, nnx_surgery, problem, rules, surgery
from tests.helpers import apply, init, lowered_flops, xla_flops

X = jnp.ones((2, 12, 12, 3))


class Net(nn.Module):
    """A small linen CNN with batch norm, dropout, a circular transposed conv and a locally
    connected layer (neither can be split)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(16, (3, 3), name="stem")(x))
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.relu(nn.Conv(32, (3, 3), name="body")(x))
        x = nn.Conv(32, (3, 3), name="head_conv")(x)
        x = nn.ConvTranspose(8, (2, 2), strides=(2, 2), padding="CIRCULAR", name="up")(x)
        x = nn.ConvLocal(4, (3, 3), name="local")(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return jnp.mean(x, axis=(1, 2))


@pytest.fixture(scope="module")
def net():
    model = Net()
    return model, init(model, 0, X)


def test_parse_rule_grammar():
    rule = rules.parse_rule("vgg16+measured:onnxruntime,multiple=8,exclude=conv1_*")
    assert (rule.kind, rule.measured, rule.multiple, rule.exclude) == (
        "map", "onnxruntime", 8, ("conv1_*",))
    assert rule.ranks["conv2_1"] == 48 and str(rule).startswith("vgg16")
    assert not rule.allows("conv1_2") and rule.allows("conv2_1")
    assert rule.base().measured is None and rule.base().multiple is None
    inline = rules.parse_rule('{"a": 4, "b": null},include=a,include=c*')
    assert inline.ranks == {"a": 4, "b": None} and inline.include == ("a", "c*")
    assert rules.parse_rule("speedup:2.5").value == 2.5
    assert rules.parse_rule("energy:0.9+measured").with_runtime("litert").measured == "litert"
    assert rules.parse_rule("nin", multiple=1).multiple is None
    for bad, match in [("speedupp:2", "unknown rule kind 'speedupp:'"),
                       ('{"a": 4', "inline rank map is not valid JSON"),
                       ('{"a": 4.5}', "must map layer names to integer ranks"),
                       ("nin,multiple=x", "multiple must be an int"),
                       ("nin+measured:tvm", r"'\+measured:tvm' is not"),
                       ("speedup:1", "must be > 1")]:
        with pytest.raises(ValueError, match=match):
            rules.parse_rule(bad)
    with pytest.raises(ValueError, match="asks for multiple=8 but multiple=16 was given"):
        rules.parse_rule("nin,multiple=8", multiple=16)


def test_unsplittable_layers_are_listed_with_the_reason(net):
    model, variables = net
    result = lrjax.decompose_linen(model, variables, X, rule="speedup:1.5", train=False)
    assert "CIRCULAR padding of a transposed conv" in result.report.skipped["up"]
    assert "ConvLocal" in result.report.skipped["local"]
    table = result.report.table()
    assert "left as is: up: CIRCULAR" in table and "left as is: local: ConvLocal" in table


def test_rules_that_choose_never_split_for_nothing(net):
    model, variables = net
    # energy 1.0 asks for full energy: every rank at or past break-even is kept full
    result = lrjax.decompose_linen(model, variables, X, rule="energy:1.0", train=False)
    assert result.ranks == {}
    assert set(result.report.kept_full) == {"stem", "body", "head_conv"}
    assert "would save nothing" in result.report.kept_full["body"]
    assert "kept full: body: rank" in result.report.table()
    assert result.report.net.speedup == 1.0
    # a map is applied as written, even at full rank (the round-trip tests rely on it)
    top = costs.max_rank((3, 3, 16, 32))
    mapped = lrjax.decompose_linen(model, variables, X, rule={"body": top}, train=False)
    assert mapped.ranks == {"body": top} and mapped.report.kept_full == {}


def test_include_and_exclude_restrict_the_rule(net):
    model, variables = net
    result = lrjax.decompose_linen(model, variables, X, rule="speedup:1.3,exclude=stem",
                                   train=False)
    assert "stem" not in result.ranks and "excluded" in result.report.kept_full["stem"]
    only = lrjax.decompose_linen(model, variables, X, rule='{"stem": 4, "body": 8},include=body',
                                 train=False)
    assert only.ranks == {"body": 8}


def test_training_mode_calls_are_one_line_errors(net, tmp_path):
    model, variables = net
    for call in ({"train": True},):
        with pytest.raises(ValueError, match=r"writes its 'batch_stats' collection .* "
                                             r"train=False") as e:
            lrjax.decompose_linen(model, variables, X, rule="speedup:1.5", calibration=X, **call)
        assert "\n" not in str(e.value)
        with pytest.raises(export.ExportError, match="train=False"):
            export.to_onnx(model, variables, X, str(tmp_path / "m.onnx"), **call)
    assert not (tmp_path / "m.onnx").exists()

    class DropoutOnly(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dropout(0.5, deterministic=not train)(nn.Conv(8, (3, 3))(x))

    drop = DropoutOnly()
    with pytest.raises(ValueError, match=r"draws randomness .*dropout.* train=False"):
        lrjax.decompose_linen(drop, init(drop, 0, X), X, rule="speedup:1.5",
                              train=True)

    class ModeField(nn.Module):  # the mode a field of the model (GAN and DCGAN code does so)
        training: bool = True

        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(not self.training)(nn.Conv(8, (3, 3))(x))

    field = ModeField()
    with pytest.raises(ValueError, match=r"writes its 'batch_stats' collection .*build the model "
                                         r"in inference mode \(ModeField\(\.\.\., "
                                         r"training=False\)\): its field training is True"):
        lrjax.decompose_linen(field, init(field, 0, X), X, rule="speedup:1.5")

    class PortedDepth(nn.Module):  # a port's stochastic depth, built in training mode by its block
        training: bool = True

        @nn.compact
        def __call__(self, x):
            if not self.training:
                return x
            return x * jax.random.bernoulli(self.make_rng("dropout"), 0.5, (x.shape[0], 1, 1, 1))

    class PortedNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return PortedDepth()(nn.Conv(8, (3, 3))(x))

    class ModeBlock(nn.Module):  # the mode a field of a block its model builds so
        train: bool = True

        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(not self.train)(nn.Conv(8, (3, 3))(x))

    class BlockNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return ModeBlock(name="block")(x)

    blocks = BlockNet()
    with pytest.raises(ValueError, match=r"writes its 'batch_stats' collection .*build block in "
                                         r"inference mode \(ModeBlock\(\.\.\., train=False\)\): its "
                                         r"field train is True"):
        lrjax.decompose_linen(blocks, init(blocks, 0, X), X, rule="speedup:1.5")

    ported = PortedNet()  # (before: "pass the inference call's arguments, e.g. train=False")
    variables = ported.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, X)
    with pytest.raises(ValueError, match=r"draws randomness \(PortedDepth_0 needs PRNG .*build "
                                         r"PortedDepth_0 in inference mode \(PortedDepth\(\.\.\., "
                                         r"training=False\)\): its field training is True"):
        lrjax.decompose_linen(ported, variables, X, rule="speedup:1.5")


def test_a_model_given_to_the_other_api_is_one_line_naming_the_right_one(tmp_path):
    """An NNX model given to the linen API, a linen one to the NNX API, a Hugging Face
    ``FlaxPreTrainedModel`` (its ``.module`` is the linen module) to either: a ``TypeError``
    naming the entry point that takes it (before: ``'Linear' object has no attribute 'init'``,
    Flax's ``CallCompactUnboundModuleError``); the exporters say it as an ``ExportError`` and
    write nothing."""
    x = jnp.ones((2, 4))
    linear, dense = nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nn.Dense(4)

    class PreTrained:  # what transformers' FlaxBertModel holds
        module = dense
        params = {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}

    cases = [(lambda: surgery.find_convs(linear, x), "an NNX model: .*decompose_nnx"),
             (lambda: lrjax.decompose_linen(linear, {}, x, rule="speedup:2"), "an NNX model"),
             (lambda: nnx_surgery.find_convs_nnx(dense, x), "a linen module: .*linen API"),
             (lambda: lrjax.decompose_nnx(dense, x, rule="speedup:2"), "decompose_linen"),
             (lambda: lrjax.decompose_linen(PreTrained(), {}, x, rule="speedup:2"),
              r"PreTrained is a wrapper .*its \.module, with \{'params': model\.params\}")]
    for call, match in cases:
        with pytest.raises(TypeError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    for exporter in (export.to_onnx, export.to_tflite):
        with pytest.raises(export.ExportError, match=r"PreTrained is a wrapper"):
            exporter(PreTrained(), {}, (x,), str(tmp_path / "m"))
    assert not list(tmp_path.iterdir())


def test_no_candidates_is_a_clear_error():
    class OnlyLocal(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.ConvLocal(4, (3, 3))(x)

    model = OnlyLocal()
    variables = init(model, 0, X)
    for rule in ("energy:0.9", "speedup:2"):
        with pytest.raises(ValueError, match=r"no layer this rule can decompose \(found "
                                             r"ConvLocal_0: ConvLocal: unshared weights"):
            lrjax.decompose_linen(model, variables, X, rule=rule)
    empty = lrjax.decompose_linen(model, variables, X, rule={})
    assert empty.report.net.speedup == 1.0 and "total" in empty.report.table()


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.9, rngs=rngs)
        self.conv2 = nnx.Conv(16, 16, (3, 3), rngs=rngs)
        self.up = nnx.ConvTranspose(16, 4, (2, 2), strides=(2, 2), padding="CIRCULAR",
                                    rngs=rngs)

    def __call__(self, x):
        return self.up(self.conv2(self.drop(self.bn(self.conv1(x)))))


def test_nnx_calibrates_on_an_eval_view():
    model = NNXNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    model.bn.mean[...] = jnp.full((16,), 0.5)  # running statistics unlike the batch's
    model.bn.var[...] = jnp.full((16,), 4.0)
    rule = {"conv2": 4}
    result = lrjax.decompose_nnx(model, x, rule=rule, calibration=x)
    assert any("eval view" in n for n in result.report.notes)
    assert "CIRCULAR" in result.report.skipped["up"]
    raw = lrjax.decompose_nnx(model, x, rule=rule, calibration=x, eval_mode=False)
    assert raw.report.notes == ()
    # held-out error in eval mode: the eval-view calibration fits the statistics used there
    view = lrjax.nnx_surgery.eval_view
    held_out = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    want = view(model)(held_out)

    def error(m):
        return float(jnp.linalg.norm(view(m)(held_out) - want) / jnp.linalg.norm(want))

    assert error(result.module) < error(raw.module)
    assert model.drop.deterministic is False  # the user's model is untouched
    np.testing.assert_array_equal(model.bn.mean[...], 0.5)


class StochasticDepth(nnx.Module):
    """A stochastic depth of the user's own (jax-ai-stack's MaxViT port): a plain
    ``deterministic`` flag, which Flax's ``Module.eval`` sets but ``nnx.view`` does not."""

    def __init__(self, p, rngs):
        self.p, self.deterministic, self.rngs = p, False, rngs

    def __call__(self, x):
        if self.deterministic:
            return x
        keep = jax.random.bernoulli(self.rngs.dropout(), 1 - self.p, (x.shape[0], 1, 1, 1))
        return x * keep / (1 - self.p)


class DeepNet(nnx.Module):
    def __init__(self, rngs, depth=StochasticDepth):
        self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.drop = depth(0.5, rngs)
        self.conv2 = nnx.Conv(16, 16, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.conv2(x := self.conv1(x)) + self.drop(x)


def test_the_eval_view_sets_the_users_own_deterministic_flags(tmp_path):
    """Before, the user's stochastic depth stayed in training mode under lrjax's eval view: its
    random draws went into the calibration statistics, and ONNX export failed on them."""
    model = DeepNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    view = lrjax.nnx_surgery.eval_view(model)
    assert view.drop.deterministic is True and model.drop.deterministic is False
    np.testing.assert_allclose(view(x), view(x))  # no draw left
    result = lrjax.decompose_nnx(model, x, rule={"conv2": 48}, calibration=[x])  # full rank
    np.testing.assert_allclose(lrjax.nnx_surgery.eval_view(result.module)(x), view(x),
                               rtol=1e-4, atol=1e-5)
    from lrjax import export

    done = export.to_onnx(result.module, None, x, str(tmp_path / "d.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
    assert model.drop.deterministic is False  # the user's model is untouched


class PortedStochasticDepth(nnx.Module):
    """As a torchvision port to NNX writes it: PyTorch's ``training`` flag, set ``True`` by its
    constructor, and the model's stream (``rngs.dropout()``), which ``Module.eval`` leaves
    drawing."""

    def __init__(self, p, rngs, training=True):
        self.p, self.rngs, self.training = p, rngs, training

    def __call__(self, x):
        if not self.training:
            return x
        keep = jax.random.bernoulli(self.rngs.dropout(), 1 - self.p, (x.shape[0], 1, 1, 1))
        return x * keep / (1 - self.p)


def test_the_eval_view_sets_a_ported_models_training_flag(tmp_path):
    """Before, a torchvision port's stochastic depth kept drawing under lrjax's eval view (its
    ``training`` flag is PyTorch's, not Flax's): calibration took its random drops, the report
    said dropout was off, and ONNX export failed on the draw (``random_bits``)."""
    model = DeepNet(nnx.Rngs(0), depth=PortedStochasticDepth)
    model.eval()  # (Flax's own eval mode leaves it drawing)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    assert float(jnp.abs(model(x) - model(x)).max()) > 0
    view = lrjax.nnx_surgery.eval_view(model)
    assert view.drop.training is False and model.drop.training is True
    want = model.conv2(model.conv1(x)) + model.conv1(x)
    np.testing.assert_allclose(view(x), want, rtol=1e-6)
    result = lrjax.decompose_nnx(model, x, rule={"conv2": 48}, calibration=[x])  # full rank
    assert "set on modules of its own: PortedStochasticDepth.training=False" in \
        result.report.notes[0]
    assert not any("draws random" in n for n in result.report.notes)
    np.testing.assert_allclose(lrjax.nnx_surgery.eval_view(result.module)(x), want,
                               rtol=1e-4, atol=1e-5)
    from lrjax import export

    done = export.to_onnx(result.module, None, x, str(tmp_path / "d.onnx"))
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
    assert model.drop.training is True  # the user's model is untouched


class UnknownModeDepth(PortedStochasticDepth):
    """A stochastic depth whose mode flag no convention names (``active``)."""

    def __init__(self, p, rngs):
        super().__init__(p, rngs)
        del self.training
        self.active = True

    def __call__(self, x, rngs=None):
        if not self.active:
            return x
        keep = jax.random.bernoulli((rngs or self.rngs).dropout(), 1 - self.p,
                                    (x.shape[0], 1, 1, 1))
        return x * keep / (1 - self.p)


class UnknownModeNet(DeepNet):
    def __init__(self, rngs):
        super().__init__(rngs, depth=UnknownModeDepth)

    def __call__(self, x, rngs=None):
        return self.conv2(x := self.conv1(x)) + self.drop(x, rngs)


@pytest.mark.slow  # (2-3 s)
def test_an_eval_view_that_still_draws_is_named(tmp_path):
    """A mode lrjax cannot set: the report says the eval view still draws (and from which of
    the model's streams), and export refuses to fix the draws in the graph unless the call is
    given its stream."""
    model = UnknownModeNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    result = lrjax.decompose_nnx(model, x, rule={"conv2": 8})
    note, = [n for n in result.report.notes if "draws random" in n]
    assert "from drop/rngs/default" in note, note
    from lrjax import export

    for exporter, name in ((export.to_onnx, "m.onnx"), (export.to_tflite, "m.tflite")):
        with pytest.raises(export.ExportError, match=r"eval view draws random numbers \(from "
                           r"drop/rngs/default\).*rngs=nnx.Rngs"):
            exporter(result.module, None, x, str(tmp_path / name))
    done = export.to_tflite(result.module, None, x, str(tmp_path / "given.tflite"),
                            rngs=nnx.Rngs(3))  # (its draws fixed: as the caller chose)
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
    clean = lrjax.decompose_nnx(DeepNet(nnx.Rngs(0), PortedStochasticDepth), x, rule={"conv2": 8})
    assert not any("draws random" in n for n in clean.report.notes)


class Translator(nnx.Module):
    """As jax-ai-stack's translation model: ``__call__(..., deterministic=False)`` passes the
    flag to its dropout, which wins over the layer's own attribute."""

    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x, deterministic: bool = False):
        return self.down(self.drop(nnx.relu(self.up(x)), deterministic=deterministic))


def test_the_eval_view_turns_dropout_off_whatever_the_call_passes(tmp_path):
    model = Translator(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6, 8))
    view = lrjax.nnx_surgery.eval_view(model)
    want = model.down(nnx.relu(model.up(x)))  # no dropout
    np.testing.assert_allclose(view(x), want, rtol=1e-6)
    result = lrjax.decompose_nnx(model, x, rule={"up": 8, "down": 8}, calibration=[x])
    np.testing.assert_allclose(lrjax.nnx_surgery.eval_view(result.module)(x), want, atol=1e-5)
    from lrjax import export

    done = export.to_onnx(result.module, None, (x,), str(tmp_path / "t.onnx"))  # (no draw)
    assert done.max_abs_error <= 1e-5 + 1e-4 * done.scale
    assert model.drop.rate == 0.5


class Trained(nnx.Module):
    """Batch norm given its mode by the call (``use_running_average=not train``), the call's
    default training."""

    def __init__(self, rngs):
        self.conv1, self.bn = nnx.Conv(3, 16, (3, 3), rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 8, (3, 3), rngs=rngs)

    def __call__(self, x, train: bool = True):
        return self.conv2(nnx.relu(self.bn(self.conv1(x), use_running_average=not train)))


def test_the_eval_view_uses_running_statistics_whatever_the_call_passes():
    model = Trained(nnx.Rngs(0))
    model.bn.mean[...] = jnp.full((16,), 0.5)  # running statistics unlike the batch's
    model.bn.var[...] = jnp.full((16,), 4.0)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    want = model(x, train=False)
    np.testing.assert_allclose(lrjax.nnx_surgery.eval_view(model)(x), want, rtol=1e-6)
    result = lrjax.decompose_nnx(model, x, rule={"conv2": 24}, calibration=[x])  # full rank
    np.testing.assert_allclose(result.module(x, train=False), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(model.bn.mean[...], 0.5)  # the user's model is untouched
    assert type(model.bn) is nnx.BatchNorm


class WithDense(nn.Module):
    """Convs and a large classifier: the dense layers hold most of the multiply-adds. c2 pads:
    the taps on padding are not multiply-adds, for XLA's flop count as for lrjax."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), padding="VALID", name="c1")(x))
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME", name="c2")(x))
        x = nn.relu(nn.Dense(256, name="fc1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="fc2")(x)


def test_whole_net_cost_matches_xla_and_speedup_is_the_whole_nets():
    model, x = WithDense(), jnp.ones((4, 12, 12, 3))
    variables = init(model, 0, x)
    counts = lrjax.macs.traced_macs(lambda v, x: model.apply(v, x), variables, x)
    taps = 3 * 10 - 2  # c2's taps on its 10x10 input per axis: one off each edge
    conv = 4 * (10 * 10 * 9 * 3 * 16 + taps * taps * 16 * 16)
    dense = 4 * (10 * 10 * 16 * 256 + 256 * 10)
    # element-wise: the biases and ReLUs of c1 and c2 (10x10x16 each), fc1 (256) and fc2's bias
    elementwise = 4 * (2 * 2 * 10 * 10 * 16 + 2 * 256 + 10)
    # every product here multiplies the data by parameters (counted outside a surgery's marks)
    weighted = counts.pop("weighted")
    assert [(o.shape, o.dtype) for o in counts.pop("outputs")] == [((4, 10), jnp.float32)]
    assert [p for _, p, *_ in weighted] == ["conv_general_dilated"] * 2 + ["dot_general"] * 2
    assert sum(m for _, _, m, *_ in weighted) == conv + dense
    assert counts == {"conv": conv, "dot": dense, "total": conv + dense,
                      "elementwise": elementwise, "layers": {}, "branched": set(),
                      "dead": set(), "constant": 0, "rolled": 0, "sampled": False,
                      "xla_flops": 2 * (conv + dense) + elementwise}  # (no loop: the same)
    # XLA's own (compiled) flop count: 2 per multiply-add, plus the element-wise work
    assert xla_flops(lambda v, x: model.apply(v, x), variables, x) == 2 * (conv + dense) + elementwise
    result = lrjax.decompose_linen(model, variables, x, rule={"c2": 4})
    before, after = result.report.net_macs
    assert before == (conv + dense) // 4
    lowrank = lrjax.macs.traced_macs(lambda v, x: result.module.apply(v, x), result.variables, x)
    assert after == lowrank["total"] // 4  # the report's 'after' is the decomposed net's trace
    assert lowrank["elementwise"] == elementwise  # the surgery adds no element-wise work
    assert result.report.macs_speedup == pytest.approx(before / after)
    flops_after = xla_flops(lambda v, x: result.module.apply(v, x), result.variables, x)
    assert result.report.net_flops == ((2 * (conv + dense) + elementwise) // 4, flops_after // 4)
    assert result.report.speedup == pytest.approx((2 * (conv + dense) + elementwise) / flops_after)
    pair = taps * 10 * 16 * 4 + 10 * taps * 4 * 16  # vertical at the input width, horizontal
    kinds = result.report.by_kind()
    assert kinds == {"kxk": (conv // 4, conv // 4 - taps * taps * 16 * 16 + pair),
                     "dense": (dense // 4, dense // 4), "fixed": (0, 0)}
    table = result.report.table()
    assert "whole net:" in table and "dense layers" in table
    assert f"{before:,} -> {int(after):,} multiply-adds per example" in table  # no "1,234.0"
    assert ".0 " not in table and ".0)" not in table
    # speedup:S is the whole net's: out of reach when the layers kept full exceed 1/S
    with pytest.raises(ValueError, match=r"speedup 2.0 is out of reach: the smallest ranks give "
                                         r"1\.\d\dx fewer flops of the whole net \(XLA's count"):
        lrjax.decompose_linen(model, variables, x, rule="speedup:2,exclude=fc*")
    dense_too = lrjax.decompose_linen(model, variables, x, rule="speedup:2")
    assert dense_too.report.speedup >= 2 and "fc1" in dense_too.ranks
    reached = lrjax.decompose_linen(model, variables, x, rule="speedup:1.05")
    assert reached.report.speedup >= 1.05


def test_each_layer_is_decomposed_once(net, monkeypatch):
    """A rule's spectra and the factors applied after it come from one decomposition per layer,
    calibrated or not; on CPU a layer of SPECTRUM_FIRST or more gets its spectrum alone (no
    vectors) and its factors only when it is split, at the rank chosen, with the same result."""
    model, variables = net
    calls = []
    host = lrjax.decompose._host_decompose  # the CPU route, calibrated or not
    monkeypatch.setattr(lrjax.decompose, "_host_decompose", lambda kernel, rank, *a, **k: (
        calls.append((kernel.shape, rank, k.get("values", False))) or host(kernel, rank, *a, **k)))
    for name in ("spectrum_and_factors", "vh_decompose"):
        monkeypatch.setattr(lrjax.decompose, name,
                            lambda *a, **k: pytest.fail("a second decomposition"))
    for calibration in (None, X):
        calls.clear()
        one_pass = lrjax.decompose_linen(model, variables, X, rule="energy:0.8",
                                         calibration=calibration)
        candidates = [s for s in one_pass.problem.sites if s.candidate]
        assert calls == [(c.shape.kernel_shape, None, True) for c in sorted(
            candidates, key=lambda c: -np.prod(c.shape.kernel_shape))] and one_pass.ranks
        with monkeypatch.context() as m:
            m.setattr(problem, "SPECTRUM_FIRST", 27)  # body (48 x 96), head_conv (96 x 96)
            calls.clear()
            spectrum_first = lrjax.decompose_linen(model, variables, X, rule="energy:0.8",
                                                   calibration=calibration)
        assert spectrum_first.ranks == one_pass.ranks
        ranks = {p: r for p, r in one_pass.ranks.items() if r is not None}
        large = {"body", "head_conv"}
        assert large & set(ranks)  # a large layer split: its factors come after the rule
        assert sorted(calls) == sorted(
            [(s.shape.kernel_shape, 0 if s.path in large else None, True) for s in candidates]
            + [(s.shape.kernel_shape, ranks[s.path], False) for s in candidates
               if s.path in large and s.path in ranks])
        want = apply(one_pass.module, one_pass.variables, X)
        np.testing.assert_allclose(apply(spectrum_first.module, spectrum_first.variables, X),
                                   want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(256, name="up")(nn.relu(nn.Dense(32, name="down")(x))), None


class Scanned(nn.Module):
    """A dense layer, then three residual blocks stacked by ``nn.scan`` (kernels (3, 256, 32) and
    (3, 32, 256)), as scanned transformer stacks are written."""

    length: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(256, name="inp")(x)
        x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=self.length)(name="blocks")(x, None)
        return nn.Dense(10, name="out")(x)


class Unrolled(nn.Module):
    """``Scanned`` with its three blocks written out (``b0``, ``b1``, ``b2``)."""

    length: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(256, name="inp")(x)
        for i in range(self.length):
            x, _ = ScanBlock(name=f"b{i}")(x, None)
        return nn.Dense(10, name="out")(x)


class NNXScanBlock(nnx.Module):
    def __init__(self, rngs):
        self.down = nnx.Linear(256, 32, rngs=rngs)
        self.up = nnx.Linear(32, 256, rngs=rngs)

    def __call__(self, x):
        return x + self.up(nnx.relu(self.down(x)))


class NNXScanned(nnx.Module):
    """``Scanned`` in NNX: blocks made by ``nnx.vmap``, run by ``nnx.scan``."""

    def __init__(self, rngs, length: int = 3):
        self.inp = nnx.Linear(256, 256, rngs=rngs)

        @nnx.split_rngs(splits=length)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return NNXScanBlock(rngs)

        self.blocks = blocks(rngs)
        self.out = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.out(run(self.inp(x), self.blocks))


@pytest.mark.slow  # 6 s on the 2-core machine: the default run stays under 5 minutes
def test_scanned_layers_split_as_one_grouped_layer_and_count_per_iteration():
    """Linen layers stacked by ``nn.scan`` are split as one layer of ``stack`` groups (a rank
    shared by the iterations, counted over all of them; stacked factors; calibrated, each
    iteration on its own inputs, as its unrolled twin's layers are); exact at full rank. NNX's
    ``nnx.scan`` over ``nnx.vmap``-made blocks the same."""
    x = jax.random.normal(jax.random.key(1), (4, 256))
    per_example = 256 * 256 + 3 * (256 * 32 + 32 * 256) + 256 * 10  # the scan body 3 times
    model = Scanned()
    variables = init(model, 0, x)
    assert lrjax.macs.traced_macs(lambda v, x: model.apply(v, x), variables, x)["total"] \
        == 4 * per_example
    found = {s.path: s for s in lrjax.surgery.find_convs(model, x)}
    assert found["blocks/down"].stack == 3 and found["blocks/down"].shape.groups == 3
    assert found["blocks/down"].full_macs == 3 * 256 * 32
    want = model.apply(variables, x)
    exact = lrjax.decompose_linen(model, variables, x, rule={"blocks/down": 96, "blocks/up": 96})
    tiled = lrjax.decompose_linen(model, variables, x, rule="speedup:1.2,multiple=12,exclude=inp")
    assert tiled.ranks and all(r % 36 == 0 for p, r in tiled.ranks.items()  # 12 per iteration
                               if p.startswith("blocks/"))
    with pytest.raises(ValueError, match=r"'blocks/down' \(stacked: 3 iterations of a scan, as "
                                         r"groups; its rank counts all of them\): not divisible"):
        lrjax.decompose_linen(model, variables, x, rule={"blocks/down": 16})
    assert exact.variables["params"]["blocks"]["down"]["vertical"]["kernel"].shape == (3, 256, 32)
    np.testing.assert_allclose(exact.module.apply(exact.variables, x), want, rtol=0,
                               atol=1e-5 * float(jnp.abs(want).max()))
    linen = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5,exclude=inp",
                                  calibration=x)
    assert {"blocks/down", "blocks/up"} <= set(linen.ranks) and "inp" not in linen.ranks
    assert all(linen.ranks[p] % 3 == 0 for p in ("blocks/down", "blocks/up"))
    assert not [n for n in linen.report.notes if "fewer input vectors" not in n and  # before:
                "XLA's own flop count" not in n]  # data-free factors for the stacked layers
    assert linen.report.net_macs[0] == per_example and linen.report.speedup >= 1.5
    # each iteration calibrated on its own inputs: the unrolled twin's factors, block by block
    params = variables["params"]
    twin_variables = {"params": {"inp": params["inp"], "out": params["out"], **{
        f"b{i}": jax.tree.map(lambda k, i=i: k[i], params["blocks"]) for i in range(3)}}}
    twin = lrjax.decompose_linen(Unrolled(), twin_variables, x, calibration=x, rule={
        f"b{i}/{name}": linen.ranks[f"blocks/{name}"] // 3 for i in range(3)
        for name in ("down", "up")})
    for i in range(3):
        for name in ("down", "up"):
            scanned = linen.variables["params"]["blocks"][name]
            unrolled = twin.variables["params"][f"b{i}"][name]
            np.testing.assert_allclose(
                scanned["vertical"]["kernel"][i] @ scanned["horizontal"]["kernel"][i],
                unrolled["vertical"]["kernel"] @ unrolled["horizontal"]["kernel"], atol=2e-4)
    np.testing.assert_allclose(linen.module.apply(linen.variables, x),
                               twin.module.apply(twin.variables, x), atol=1e-4)
    free = lrjax.decompose_linen(model, variables, x, rule=dict(linen.ranks))
    after = lrjax.macs.traced_macs(lambda v, x: linen.module.apply(v, x), linen.variables, x)
    assert 4 * linen.report.net_macs[1] == after["total"]  # the report counts every iteration
    down = free.variables["params"]["blocks"]["down"]
    rank = free.ranks["blocks/down"] // 3
    assert down["vertical"]["kernel"].shape == (3, 256, rank)
    assert down["horizontal"]["kernel"].shape == (3, rank, 32)
    for i in range(3):  # iteration i's factors are its own kernel's truncated SVD
        kernel = np.asarray(variables["params"]["blocks"]["down"]["kernel"][i])
        product = np.asarray(down["vertical"]["kernel"][i] @ down["horizontal"]["kernel"][i])
        s = np.linalg.svd(kernel, compute_uv=False)
        assert np.linalg.norm(kernel - product) == pytest.approx(
            np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-3)
    nnx_model = NNXScanned(nnx.Rngs(0))  # nnx.scan over nnx.vmap-made blocks: the same
    split = lrjax.decompose_nnx(nnx_model, x, rule={"blocks/down": 48, "blocks/up": 48})
    pair = split.module.blocks.down
    assert pair.vertical.kernel[...].shape == (3, 256, 16)
    assert pair.horizontal.bias[...].shape == (3, 32)
    kernel = np.asarray(nnx_model.blocks.down.kernel[...][2])
    s = np.linalg.svd(kernel, compute_uv=False)
    assert np.linalg.norm(kernel - np.asarray(
        pair.vertical.kernel[...][2] @ pair.horizontal.kernel[...][2])) == pytest.approx(
        np.sqrt(np.sum(s[16:] ** 2)), rel=1e-3)
    exact = lrjax.decompose_nnx(nnx_model, x, rule={"blocks/down": 96, "blocks/up": 96})
    want = nnx_model(x)
    np.testing.assert_allclose(exact.module(x), want, atol=1e-5 * float(jnp.abs(want).max()))
    # calibrated per iteration, as the linen model holding the same weights is
    calibrated = lrjax.decompose_nnx(nnx_model, x, rule=dict(linen.ranks), calibration=x)
    assert not [n for n in calibrated.report.notes if "data-free" in n]

    def dense(layer):
        return {"kernel": layer.kernel[...], "bias": layer.bias[...]}

    same = {"params": {"inp": dense(nnx_model.inp), "out": dense(nnx_model.out), "blocks": {
        "down": dense(nnx_model.blocks.down), "up": dense(nnx_model.blocks.up)}}}
    twin = lrjax.decompose_linen(model, same, x, rule=dict(linen.ranks), calibration=x)
    np.testing.assert_allclose(calibrated.module(x), twin.module.apply(twin.variables, x),
                               atol=1e-4)


class LocallyConnected(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.ConvLocal(8, (3, 3), name="local")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_out_of_reach_names_the_layers_left_as_they_are():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    model = LocallyConnected()
    with pytest.raises(ValueError, match=r"out of reach: .* including 1 layer left as it is "
                                         r"\(the first: local: ConvLocal: unshared weights"):
        lrjax.decompose_linen(model, init(model, 0, x), x, rule="speedup:3")


class WrittenConv(nn.Module):
    """A masked conv written by hand (a raw ``(out, in, kh, kw)`` parameter masked by a
    constant in ``lax.conv_general_dilated``, which no Flax layer computes): a fixed cost."""
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (self.features, x.shape[-1], 3, 3))
        w = w * np.tril(np.ones((3, 3), np.float32))
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "OIHW", "NHWC"))


class TwoWrittenConvs(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = WrittenConv(64, name="big")(WrittenConv(4, name="small")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_out_of_reach_names_the_largest_layer_left_as_it_is():
    """Of the layers left as they are, the message names the one holding the most multiply-adds
    (as AlgoPerf's Conformer's hand-written subsampling convs were before lrjax split them:
    59.5% of the net in the second, 0.5% in the first, which the message named)."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    model = TwoWrittenConvs()
    with pytest.raises(ValueError, match=r"including 2 layers left as they are \(the largest: "
                                         r"big: its own code .* 'w' in conv_general_dilated, "
                                         r"72\.6% of the net's multiply-adds\)$"):
        lrjax.decompose_linen(model, init(model, 0, x), x, rule="speedup:3")


def test_a_scan_body_counts_once_per_iteration_elementwise_work_too():
    """XLA's cost analysis counts a loop body once; lrjax's whole-net cost counts a scan body's
    multiply-adds and element-wise work once per iteration, as the same loop unrolled counts."""
    w = jax.random.normal(jax.random.key(0), (5, 64, 64))
    x = jax.random.normal(jax.random.key(1), (8, 64))

    def body(h, wi):
        return jax.nn.gelu(h @ wi, approximate=False) * 0.5 + h, jnp.tanh(h).sum()

    def scanned(w, x):
        return jax.lax.scan(body, x, w)

    def unrolled(w, x):
        ys = []
        for i in range(5):
            x, y = body(x, w[i])
            ys.append(y)
        return x, jnp.stack(ys)

    counts = [lrjax.macs.traced_macs(f, w, x) for f in (scanned, unrolled)]
    assert counts[0]["total"] == counts[1]["total"] == 5 * 8 * 64 * 64
    assert counts[1]["elementwise"] > 5 * 8 * 64 * 60  # exact GELU's erf: ~66 flops an element
    assert counts[0]["elementwise"] == pytest.approx(counts[1]["elementwise"], rel=0.01)


class MLPBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(32, name="down")(nn.gelu(nn.Dense(64, name="up")(h))), None


class ScannedMLP(nn.Module):
    """Four residual MLP blocks under a rolled ``nn.scan``."""

    @nn.compact
    def __call__(self, x):
        body = nn.scan(MLPBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=4)(name="blocks")
        return nn.Dense(10, name="head")(body(nn.Dense(32, name="stem")(x), None)[0])


class ScannedMLPNNX(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=4)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return nnx.Sequential(nnx.Linear(32, 64, rngs=rngs), nnx.gelu,
                                  nnx.Linear(64, 32, rngs=rngs))

        self.stem, self.head = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)
        self.blocks = blocks(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, block):
            return h + block(h)

        return self.head(step(self.stem(x), self.blocks))


def test_a_report_gives_xlas_own_count_of_a_net_with_rolled_loops():
    """XLA's ``cost_analysis()`` has a rolled loop's body once, lrjax's whole-net cost every
    iteration: the report says so and gives XLA's own figure, the one a reader checking the
    cost against XLA gets; a net without loops has no such note."""
    x = jax.random.normal(jax.random.key(0), (8, 16))
    model = ScannedMLP()
    variables = init(model, 0, x)
    nnx_model = ScannedMLPNNX(nnx.Rngs(0))
    for result, xla in (
            (lrjax.decompose_linen(model, variables, x, rule="speedup:1.5"),
             lowered_flops(model.apply, variables, x)),
            (lrjax.decompose_nnx(nnx_model, x, rule="speedup:1.5"),
             jax.jit(lambda m, x: m(x)).lower(nnx_model, x).cost_analysis()["flops"])):
        note = [n for n in result.report.notes if n.startswith("XLA's own flop count")]
        assert len(note) == 1 and "the body of its rolled loop (a scan) once" in note[0]
        assert f"{round(xla) // 8:,} flops per example" in note[0]
        every = result.report.net_flops[0]  # (per example: a fraction where the batch's is odd)
        shown = f"{int(every):,}" if float(every).is_integer() else f"{every:,}"
        assert f"against {shown} here with every iteration" in note[0] and every > 2 * xla / 8
    flat = lrjax.decompose_linen(Member(), init(Member(), 0, X := jnp.ones((2, 8, 8, 3))), X,
                                 rule="speedup:1.5")
    assert not [n for n in flat.report.notes if "XLA's own" in n]


class Member(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), name="conv")(x))
        return nn.Dense(10, name="head")(x.mean((1, 2)))


@pytest.mark.slow  # (4 s)
def test_a_scan_of_one_iteration_splits_with_its_iterations_axis():
    """A scan of one iteration (``nn.scan(length=1)``, a one-block ``nnx.vmap`` stack: a model
    configured one layer deep, as openpi's pi0 builds its SigLIP tower for a small variant)
    keeps the iterations' axis on its kernels: split as its iteration's layers, factors
    ``(1, C, K)``, the same as the unrolled block's. Before: "the kernel of layer 'blocks/down'
    has shape (1, 256, 32); the model's layer expects (256, 32)"."""
    x = jax.random.normal(jax.random.key(1), (4, 256))
    model = Scanned(length=1)
    variables = init(model, 0, x)
    found = {s.path: s for s in surgery.find_convs(model, x)}
    assert found["blocks/down"].stack == 1 and found["blocks/down"].stacked
    assert found["blocks/down"].kernel_variable_shape == (1, 256, 32)
    ranks = {"blocks/down": 12, "blocks/up": 12}
    split = lrjax.decompose_linen(model, variables, x, rule=ranks, calibration=x)
    assert split.variables["params"]["blocks"]["down"]["vertical"]["kernel"].shape == (1, 256, 12)
    params = variables["params"]
    twin = lrjax.decompose_linen(Unrolled(length=1), {"params": {
        "inp": params["inp"], "out": params["out"],
        "b0": jax.tree.map(lambda k: k[0], params["blocks"])}}, x, calibration=x,
        rule={"b0/down": 12, "b0/up": 12})
    np.testing.assert_allclose(split.module.apply(split.variables, x),
                               twin.module.apply(twin.variables, x), atol=1e-4)
    by_rule = lrjax.decompose_linen(model, variables, x, rule="speedup:1.2,exclude=inp")
    assert by_rule.report.speedup >= 1.2 and "blocks/down" in by_rule.ranks
    assert by_rule.report.speedup == pytest.approx(
        lowered_flops(lambda v, x: model.apply(v, x), variables, x) /
        lowered_flops(lambda v, x: by_rule.module.apply(v, x), by_rule.variables, x), rel=1e-4)
    nnx_model = NNXScanned(nnx.Rngs(0), length=1)  # a one-block stack: the same
    exact = lrjax.decompose_nnx(nnx_model, x, rule={"blocks/down": 32, "blocks/up": 32})
    assert exact.module.blocks.down.vertical.kernel[...].shape == (1, 256, 32)
    np.testing.assert_allclose(exact.module(x), nnx_model(x), atol=1e-4)


@pytest.mark.parametrize("length,unroll,live", [
    (4, 1, 8), (4, 2, 8),  # run in a loop: every iteration's work, the last's dropped too
    (4, True, 7), (5, 2, 9), (1, 1, 1), (3, 5, 5)])  # the last iteration outside a loop
def test_an_unrolled_scan_counts_the_work_xla_keeps(length, unroll, live):
    """A scan whose second carry the caller drops (a model returning one of two streams, as
    openpi's pi0 drops its PaliGemma stream): XLA runs the iterations it unrolls as
    straight-line code and drops the last one's work on that stream; in a loop it cannot.
    lrjax's whole-net count drops what XLA drops. Before: every iteration's two products
    counted (8 where XLA keeps 7)."""
    w = jax.random.normal(jax.random.key(0), (length, 64, 64))
    x, y = jax.random.normal(jax.random.key(1), (2, 8, 64))

    def run(w, x, y):
        def body(carry, wi):
            a, b = carry
            return (a @ wi + b, jnp.tanh(b @ wi)), None
        return jax.lax.scan(body, (x, y), w, unroll=unroll)[0][0]

    one = 8 * 64 * 64  # one product's multiply-adds
    assert lrjax.macs.traced_macs(run, w, x, y)["total"] == live * one
    steps = length if unroll is True else unroll
    loop_copies = min(length, steps + length % steps)  # the products XLA counts
    kept = live - 2 * (length - loop_copies)  # (a loop body once, as its cost analysis does)
    assert xla_flops(run, w, x, y) // (2 * one) == kept  # (its element-wise work: < 1 product)


class TwoStreams(nn.Module):
    """Two streams through ``length`` unrolled, rematerialized blocks (openpi's Gemma: a
    mixture of two experts under ``nn.scan(nn.remat(...))``), each with a Dense layer and a
    product the block writes with its own parameter; the caller keeps the first stream only."""

    length: int = 4

    @nn.compact
    def __call__(self, x):
        block = nn.remat(TwoStreamBlock, prevent_cse=False)
        return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=self.length, unroll=True)(name="blocks")((x, x), None)[0][0]


class TwoStreamBlock(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        a, b = carry
        return (nn.Dense(64, name="keep")(a) + b,
                jnp.tanh(Mix(name="mix")(nn.Dense(64, name="drop")(b)))), None


class Mix(nn.Module):
    """A product written with the module's own parameter (openpi's ``FeedForward``)."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.lecun_normal(), (64, 64))


@pytest.mark.slow  # (2-3 s)
def test_a_layer_whose_last_unrolled_run_is_dropped_is_costed_as_xla_runs_it():
    """The second stream's layers of :class:`TwoStreams` run four times, but XLA drops their
    last run (the stream's last output is dropped, and the loop is unrolled): they cost three
    runs, and what splitting them saves is three runs' worth. The report's speedup is XLA's
    compiled flop ratio. Before: four runs each, a claimed 1.98x where XLA counts 1.81x."""
    x = jax.random.normal(jax.random.key(1), (8, 64))
    model = TwoStreams()
    variables = init(model, 0, x)
    split = lrjax.decompose_linen(model, variables, x, rule={"blocks/drop": 32, "blocks/mix": 32})
    by_layer = {lc.name: lc.full.macs for lc in split.report.net.layers}
    assert by_layer["blocks/drop"] == by_layer["blocks/mix"] == 3 * 64 * 64  # per example
    assert by_layer["blocks/keep"] == 4 * 64 * 64
    before, after = split.report.net_macs
    assert after * 8 == lrjax.macs.traced_macs(
        lambda v, x: split.module.apply(v, x), split.variables, x)["total"]
    assert split.report.speedup == pytest.approx(
        xla_flops(lambda v, x: model.apply(v, x), variables, x)
        / xla_flops(lambda v, x: split.module.apply(v, x), split.variables, x), rel=2e-3)
    nnx_model = NNXTwoStreams(nnx.Rngs(0))  # the same in NNX: nnx.scan(unroll=True)
    nnx_split = lrjax.decompose_nnx(nnx_model, x, rule={"blocks/drop": 32})
    by_layer = {lc.name: lc.full.macs for lc in nnx_split.report.net.layers}
    assert by_layer["blocks/drop"] == 3 * 64 * 64 and by_layer["blocks/keep"] == 4 * 64 * 64

    def nnx_flops(module):
        graph, state = nnx.split(module)
        return xla_flops(lambda s, x: nnx.merge(graph, s)(x), state, x)

    assert nnx_split.report.speedup == pytest.approx(
        nnx_flops(nnx_model) / nnx_flops(nnx_split.module), rel=2e-3)


class NNXTwoStreamBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.keep = nnx.Linear(64, 64, rngs=rngs)
        self.drop = nnx.Linear(64, 64, rngs=rngs)


class NNXTwoStreams(nnx.Module):
    """:class:`TwoStreams` in NNX: four blocks stacked by ``nnx.vmap``, run by
    ``nnx.scan(unroll=True)``; the caller keeps the first stream."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=4)
        @nnx.vmap(in_axes=0, out_axes=0)
        def blocks(rngs):
            return NNXTwoStreamBlock(rngs)

        self.blocks = blocks(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=True)
        def step(carry, block):
            a, b = carry
            return block.keep(a) + b, jnp.tanh(block.drop(b))

        return step((x, x), self.blocks)[0]


class Ensemble(nn.Module):
    """Four members stacked by ``nn.vmap`` (one leading axis on their kernels), one input."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3), name="stem")(x)
        return nn.vmap(Member, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, out_axes=0, axis_size=4)(name="members")(x).mean(0)


def test_vmapped_members_split_like_scanned_layers():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    model = Ensemble()
    variables = init(model, 0, x)
    found = {s.path: s for s in lrjax.surgery.find_convs(model, x)}
    assert found["members/conv"].stack == 4 and found["members/conv"].kind == "kxk"
    full = {p: lrjax.costs.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
            for p, s in found.items() if s.candidate}
    exact = lrjax.decompose_linen(model, variables, x, rule=full)
    want = model.apply(variables, x)
    np.testing.assert_allclose(exact.module.apply(exact.variables, x), want, rtol=0,
                               atol=1e-5 * float(jnp.abs(want).max()))
    split = lrjax.decompose_linen(model, variables, x, rule="speedup:2")
    assert "members/conv" in split.ranks and split.ranks["members/conv"] % 4 == 0
    flops = [jax.jit(lambda v, x, m=m: m.apply(v, x)).lower(v, x).cost_analysis()["flops"]
             for m, v in ((model, variables), (split.module, split.variables))]
    assert flops[0] / flops[1] == pytest.approx(split.report.speedup, rel=1e-6)
    # calibrated, each member on its own run (the members' statistics reach the host from
    # inside the vmap): closer to the model on its calibration data than data-free
    calibrated = lrjax.decompose_linen(model, variables, x, rule=dict(split.ranks),
                                       calibration=x)
    assert not [n for n in calibrated.report.notes if "fewer input vectors" not in n]
    errors = [float(jnp.linalg.norm(r.module.apply(r.variables, x) - want))
              for r in (calibrated, split)]
    assert errors[0] < 0.9 * errors[1]


class Critics(nn.Module):
    """An ensemble of critics stacked by ``nn.vmap`` inside a nested module, as jaxrl2 writes its
    ``StateActionEnsemble``; or one critic under another lifted transform."""

    lift: str = "vmap"

    @nn.compact
    def __call__(self, x):
        if self.lift == "vmap":
            return nn.vmap(Member, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=3)(name="members")(x)
        return {"remat": nn.remat, "jit": nn.jit}[self.lift](Member)(name="members")(x)


class PixelCritic(nn.Module):
    """jaxrl2's ``PixelMultiplexer``: its encoder and its critics are modules held in fields."""

    encoder: nn.Module
    network: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.network(self.encoder(x))


@pytest.mark.parametrize("lift", ["vmap", pytest.param("remat", marks=pytest.mark.slow),
                                  pytest.param("jit", marks=pytest.mark.slow)])
def test_a_lifted_module_in_a_module_held_in_a_field_splits(lift):
    """Flax's ``nn.share_scope`` (how a decomposed model runs its base) moved the scopes of the
    modules held in fields without their recorded paths, and a lifted transform under one took
    its path from the stale one: "rank map names layers the model never called" for
    ``network/members/conv`` (jaxrl2's pixel critic, calibrated)."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    model = PixelCritic(encoder=nn.Conv(8, (3, 3)), network=Critics(lift))
    variables = init(model, 0, x)
    want = model.apply(variables, x)
    found = {s.path: s for s in lrjax.surgery.find_convs(model, x)}
    assert found["network/members/conv"].stack == (3 if lift == "vmap" else 1)
    full = {p: costs.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
            for p, s in found.items() if s.candidate}
    exact = lrjax.decompose_linen(model, variables, x, rule=full)
    np.testing.assert_allclose(exact.module.apply(exact.variables, x), want, rtol=0,
                               atol=1e-5 * float(jnp.abs(want).max()))
    ranks = {"network/members/conv": 12, "network/members/head": 6}
    for calibration in (None, x):
        split = lrjax.decompose_linen(model, variables, x, rule=ranks, calibration=calibration)
        assert split.ranks == ranks
        assert split.module.apply(split.variables, x).shape == want.shape


class DenseLoRA(nn.Module):
    """Flax's own ``nn.share_scope`` example: a LoRA wrapper computing in its base layer's scope
    (``A``, ``B`` beside the ``Dense``'s ``kernel``)."""

    base: nn.Module
    rank: int = 4

    def setup(self):
        nn.share_scope(self, self.base)

    @nn.compact
    def __call__(self, x):
        a = self.param("A", nn.initializers.normal(0.1), (x.shape[-1], self.rank))
        b = self.param("B", nn.initializers.normal(0.1), (self.rank, self.base.features))
        return self.base(x) + x @ a @ b


class LoRANet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(DenseLoRA(nn.Dense(64))(x))
        return nn.Dense(10)(nn.remat(DenseLoRA)(nn.Dense(64))(x))


def test_a_layer_sharing_its_scope_with_a_wrapper_is_costed_as_its_own_work():
    """The wrapper's call has its layer's path (one scope), and its own products were counted
    as more runs of the layer: ``Dense_0`` at 2,432 multiply-adds (its 2,048 and the LoRA's
    384), each saving claimed 1.19x over (report 1.24 where XLA's count moved 1.19x)."""
    x = jax.random.normal(jax.random.key(0), (8, 32))
    model = LoRANet()
    variables = init(model, 0, x)
    for ranks in ({"Dense_0": 8}, {"Dense_1": 8}):
        result = lrjax.decompose_linen(model, variables, x, rule=ranks)
        assert {lc.name: lc.full.macs for lc in result.report.net.layers}["Dense_0"] == 32 * 64
        ratio = lowered_flops(model.apply, variables, x) / lowered_flops(
            result.module.apply, result.variables, x)
        assert result.report.speedup == pytest.approx(ratio, rel=1e-9)


def test_a_sequential_of_lifted_blocks_splits():
    """An ``nn.Sequential`` holds its layers in a field: a remat'ed block among them was not
    found under its path either (before: "rank map names layers the model never called")."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    model = nn.Sequential([nn.Conv(8, (3, 3)), nn.remat(Member)()])
    variables = init(model, 0, x)
    want = model.apply(variables, x)
    ranks = {"layers_1/conv": 12, "layers_1/head": 4}
    for calibration in (None, x):
        split = lrjax.decompose_linen(model, variables, x, rule=ranks, calibration=calibration)
        assert split.ranks == ranks
        got = split.module.apply(split.variables, x)
        assert got.shape == want.shape and not np.allclose(got, want, atol=1e-6)
