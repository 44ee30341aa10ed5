"""Attention, AddNorm, TransformerBlock, BERT, language models and generation."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import diffprog as dp
from helpers import fit


def reference_attention(p, x, memory, heads, allowed=None):
    """The notes' equations, one head at a time, in plain jnp."""
    proj = lambda a, n: a @ p[n]["weight"] + p[n]["bias"]
    q, k, v = proj(x, "query"), proj(memory, "key"), proj(memory, "value")
    dh = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        logits = q[:, s] @ k[:, s].T / np.sqrt(dh)
        if allowed is not None:
            logits = jnp.where(allowed, logits, -jnp.inf)
        outs.append(jax.nn.softmax(logits, -1) @ v[:, s])
    return jnp.concatenate(outs, -1) @ p["output"]["weight"] + p["output"]["bias"]


def test_self_attention_matches_the_equations(key):
    x = jax.random.normal(key, (5, 8))
    att = dp.Attention(2)
    p = att.init(key, x)
    chex.assert_trees_all_close(att(p, x), reference_attention(p, x, x, 2), atol=1e-5)
    causal = jnp.tril(jnp.ones((5, 5), bool))
    chex.assert_trees_all_close(dp.Attention(2, causal=True)(p, x), reference_attention(p, x, x, 2, causal), atol=1e-5)
    check_grads(lambda p, x: att(p, x), (p, x), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("steps", [dp.kernels.attention.CAUSAL_BLOCK + 6, 2 * dp.kernels.attention.CAUSAL_BLOCK + 1])
def test_causal_attention_in_query_blocks_matches_the_equations(steps, key):
    """Past one block of queries, causal attention skips the keys after each block; values and
    gradients are those of the full masked softmax."""
    x = jax.random.normal(key, (steps, 8))
    att = dp.Attention(2, causal=True)
    p = att.init(key, x)
    causal = jnp.tril(jnp.ones((steps, steps), bool))
    reference = jax.jit(lambda p, x: reference_attention(p, x, x, 2, causal))
    chex.assert_trees_all_close(att(p, x), reference(p, x), atol=1e-5)
    ct = jax.random.normal(jax.random.key(1), (steps, 8))
    grads = [jax.grad(lambda p, x: jnp.sum(f(p, x) * ct), (0, 1))(p, x) for f in (att, reference)]
    chex.assert_trees_all_close(*grads, atol=1e-4)


def test_cross_attention_and_masks(key):
    kx, kc = jax.random.split(key)
    x, context = jax.random.normal(kx, (4, 8)), jax.random.normal(kc, (6, 8))
    att = dp.Attention(4, cross=True)
    p = att.init(key, x)
    chex.assert_trees_all_close(att(p, x, context=context), reference_attention(p, x, context, 4), atol=1e-5)
    # context_lengths hides padded keys: same as the truncated context.
    chex.assert_trees_all_close(att(p, x, context=context, context_lengths=3),
                                att(p, x, context=context[:3]), atol=1e-5)
    # An explicit mask (True = may attend) and return_weights.
    mask = jax.random.bernoulli(key, 0.6, (4, 6)).at[:, 0].set(True)
    y, w = dp.Attention(4, cross=True, return_weights=True)(p, x, context=context, mask=mask)
    chex.assert_trees_all_close(y, reference_attention(p, x, context, 4, mask), atol=1e-5)
    chex.assert_shape(w, (4, 4, 6))
    np.testing.assert_array_equal(np.asarray(w)[:, ~np.asarray(mask)], 0.0)
    chex.assert_trees_all_close(w.sum(-1), jnp.ones((4, 4)), atol=1e-5)
    # A context of another width d_c: init(..., context=) sizes the key and value projections.
    wide = jax.random.normal(kc, (6, 5))
    p = att.init(key, x, context=wide)
    chex.assert_shape([p["key"]["weight"], p["value"]["weight"], p["query"]["weight"]], [(5, 8), (5, 8), (8, 8)])
    chex.assert_trees_all_close(att(p, x, context=wide), reference_attention(p, x, wide, 4), atol=1e-5)


def test_self_attention_lengths_match_truncation(key):
    x = jax.random.normal(key, (7, 8))
    for att in (dp.Attention(2), dp.Attention(2, causal=True)):
        p = att.init(key, x)
        chex.assert_trees_all_close(att(p, x, lengths=4)[:4], att(p, x[:4]), atol=1e-5)
        chex.assert_trees_all_close(jax.jit(att.apply)(p, x, lengths=jnp.int32(4))[:4], att(p, x[:4]), atol=1e-5)


@pytest.mark.parametrize("score", ["general", "concat"])
def test_attention_with_the_notes_scores(score, key):
    x = jax.random.normal(key, (5, 8))
    att = dp.Attention(2, score=score, causal=True, return_weights=True)
    p = att.init(key, x)
    y, w = att(p, x)
    layer = dp.soft.score_layer(score)
    q = (x @ p["query"]["weight"] + p["query"]["bias"]).reshape(5, 2, 4)
    k = (x @ p["key"]["weight"] + p["key"]["bias"]).reshape(5, 2, 4)
    t = 3
    expected = jax.nn.softmax(layer(p["score"], (q[t, 1], k[: t + 1, 1])))
    chex.assert_trees_all_close(w[1, t, : t + 1], expected, atol=1e-5)
    check_grads(lambda p: att(p, x)[0], (p,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_attention_dropout_only_with_a_key(key):
    x = jax.random.normal(key, (6, 8))
    att = dp.Attention(2, dropout=0.5, return_weights=True)
    p = att.init(key, x)
    plain, w = att(p, x)
    chex.assert_trees_all_close(plain, dp.Attention(2)(p, x), atol=1e-5)  # no key: no dropout
    dropped, w_k = att(p, x, key=jax.random.key(3))
    assert not np.allclose(dropped, plain)
    chex.assert_trees_all_close(w_k, w)  # the returned weights are the undropped softmax
    other, _ = att(p, x, key=jax.random.key(4))
    assert not np.allclose(dropped, other)


def test_attention_errors(key):
    with pytest.raises(dp.LayerError, match=r"Attention\(3\): model width 8 is not divisible by 3 heads"):
        dp.Attention(3).init(key, jnp.ones((4, 8)))
    att = dp.Attention(2)
    p = att.init(key, jnp.ones((4, 8)))
    with pytest.raises(dp.LayerError, match=r"expected mask= bool \(4, 4\), got \(4, 5\)"):
        att(p, jnp.ones((4, 8)), mask=jnp.ones((4, 5), bool))
    with pytest.raises(dp.LayerError, match=r"Attention\(2\): expected input \(T, 8\)"):
        att(p, jnp.ones((4, 6)))
    with pytest.raises(dp.LayerError, match="needs context="):
        dp.Attention(2, cross=True)(p, jnp.ones((4, 8)))
    with pytest.raises(dp.LayerError, match="unexpected side input"):
        att(p, jnp.ones((4, 8)), context=jnp.ones((3, 8)))


BATCH_CASES = [
    (dp.Attention(2, causal=True), {"lengths": jnp.array([5, 2, 4])}),
    (dp.Attention(2, return_weights=True), {"mask": jnp.tril(jnp.ones((3, 5, 5), bool), 1)}),
    (dp.Attention(2, cross=True), {"context": jnp.linspace(-1, 1, 3 * 6 * 4).reshape(3, 6, 4),
                                   "context_lengths": jnp.array([6, 1, 3])}),
    (dp.TransformerBlock(4, 2, 8, causal=True, pre_norm=True), {"lengths": jnp.array([5, 2, 4])}),
    (dp.FeedForward(3) @ dp.LayerNorm() @ dp.Dense(4), {}),
]


@pytest.mark.parametrize("layer,side", BATCH_CASES, ids=lambda c: repr(c) if isinstance(c, dp.Layer) else "")
def test_batch_path_matches_vmap(layer, side, key):
    """apply_batch projects all B·T positions at once (Dense, LayerNorm, the attention
    projections) and attends per example: the same values and gradients as vmap of apply."""
    xs = jax.random.normal(key, (3, 5, 4))
    p = layer.init(key, xs[0], **jax.tree.map(lambda a: a[0], side))
    by_vmap = lambda p, xs: jax.vmap(lambda x, s: layer.apply(p, x, **s))(xs, side)
    by_batch = lambda p, xs: layer.apply_batch(p, xs, **side)
    chex.assert_trees_all_close(jax.jit(by_batch)(p, xs), jax.jit(by_vmap)(p, xs), atol=1e-5)
    loss = lambda run: lambda p, xs: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(run(p, xs)))
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(by_batch), (0, 1)))(p, xs),
                                jax.jit(jax.grad(loss(by_vmap), (0, 1)))(p, xs), atol=1e-5)


