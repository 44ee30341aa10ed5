"""SequenceToSequence: LSTM with attention and encoder/decoder Transformer; Remat."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffprog as dp
from helpers import fit

MODELS = [dp.rnn_seq2seq(10, 10, 24), dp.transformer_seq2seq(10, 10, 24, 2, 48, 2, 16)]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m.encoder.stages[-1]).__name__)
def test_cached_translation_equals_recomputation_and_lengths_mask_the_source(model, key):
    src = jax.random.randint(key, (3, 8), 2, 10)
    p = model.init(key, (src[0], src[0, :5]))
    lengths = jnp.array([8, 5, 3])
    cached = dp.translate(model, p, src, 7, 1, source_lengths=lengths)
    chex.assert_trees_all_equal(cached, dp.translate(model, p, src, 7, 1, source_lengths=lengths, use_cache=False))
    # padding beyond source_lengths does not matter
    noisy = src.at[2, 3:].set(9)
    chex.assert_trees_all_equal(dp.translate(model, p, noisy, 7, 1, source_lengths=lengths)[2], cached[2])
    logits = jax.jit(model.apply)(p, (src[1], cached[1]), source_lengths=5)
    chex.assert_shape(logits, (7, 10))


def test_transformer_decoder_block_equations(key):
    x, context = jax.random.normal(key, (2, 5, 8))
    block = dp.TransformerBlock(8, 2, 16, causal=True, cross=True)
    p = block.init(key, x, context=context)
    assert list(p) == ["attention", "cross_attention", "feedforward"]
    self_att = dp.AddNorm(dp.Dropout(0.0) @ dp.Attention(2, causal=True))
    cross = dp.AddNorm(dp.Dropout(0.0) @ dp.Attention(2, cross=True))
    ff = dp.AddNorm(dp.Dropout(0.0) @ dp.Dense(8) @ dp.FeedForward(16))
    expected = ff(p["feedforward"], cross(p["cross_attention"], self_att(p["attention"], x), context=context))
    chex.assert_trees_all_close(block(p, x, context=context), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m.encoder.stages[-1]).__name__)
def test_seq2seq_learns_to_reverse(model, key):
    """Teacher-forced training on string reversal (through vmap), then greedy decoding
    reproduces it: training stops once held-out exact match passes 0.8, within 400 steps."""
    def batch(k):
        src = jax.random.randint(k, (32, 5), 2, 10)
        tgt = src[:, ::-1]
        return src, jnp.concatenate([jnp.ones((32, 1), jnp.int32), tgt[:, :-1]], 1), tgt
    src, tin, tgt = batch(key)
    p = model.init(key, (src[0], tin[0]))
    net = jax.vmap(model.apply, (None, 0))

    def loss(p, i):
        src, tin, tgt = batch(jax.random.fold_in(key, i))
        return dp.metrics.cross_entropy(net(p, (src, tin)), tgt)
    test_src, _, test_tgt = batch(jax.random.key(123))
    exact_match = lambda p: float((dp.translate(model, p, test_src, 5, 1) == test_tgt).all(-1).mean())
    p, _ = fit(loss, p, optax.adam(5e-3), 400, until=lambda p: exact_match(p) > 0.8)
    assert exact_match(p) > 0.8


def test_remat_matches_and_differentiates_the_same(key):
    block = dp.TransformerBlock(8, 2, 16)
    x = jax.random.normal(key, (6, 8))
    plain, remat = block ** 3, dp.Remat(block, policy="dots_saveable") ** 3
    p = plain.init(key, x)
    chex.assert_trees_all_equal_structs(p, remat.init(key, x))
    chex.assert_trees_all_close(remat(p, x), plain(p, x), atol=1e-6)
    g = lambda m: jax.grad(lambda p: m(p, x).sum())(p)
    chex.assert_trees_all_close(g(remat), g(plain), atol=1e-5)
    assert "remat" in str(jax.make_jaxpr(jax.grad(lambda p: remat(p, x).sum()))(p))
