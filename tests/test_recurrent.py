"""Recurrent nets as Flax's own sst2 example writes them: an embedding, a forward and a backward
LSTM under ``nn.RNN`` (the backward one reading each padded sequence flipped within its length,
``jnp.roll`` by each row's own shift under ``jax.vmap``), a dense head. ``nn.LSTMCell``'s dense
layers are split, and ``nn.OptimizedLSTMCell``'s gates as they are (it runs as ``nn.LSTMCell``
over the same variables); a cell written by hand is listed with both of its products (the
recurrent one's hidden state starts as zeros, a constant, and is data from the second step);
the net exports to ONNX with each LSTM kernel stored once, not once per unrolled step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx
from onnx import numpy_helper

import lrjax
from lrjax import export

TOKENS = jax.random.randint(jax.random.key(0), (3, 6), 1, 50)
LENGTHS = jnp.array([6, 4, 2])


@jax.vmap
def flip_sequences(inputs, lengths):
    """As the sst2 example: each sequence reversed within its length, the padding kept last."""
    return jnp.flip(jnp.roll(inputs, inputs.shape[0] - lengths, axis=0), axis=0)


class BiLSTMClassifier(nn.Module):
    cell: type

    @nn.compact
    def __call__(self, tokens, lengths):
        x = nn.Embed(50, 8)(tokens)
        forward = nn.RNN(self.cell(12), name="forward")(x, seq_lengths=lengths)
        backward = flip_sequences(nn.RNN(self.cell(12), name="backward")(
            flip_sequences(x, lengths), seq_lengths=lengths), lengths)
        return nn.Dense(2, name="head")(nn.Dense(24, name="hidden")(
            jnp.concatenate([forward, backward], -1)).mean(1))


@pytest.mark.slow  # 7 s: three decompositions and an unrolled export (the optimized cells'
# test below covers the same net's split and ONNX export in the quick run)
def test_lstm_cells_dense_layers_are_split_and_the_net_exports(tmp_path):
    model = BiLSTMClassifier(nn.LSTMCell)
    variables = model.init(jax.random.key(1), TOKENS, LENGTHS)
    full = lrjax.decompose_linen(model, variables, TOKENS, LENGTHS, rule="energy:1.0")
    assert {f"LSTMCell_{i}/{k}" for i in (0, 1) for k in ("ii", "hi", "ho")} <= set(
        full.report.kinds)
    split = lrjax.decompose_linen(model, variables, TOKENS, LENGTHS, rule="speedup:1.2",
                                  calibration=[(TOKENS, LENGTHS)])
    assert split.ranks
    result = export.to_onnx(split.module, split.variables, (TOKENS, LENGTHS),
                            str(tmp_path / "m.onnx"))
    assert result.max_abs_error <= 1e-5 * result.scale and result.scale > 0


@pytest.mark.slow  # 8 s on the 2-core machine: the default run stays under 5 minutes
def test_optimized_lstm_cells_are_split_as_their_gates_and_stored_once(tmp_path):
    """``nn.OptimizedLSTMCell`` multiplies by its gates' kernels concatenated, in its own code;
    it runs as ``nn.LSTMCell`` computes (``lrjax.linen_cells``), from the same variables, so its
    gates are split as dense layers (before: listed as a fixed cost, 77% of this net). Exported
    to ONNX, each kernel is stored once, not once per unrolled step (before: 4x)."""
    model = BiLSTMClassifier(nn.OptimizedLSTMCell)
    variables = model.init(jax.random.key(1), TOKENS, LENGTHS)
    full = lrjax.decompose_linen(model, variables, TOKENS, LENGTHS, rule="energy:1.0")
    gates = {f"OptimizedLSTMCell_{i}/{k}" for i in (0, 1) for k in ("ii", "if", "hg", "ho")}
    assert gates <= set(full.report.kinds) and not full.report.skipped
    ranks = {p: min(np.shape(k)[-2:]) for p, k in full.problem.kernels.items() if "Cell" in p}
    exact = lrjax.decompose_linen(model, variables, TOKENS, LENGTHS, rule=ranks)
    want = model.apply(variables, TOKENS, LENGTHS)
    np.testing.assert_allclose(exact.module.apply(exact.variables, TOKENS, LENGTHS), want,
                               atol=2e-5 * float(jnp.abs(want).max()))
    split = lrjax.decompose_linen(model, variables, TOKENS, LENGTHS, rule="speedup:1.5",
                                  calibration=[(TOKENS, LENGTHS)])
    assert any("Cell" in p for p in split.ranks)
    result = export.to_onnx(split.module, split.variables, (TOKENS, LENGTHS),
                            str(tmp_path / "m.onnx"))
    assert result.max_abs_error <= 1e-5 * result.scale
    stored = sum(numpy_helper.to_array(t).nbytes
                 for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer)
    weights = sum(a.nbytes for a in jax.tree.leaves(split.variables))
    assert stored < 1.5 * weights, (stored, weights)  # before: 4x, once per step


class Kernel(nn.Module):
    shape: tuple

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.lecun_normal(), self.shape)


class FusedCell(nn.RNNCellBase):
    """A recurrent cell written by hand: its sublayers' kernels multiplied into the input and
    the hidden state in the cell's own code."""

    features: int

    @nn.compact
    def __call__(self, carry, x):
        half = (self.features, self.features // 2)
        recurrent = jnp.concatenate([Kernel(half, name="wa")(), Kernel(half, name="wb")()], 1)
        y = x @ Kernel((x.shape[-1], self.features), name="wi")() + carry @ recurrent
        return jnp.tanh(y), jnp.tanh(y)

    def initialize_carry(self, rng, input_shape):
        return jnp.zeros((*input_shape[:-1], self.features))

    @property
    def num_feature_axes(self) -> int:
        return 1


class HandWrittenRNN(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(2, name="head")(nn.RNN(FusedCell(12))(nn.Embed(50, 8)(tokens)).mean(1))


def test_a_hand_written_cell_is_listed_with_both_products():
    """Before: the recurrent product was missed (the hidden state starts as zeros, a constant,
    and is data from the second step); a product of two sublayers' kernels concatenated is
    named after the module holding both (before: after one of them, ``FusedCell_0/wa``)."""
    model = HandWrittenRNN()
    variables = model.init(jax.random.key(1), TOKENS)
    left = lrjax.decompose_linen(model, variables, TOKENS, rule="energy:1.0").report.skipped
    assert sorted(left) == ["FusedCell_0", "FusedCell_0/wi"]
    assert "here 'wa/kernel', 'wb/kernel' in dot_general, " in left["FusedCell_0"]


class SamplingCell(nn.RNNCellBase):
    """As Flax's seq2seq example's decoder: an LSTM step, logits, a token sampled from them with
    a key split per step (``split_rngs={"lstm": True}``), fed back one-hot."""

    features: int
    vocab: int

    @nn.compact
    def __call__(self, carry, x):
        state, last = carry
        state, y = nn.LSTMCell(self.features)(state, last)
        logits = nn.Dense(self.vocab)(y)
        token = jax.random.categorical(self.make_rng("lstm"), logits)
        prediction = jax.nn.one_hot(token, self.vocab, dtype=jnp.float32)
        return (state, prediction), (logits, prediction)

    @property
    def num_feature_axes(self) -> int:
        return 1


class Seq2seq(nn.Module):
    @nn.compact
    def __call__(self, source, target):
        lengths = jnp.argmax(source[:, :, 1] == 1.0, axis=-1)  # the first end token
        state, _ = nn.RNN(nn.LSTMCell(8), return_carry=True, name="encoder")(
            source, seq_lengths=lengths)
        return nn.RNN(SamplingCell(8, source.shape[-1]), split_rngs={"params": False,
                                                                     "lstm": True},
                      name="decoder")(target[:, :-1], initial_carry=(state, target[:, 0]))


@pytest.mark.slow  # 7 s: a scan unrolled for ONNX and run step by step for LiteRT
def test_a_decoder_sampling_a_token_per_step_exports_to_onnx_and_litert(tmp_path):
    """Before: ONNX failed on the per-step keys (``np.asarray`` of a key array) and on
    ``ArgMax`` of a boolean; LiteRT's converter on the draw inside its ``WHILE`` (no unsigned
    multiply). Each step's draw now folds (ONNX at a fixed batch), as at the top level."""
    source = jax.nn.one_hot(jax.random.randint(jax.random.key(0), (3, 4), 0, 9), 9)
    target = jax.nn.one_hot(jax.random.randint(jax.random.key(1), (3, 3), 0, 9), 9)
    rngs = {"lstm": jax.random.key(2)}
    model = Seq2seq()
    variables = model.init({"params": jax.random.key(3), **rngs}, source, target)
    split = lrjax.decompose_linen(model, variables, source, target, rule="speedup:1.3",
                                  rngs=rngs)
    assert split.ranks
    for exporter, options in ((export.to_onnx, {"fixed_batch": True}), (export.to_tflite, {})):
        result = exporter(split.module, split.variables, (source, target),
                          str(tmp_path / f"m.{exporter.__name__}"), rngs=rngs, **options)
        assert result.max_abs_error <= 1e-5 * result.scale and result.scale > 0


class NNXRecurrent(nnx.Module):
    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(8, 16, rngs=rngs))
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x).mean(1))