def test_addnorm_post_and_pre(key):
    x = jax.random.normal(key, (3, 6))
    f = dp.Dense(6)
    post, pre = dp.AddNorm(f), dp.AddNorm(f, pre_norm=True)
    p = post.init(key, x)
    ln = lambda v: dp.LayerNorm()(p["norm"], v)
    chex.assert_trees_all_close(post(p, x), ln(x + f(p["f"], x)), atol=1e-6)
    chex.assert_trees_all_close(pre(p, x), x + f(p["f"], ln(x)), atol=1e-6)


def test_transformer_block_is_the_notes_one_liner(key):
    x = jax.random.normal(key, (5, 8))
    block = dp.TransformerBlock(8, 2, 16)
    p = block.init(key, x)
    attention = dp.AddNorm(dp.Dropout(0.0) @ dp.Attention(2))
    feedforward = dp.AddNorm(dp.Dropout(0.0) @ dp.Dense(8) @ dp.FeedForward(16))
    chex.assert_trees_all_close(block(p, x), feedforward(p["feedforward"], attention(p["attention"], x)), atol=1e-5)
    check_grads(lambda p: block(p, x), (p,), order=1, modes=["rev"], atol=3e-2, rtol=3e-2)


def test_positions(key):
    x = jnp.zeros((6, 8))
    learned = dp.LearnedPositions(10)
    p = learned.init(key, x)
    chex.assert_trees_all_close(learned(p, x), p["table"][:6])
    with pytest.raises(dp.LayerError, match="longer than the positional table"):
        learned(p, jnp.zeros((11, 8)))
    s = dp.SinusoidalPositions()({}, x)
    np.testing.assert_allclose(s[3, 0], np.sin(3.0), rtol=1e-6)
    np.testing.assert_allclose(s[3, 4], np.cos(3.0), rtol=1e-6)
    np.testing.assert_allclose(s[2, 1], np.sin(2 / 10000 ** (2 / 8)), rtol=1e-5)


