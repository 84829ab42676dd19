"""Layers written by hand that lrjax cannot run as a Flax layer: a module that multiplies the
data by its own parameters in a form no Flax layer computes (a weight-normalized conv) is seen
in the traced forward pass and listed as left as it is, with the reason, linen and NNX; products that
are not weights times data (attention's q·k, a fixed filter) are not listed. (A product a Flax
layer computes is split: :mod:`lrjax.linen_products`, :mod:`lrjax.nnx_products`.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import macs, own_code
from tests.helpers import init, normal

X = normal(0, (2, 8, 8, 4))


class ScaledConv(nn.Module):
    """A causal (PixelCNN-style) conv as a PyTorch port writes it: a raw ``(out, in, kh, kw)``
    parameter masked by a constant at run time, then lax in the ``OIHW`` layout: a kernel
    computed from the parameter that no Flax layer computes (and no pair keeps the mask's
    zeros). Normalized instead, it would be a layer: tests/test_reparametrized.py."""
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(1.0), (self.features, x.shape[-1], 3, 3))
        w = w * np.tril(np.ones((3, 3), np.float32))
        return jax.lax.conv_general_dilated(x, w.astype(x.dtype), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "OIHW", "NHWC"))


class Blur(nn.Module):
    """A fixed 3x3 box filter per channel (a constant, not a weight)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        f = jnp.ones((3, 3, 1, c)) / 9.0
        return jax.lax.conv_general_dilated(x, f, (1, 1), "SAME", feature_group_count=c,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), name="stem")(x))
        x = Blur(name="blur")(x)
        x = nn.relu(ScaledConv(32, name="own_conv")(x))
        x = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x.reshape(2, 64, 32))
        w = self.param("head_w", nn.initializers.lecun_normal(), (32, 10))
        return x.mean(1) @ w  # a hand-written classifier, at the top level


def test_hand_written_products_are_listed_as_left_as_they_are():
    model = Mixed()
    variables = init(model, 0, X)
    result = lrjax.decompose_linen(model, variables, X, rule="speedup:1.3")
    skipped = result.report.skipped
    assert set(skipped) == {"own_conv"}  # not the blur, not attention's products
    assert skipped["own_conv"].startswith(own_code.OWN_CODE)
    assert "'weight' in conv_general_dilated" in skipped["own_conv"]
    # the classifier at the top, in a model that calls layers too, is a layer of its own
    assert result.problem.site("head_w").written and "head_w" in result.report.kinds
    share = float(skipped["own_conv"].split(", ")[-1].split("%")[0]) / 100
    own = 2 * (3 * 8 - 2) ** 2 * 32 * 32  # its multiply-adds: the taps on the 8x8 input, batch 2
    net = macs.traced_macs(model.apply, variables, X)["total"]
    assert share == pytest.approx(own / net, abs=1e-3)
    # their work stays fixed cost: the report is still XLA's count of the two passes
    lowered = (jax.jit(model.apply).lower(variables, X).cost_analysis()["flops"]
               / jax.jit(result.module.apply).lower(result.variables, X).cost_analysis()["flops"])
    assert result.report.speedup == pytest.approx(lowered, rel=1e-6)
    assert "left as is: own_conv: its own code" in result.report.table()


class OnlyHandWritten(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(5):
            x = nn.relu(ScaledConv(8, name=f"conv{i}")(x))
        return x


def test_a_net_of_hand_written_layers_says_so_in_one_line():
    model = OnlyHandWritten()
    with pytest.raises(ValueError) as e:
        lrjax.decompose_linen(model, init(model, 0, X), X, rule="speedup:2")
    message = str(e.value)
    assert "\n" not in message and "it calls no conv or dense layer" not in message
    assert "conv0, conv1, conv2, conv3 and 1 more: its own code multiplies" in message


class HandWrittenNNX(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 16, (3, 3), rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 16)))
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        x = nnx.relu(nnx.relu(x @ self.w[...]) @ self.w[...])  # (tied: no layer's)
        return self.head(x.mean((1, 2)))


def test_nnx_hand_written_products_are_listed_too():
    model = HandWrittenNNX(nnx.Rngs(0))
    result = lrjax.decompose_nnx(model, X, rule="speedup:1.2")
    assert list(result.report.skipped) == ["w"]
    assert "'w' in dot_general" in result.report.skipped["w"]


def test_weighted_products_follow_weights_through_calls_and_loops():
    def fn(w, x):
        scaled = jax.jit(lambda w: w * 2.0)(w)  # a weight through a call

        def body(h, _):
            return jnp.tanh(h @ scaled), None  # a weight-tied recurrence

        h, _ = jax.lax.scan(body, x, None, length=3)
        return h @ h.T  # data times data: not a weighted product

    w, x = jnp.ones((4, 4)), jnp.ones((2, 4))
    traced = jax.jit(fn).trace(w, x).jaxpr
    found = macs.weighted_products(traced, [True, False])
    assert [(sorted(s), p, m, d) for s, p, m, _, d in found] == [
        ([0], "dot_general", 3 * 2 * 4 * 4, True)]

    def probed(w, x):  # a product with what a layer computed from weights alone (a MAP head's
        with macs.layer_scope(0):  # query of its learned probe): not a read of its kernel
            query = jnp.tanh(w) @ w
        return x @ query

    traced = jax.jit(probed).trace(w, x).jaxpr
    assert [d for *_, d in macs.weighted_products(traced, [True, False])] == [False]


class ClosedOver(nnx.Module):
    """Layers kept in a closure, as jax-ai-stack's digits diffusion U-Net keeps its residual
    blocks (``self.down_conv1 = forward``, a function closing over its ``nnx.Conv``\\s): NNX does
    not see them as part of the model, so their weights are constants of the trace."""

    def __init__(self, rngs):
        conv = nnx.Conv(4, 32, (3, 3), rngs=rngs)
        self.block = lambda x: nnx.relu(conv(x))
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block(x).mean((1, 2)))


def test_products_with_constants_are_counted_and_named_when_out_of_reach():
    """Their work is fixed cost (no variable of the model holds the weights); when it puts a
    rule out of reach, the message says how much of the net it is and why."""
    model = ClosedOver(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    counts = macs.traced_macs(lambda s, x: nnx.merge(graphdef, s)(x), state, X)
    assert counts["constant"] == 2 * 22 * 22 * 4 * 32  # (SAME: 22 taps on a row of 8, as XLA)
    assert sum(m for _, _, m, *_ in counts["weighted"]) == 2 * 32 * 10  # the head alone
    with pytest.raises(ValueError, match=r"out of reach: .*; (9\d)% of the net's cost multiplies "
                                         r"the data by constants, which are no layer: .*closure"):
        lrjax.decompose_nnx(model, X, rule="speedup:2")
    result = lrjax.decompose_nnx(model, X, rule={"head": 4})  # the layer it sees is split
    assert result.problem.net_constant == counts["constant"] // 2