def test_nnx_lstm_cells_are_calibrated_through_the_scan_that_carries_them(tmp_path):
    """``nnx.RNN`` carries its cell through ``nnx.scan``: the probes' moments, set inside, changed
    the carry's structure (JAX's "carry input and carry output must have the same pytree
    structure"); they now go to the host, each step's, as a loop's do."""
    model = NNXRecurrent(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 6, 8))
    split = lrjax.decompose_nnx(model, x, rule={"rnn/cell/dense_i": 4, "rnn/cell/dense_h": 6},
                                calibration=x)
    assert split.report.calibrated
    assert set(split.report.weighted_errors) == {"rnn/cell/dense_i", "rnn/cell/dense_h"}
    result = export.to_onnx(split.module, None, (x,), str(tmp_path / "m.onnx"))
    assert result.max_abs_error <= 1e-5 * result.scale and result.scale > 0


class NNXWhile(nnx.Module):
    """A layer run by a ``jax.lax.while_loop`` of the model's own code three times a call (a
    sampler's denoising steps, as openpi's pi0 samples actions)."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(32, 32, rngs=rngs)
        self.step = nnx.Linear(32, 32, rngs=rngs)

    def __call__(self, x):
        def body(carry):
            h, i = carry
            return jnp.tanh(self.step(h)), i + 1

        return jax.lax.while_loop(lambda c: c[1] < 3, body, (self.inp(x), 0))[0]


class LinenWhile(nn.Module):
    """The same in linen, the loop an ``nn.while_loop``."""

    def setup(self):
        self.inp, self.step = nn.Dense(32), nn.Dense(32)

    def __call__(self, x):
        def body(module, carry):
            h, i = carry
            return jnp.tanh(module.step(h)), i + 1

        h = self.inp(x)
        if self.is_initializing():  # (nn.while_loop makes no parameter)
            self.step(h)
        return nn.while_loop(lambda module, c: c[1] < 3, body, self, (h, 0))[0]


def _undersampled(result) -> str:
    return next((n.split(": ")[-1] for n in result.report.notes if "fewer input vectors" in n),
                "")


def test_a_layer_in_a_loop_counts_the_input_vectors_of_every_run():
    """The report's note on calibration data that spans too few directions counts a looped
    layer's input vectors over its runs (before: NNX said "step (1 for 32)" whatever the data,
    linen never named it)."""
    x = jax.random.normal(jax.random.key(0), (4, 32))
    nnx_model, linen_model = NNXWhile(nnx.Rngs(0)), LinenWhile()
    variables = linen_model.init(jax.random.key(0), x)
    ranks = {"inp": 8, "step": 8}
    for size, want in ((8, "inp (8 for 32), step (24 for 32)"), (16, "inp (16 for 32)")):
        data = jax.random.normal(jax.random.key(1), (size, 32))
        assert _undersampled(lrjax.decompose_nnx(nnx_model, x, rule=ranks,
                                                 calibration=data)) == want
        assert _undersampled(lrjax.decompose_linen(linen_model, variables, x, rule=ranks,
                                                   calibration=data)) == want