def test_bert_is_one_scan_whatever_the_depth(key):
    ids = jnp.arange(6) % 50
    def equations(depth):
        model = dp.bert(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        num_hidden_layers=depth, max_position_embeddings=8, head=None)
        p = model.init(key, ids)
        return len(jax.make_jaxpr(model.apply)(p, ids).jaxpr.eqns), model, p
    n24, model, p = equations(24)
    n2, _, _ = equations(2)
    assert n24 <= n2
    block = "TransformerBlock(16, 2, 32, dropout=0.1, activation='gelu', eps=1e-12, attention_dropout=0.1)"
    assert repr(model) == (f"{block}^24 ∘ Dropout(0.1) ∘ LayerNorm(eps=1e-12) ∘ EmbedSegment(2) ∘ "
                           "LearnedPositions(8) ∘ EmbedToken(50, 16)")
    chex.assert_shape(p["encoder"]["stack"]["attention"]["norm"]["scale"], (24, 16))
    chex.assert_shape(model(p, ids), (6, 16))


LM_BODIES = [dp.TransformerBlock(16, 2, 32, causal=True) ** 2, dp.LSTM(16) ** 2, dp.SimpleRNN(16)]


def lm_of(body):
    positions = dp.LearnedPositions(32) if isinstance(body, dp.Repeat) and isinstance(body.layer, dp.TransformerBlock) else None
    return dp.LanguageModel(13, 16, body, positions=positions)


