"""Autoregressive decoding of a decomposed language model with a KV cache, as Flax's examples
(lm1b, wmt) decode: the trained model's variables, the same model built with ``decode=True``,
one token per call with ``mutable=["cache"]``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import costs, surgery
from lrjax.layers import LowRankModel

L, VOCAB = 8, 32
TOKENS = jax.random.randint(jax.random.key(0), (2, L), 0, VOCAB)


class TinyLM(nn.Module):
    """Embedding, one causal attention block (Flax's ``MultiHeadDotProductAttention``, its cache
    in ``decode`` mode), a feed-forward block, logits."""
    decode: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, 32, name="embed")(tokens)
        mask = None if self.decode else nn.make_causal_mask(tokens)
        x = x + nn.MultiHeadDotProductAttention(4, qkv_features=32, decode=self.decode,
                                                name="attention")(x, mask=mask)
        x = x + nn.Dense(32, name="down")(nn.gelu(nn.Dense(64, name="up")(x)))
        return nn.Dense(VOCAB, name="logits")(x)


def _decoded(model, params, tokens):
    """``model`` (built with ``decode=True``) run one position at a time, teacher-forced: the
    logits of every position, from its cache."""
    cache = model.init(jax.random.key(1), tokens)["cache"]
    steps = []
    for t in range(tokens.shape[1]):
        logits, changed = model.apply({"params": params, "cache": cache}, tokens[:, t:t + 1],
                                      mutable=["cache"])
        cache = changed["cache"]
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize("rule", [pytest.param("full", marks=pytest.mark.slow), "speedup:1.5"])
def test_a_decomposed_language_model_decodes_with_its_cache(rule):
    """The split model, built with ``decode=True`` around the same ranks, decodes token by token
    from its KV cache exactly what its whole-sequence call computes (full rank: what the
    original does); the attention projections are among the split layers."""
    model = TinyLM()
    variables = model.init(jax.random.key(2), TOKENS)
    sites = surgery.find_convs(model, TOKENS)
    if rule == "full":
        rule = {s.path: costs.max_rank(s.shape.kernel_shape) for s in sites if s.candidate}
    result = lrjax.decompose_linen(model, variables, TOKENS, rule=rule)
    assert any(path.startswith("attention/") for path, _ in result.module.ranks)
    decoder = LowRankModel.wrap(TinyLM(decode=True), dict(result.module.ranks))
    whole = result.module.apply(result.variables, TOKENS)
    decoded = _decoded(decoder, result.variables["params"], TOKENS)
    np.testing.assert_allclose(decoded, whole, atol=2e-5 * float(jnp.abs(whole).max()))
    if isinstance(rule, dict):
        np.testing.assert_allclose(whole, model.apply(variables, TOKENS),
                                   atol=2e-5 * float(jnp.abs(whole).max()))