@pytest.mark.parametrize("body", LM_BODIES, ids=repr)
def test_language_model_forms_agree_and_tie_weights(body, key):
    lm = lm_of(body)
    ids = jax.random.randint(key, (7,), 0, 13)
    p = lm.init(key, ids)
    assert "table" in p["embed"] and "head" not in p  # one table: GenerateToken reuses it
    per_position = dp.LanguageModel(**{**lm.__dict__, "per_position": True})
    logits = per_position(p, ids)
    chex.assert_shape(logits, (7, 13))
    chex.assert_trees_all_close(lm(p, ids), logits[-1], atol=1e-5)
    chex.assert_trees_all_close(lm(p, ids, lengths=4), lm(p, ids[:4]), atol=1e-5)
    # causal: logits at position t do not depend on later tokens
    chex.assert_trees_all_close(per_position(p, ids.at[5].set(0))[:5], logits[:5], atol=1e-5)


@pytest.mark.parametrize("body", LM_BODIES, ids=repr)
def test_cached_generation_equals_recomputation(body, key):
    lm = lm_of(body)
    p = lm.init(key, jnp.zeros(4, jnp.int32))
    prompts = jax.random.randint(key, (3, 5), 0, 13)
    cached = dp.generate(lm, p, prompts, 9)
    chex.assert_shape(cached, (3, 9))
    chex.assert_trees_all_equal(cached, dp.generate(lm, p, prompts, 9, use_cache=False))
    sampled = dp.generate(lm, p, prompts, 9, key=key, temperature=0.7, top_k=4)
    chex.assert_trees_all_equal(sampled, dp.generate(lm, p, prompts, 9, key=key, temperature=0.7, top_k=4, use_cache=False))


@pytest.mark.parametrize("body", LM_BODIES, ids=repr)
def test_ragged_prompts_continue_as_each_prompt_alone(body, key):
    """Prompts of different lengths (a list of lists, or padded ids with lengths=): each row's
    tokens equal generating from that prompt alone, greedy and sampled with the row's key;
    the padding is never read; the KV cache or state agrees with recomputation."""
    lm = lm_of(body)
    p = lm.init(key, jnp.zeros(4, jnp.int32))
    prompts = [[3, 4], [5, 6, 7, 1, 2]]
    keys = jax.random.split(jax.random.key(7), 2)
    greedy = dp.generate(lm, p, prompts, 6)
    sampled = dp.generate(lm, p, prompts, 6, key=keys, temperature=2.0)
    for i, prompt in enumerate(prompts):
        chex.assert_trees_all_equal(greedy[i], dp.generate(lm, p, [prompt], 6)[0])
        chex.assert_trees_all_equal(sampled[i], dp.generate(lm, p, [prompt], 6, key=keys[i:i + 1], temperature=2.0)[0])
    padded = jnp.array([[3, 4, 12, 12, 12], [5, 6, 7, 1, 2]])
    chex.assert_trees_all_equal(dp.generate(lm, p, padded, 6, lengths=[2, 5]), greedy)
    chex.assert_trees_all_equal(dp.generate(lm, p, padded, 6, lengths=[2, 5], use_cache=False), greedy)
    chex.assert_trees_all_equal(dp.generate(lm, p, prompts, 6, key=keys, temperature=2.0, use_cache=False), sampled)


def test_generation_stops_at_an_end_token(key):
    """eos=: a row's tokens after its first stop token are pad_id, and its length counts the
    tokens up to and including it (all the steps where none came)."""
    lm = lm_of(LM_BODIES[0])
    p = lm.init(key, jnp.zeros(4, jnp.int32))
    prompts = jax.random.randint(key, (4, 3), 0, 13)
    free = np.asarray(dp.generate(lm, p, prompts, 8, key=key, temperature=3.0))
    stop = int(free[0, 2])
    tokens, lengths = dp.generate(lm, p, prompts, 8, key=key, temperature=3.0, eos=[stop, 99 % 13], pad_id=12)
    for row, n in zip(free, np.asarray(lengths)):
        hits = np.flatnonzero(np.isin(row, [stop, 99 % 13]))
        assert n == (hits[0] + 1 if hits.size else 8)
    assert lengths[0] <= 3
    expected = np.where(np.arange(8) < np.asarray(lengths)[:, None], free, 12)
    np.testing.assert_array_equal(tokens, expected)


PREFILLED = [
    # GPT-2's shape: pre-LN causal blocks (dropout, no key: off), learned positions, a final norm, an untied head
    dp.LanguageModel(13, 16, dp.TransformerBlock(16, 2, 32, causal=True, pre_norm=True, dropout=0.1) ** 3,
                     positions=dp.LearnedPositions(12), final_norm=True, tied=False, head_bias=True, dropout=0.1),
    dp.LanguageModel(13, 16, dp.Remat(dp.TransformerBlock(16, 2, 32, causal=True)) ** 2, positions=dp.SinusoidalPositions),
    dp.LanguageModel(13, 16, dp.LSTM(16) @ dp.TransformerBlock(16, 2, 32, causal=True)),
    # deeper than UNROLLED_UP_TO: stacked params decode a chunk as one scan over the applications
    dp.LanguageModel(13, 16, dp.TransformerBlock(16, 2, 32, causal=True, pre_norm=True) ** 5,
                     positions=dp.LearnedPositions(12), final_norm=True),
    dp.LanguageModel(13, 8, dp.TransformerBlock(8, 2, 16, causal=True) @ dp.Dense(8) @ dp.LSTM(16) ** 5),  # "first" apart
]


@pytest.mark.parametrize("lm", PREFILLED, ids=lambda lm: repr(lm.body))
def test_a_chunk_decodes_as_its_steps(lm, key):
    """`decode` reads a chunk of P steps at once (a prompt: the KV caches written in one pass,
    position-wise layers on all steps); it returns what one-step chunks in a scan
    (`dp.core.decode_steps`, the reference) return, and the same cache, from position 0 and from
    the middle of a sequence."""
    prompt = jax.random.randint(key, (7,), 0, 13)
    p = lm.init(key, prompt)
    cache = lm.init_cache(p, 12)
    decode = jax.jit(lm.decode)
    fast, fast_cache = decode(p, prompt, cache, 0)
    reference, reference_cache = jax.jit(functools.partial(dp.core.decode_steps, lm))(p, prompt, cache)
    chex.assert_shape(fast, (7, 13))
    chex.assert_trees_all_close(fast, reference, atol=1e-5)
    chex.assert_trees_all_close(fast_cache, reference_cache, atol=1e-5)
    first, half = decode(p, prompt[:3], cache, 0)  # two chunks: 3 steps, then 4 from position 3
    rest, halves = decode(p, prompt[3:], half, 3)
    chex.assert_trees_all_close(jnp.concatenate([first, rest]), reference, atol=1e-5)
    chex.assert_trees_all_close(halves, reference_cache, atol=1e-5)
    # and they continue alike: the next step from either cache
    step = lambda c: decode(p, prompt[:1], c, 7)[0]
    chex.assert_trees_all_close(step(fast_cache), step(reference_cache), atol=1e-5)
    with pytest.raises(dp.LayerError, match="past the KV cache"):
        lm.decode(p, prompt, lm.init_cache(p, 6), 0)


STATEFUL = [dp.SimpleRNN(8), dp.LSTM(8), dp.GRU(8), dp.Attention(2, causal=True),
            dp.AddNorm(dp.Attention(2, causal=True), pre_norm=True, norm=dp.RMSNorm()), dp.LearnedPositions(9),
            dp.SinusoidalPositions, dp.TransformerBlock(8, 2, 16, causal=True) ** 2,
            dp.Remat(dp.LSTM(8)) @ dp.TransformerBlock(8, 2, 16, causal=True, pre_norm=True),
            dp.Attention(4, causal=True, kv_heads=2, rotary=10000.0), dp.SelectiveSSM(state=4),
            dp.TransformerBlock(8, 4, 16, causal=True, pre_norm=True, activation="silu", gated=True, use_bias=False,
                                kv_heads=2, rotary=10000.0, norm=dp.RMSNorm())]


@pytest.mark.parametrize("layer", STATEFUL, ids=repr)
def test_every_stateful_layer_decodes_a_chunk_as_its_steps(layer, key):
    """For each layer that carries state through generation, a chunk of P steps equals P
    one-step chunks (`decode_steps`): outputs, and caches, at position 0 and mid-sequence; and
    the outputs are those of `apply` on the whole sequence (causal layers)."""
    xs = jax.random.normal(key, (6, 8))
    p = layer.init(key, xs)
    cache = layer.init_cache(p, 9)
    decode = jax.jit(layer.decode)
    ys, c = decode(p, xs[:4], cache, 0)
    ys2, c2 = decode(p, xs[4:], c, 4)
    steps, steps_cache = jax.jit(functools.partial(dp.core.decode_steps, layer))(p, xs, cache)
    chex.assert_trees_all_close(jnp.concatenate([ys, ys2]), steps, jax.jit(layer.apply)(p, xs), atol=1e-5)
    chex.assert_trees_all_close(c2, steps_cache, atol=1e-5)


@pytest.mark.parametrize("lm", PREFILLED + [dp.LanguageModel(13, 16, (dp.TransformerBlock(16, 2, 32, causal=True) ** 2) ** 2)],
                         ids=lambda lm: repr(lm.body))
def test_unstacked_params_decode_as_the_stacked_ones(lm, key):
    """`dp.core.unstacked` (what `dp.generate` decodes with) slices every stack of `f ** n` into a
    tuple of its n applications' params; a chunk and a step decode to the same logits and caches
    (to float32 rounding)."""
    prompt = jax.random.randint(key, (5,), 0, 13)
    p = lm.init(key, prompt)
    u = dp.core.unstacked(lm, p)
    if isinstance(lm.body, dp.core.Repeat):
        stack = u["body"]["stack"]
        assert isinstance(stack, tuple) and len(stack) == lm.body.n
        for k, one in enumerate(stack):  # application k's params (nested stacks sliced in turn)
            chex.assert_trees_all_equal(one, dp.core.unstacked(lm.body.layer, jax.tree.map(lambda a: a[k], p["body"]["stack"])))
        if isinstance(lm.body.layer, dp.core.Repeat):
            assert isinstance(stack[0]["stack"], tuple) and len(stack[0]["stack"]) == 2
    stacked_out, stacked_cache = lm.decode(p, prompt, lm.init_cache(p, 8), 0)
    unstacked_out, unstacked_cache = lm.decode(u, prompt, lm.init_cache(u, 8), 0)
    # equal up to float32 rounding: stacked params of a stack deeper than UNROLLED_UP_TO decode as a scan
    chex.assert_trees_all_close(unstacked_out, stacked_out, atol=1e-5)
    chex.assert_trees_all_close(unstacked_cache, stacked_cache, atol=1e-5)
    chex.assert_trees_all_close(lm.decode(u, prompt[:1], unstacked_cache, 5), lm.decode(p, prompt[:1], stacked_cache, 5),
                                atol=1e-5)
    if isinstance(lm.body, dp.core.Repeat):  # a cache or params of another depth is an error, not a shorter model
        fewer = {**unstacked_cache, "body": unstacked_cache["body"][:-1]}
        with pytest.raises(dp.LayerError, match="expected a cache of"):
            lm.decode(p, prompt[:1], fewer, 5)
        with pytest.raises(dp.LayerError, match="unstacked params hold"):
            lm.decode({**u, "body": {"stack": u["body"]["stack"][:-1]}}, prompt[:1], unstacked_cache, 5)
        with pytest.raises(dp.LayerError, match=r"params\['body'\]\['stack'\]"):  # decoding's form is not apply's
            lm.apply(u, prompt)


def test_generation_errors(key):
    lm = lm_of(LM_BODIES[0])
    p = lm.init(key, jnp.zeros(4, jnp.int32))
    with pytest.raises(dp.LayerError, match="longer than the model's positional table"):
        dp.generate(lm, p, jnp.zeros((1, 30), jnp.int32), 5)
    with pytest.raises(dp.LayerError, match=r"expected prompts \(B, P\)"):
        dp.generate(lm, p, jnp.zeros((4,), jnp.int32), 5)


def test_sampling_rules(key):
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    keys = jax.random.split(key, 4000)
    draw = lambda **kw: jax.vmap(lambda k: dp.sample(k, logits, **kw))(keys)
    assert set(np.unique(draw(top_k=2)).tolist()) == {0, 1}
    assert set(np.unique(draw(top_p=0.7)).tolist()) == {0, 1}   # 0.5 < 0.7 ≤ 0.8
    freq = np.bincount(np.asarray(draw()), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    cold = np.bincount(np.asarray(draw(temperature=0.2)), minlength=4) / 4000
    assert cold[0] > 0.9
    assert int(dp.sample(key, logits, greedy=True)) == 0


def test_transformer_lm_learns_to_copy_a_pattern(key):
    """A causal Transformer LM learns a repeating sequence and then generates it."""
    lm = dp.LanguageModel(5, 16, dp.TransformerBlock(16, 2, 32, causal=True) ** 2,
                          positions=dp.LearnedPositions(24), per_position=True)
    seq = jnp.array([0, 1, 2, 3, 4] * 4)
    p = lm.init(key, seq[:-1])
    loss = lambda p, _: optax.softmax_cross_entropy_with_integer_labels(lm(p, seq[:-1]), seq[1:]).mean()
    p, l = fit(loss, p, optax.adam(1e-2), 150)
    assert l < 0.05
    chex.assert_trees_all_equal(dp.generate(lm, p, seq[None, :3], 7)[0], seq[3:10])


def test_load_torch_attention_and_encoder_layer_parity():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype(np.float32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    sd = {k: v.detach().numpy() for k, v in mha.state_dict().items()}
    for is_causal in (False, True):
        att = dp.Attention(2, causal=is_causal)
        with torch.no_grad():
            t = torch.tensor(x)
            expected = mha(t, t, t, attn_mask=causal if is_causal else None, need_weights=False)[0].numpy()
        np.testing.assert_allclose(jax.vmap(att.apply, (None, 0))(dp.load_torch(att, sd), x), expected, atol=1e-5)
    for norm_first in (False, True):
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
        sd = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
        for is_causal in (False, True):
            block = dp.TransformerBlock(8, 2, 16, causal=is_causal, pre_norm=norm_first)
            with torch.no_grad():
                expected = layer(torch.tensor(x), src_mask=causal if is_causal else None, is_causal=is_causal).numpy()
            np.testing.assert_allclose(jax.vmap(block.apply, (None, 0))(dp.load_torch(block, sd), x), expected, atol=1e-5)
