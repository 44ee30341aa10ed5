"""Model surgery with the layer tree's handles (`dp.walk`, `dp.rewrite`, `dp.taps`) on models
loaded from `transformers` checkpoints (random weights from small configs): the recipes of the
README's "Taking a model apart", each checked for what it must preserve and what it must change."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffprog as dp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=16, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT2 = dict(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def loaded(cls, config_cls, head=None, **config):
    torch.manual_seed(0)
    ref = getattr(transformers, cls)(getattr(transformers, config_cls)(**config)).eval()
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = dp.bert(ref.config, head=head) if config_cls == "BertConfig" else dp.gpt2(ref.config)
    return model, state


def paths(tree):
    return {dp.checks.path_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def carry_over(old, new):
    """`new` with every leaf that `old` holds at the same path taken from `old`."""
    flat = paths(old)
    return jax.tree_util.tree_map_with_path(lambda p, a: flat.get(dp.checks.path_name(p), a), new)


def next_token(model, batch):
    net = dp.batched(model)
    return lambda p: optax.softmax_cross_entropy_with_integer_labels(net(p, batch)[:, :-1], batch[:, 1:]).mean()


def steps(params, loss, trainable, n=30, lr=1e-2):
    """n Adam steps on `loss` that update only the params `trainable(path)` picks (optax labels
    from the params paths; the others get zero updates)."""
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "train" if trainable(dp.checks.path_name(p)) else "freeze", params)
    optimizer = optax.multi_transform({"train": optax.adam(lr), "freeze": optax.set_to_zero()}, labels)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    state, losses = optimizer.init(params), []
    for _ in range(n):
        params, state, value = step(params, state)
        losses.append(float(value))
    return params, losses


def test_every_layernorm_of_a_loaded_bert_becomes_an_rmsnorm_and_trains():
    """(a) `rewrite` swaps every LayerNorm of a loaded BERT (embeddings, each block's two, the
    masked-LM head's) for a new RMSNorm; the other weights carry over and the model trains."""
    model, state = loaded("BertForMaskedLM", "BertConfig", head="masked_lm", **BERT)
    params = dp.load_pretrained(model, state)
    rms = dp.rewrite(model, lambda l: isinstance(l, dp.LayerNorm), lambda l: dp.RMSNorm(l.eps))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (4, 12)))
    fresh = rms.init(jax.random.key(0), ids[0])
    assert len(dp.find(rms, dp.RMSNorm, fresh)) == 4 and dp.find(rms, dp.LayerNorm, fresh) == []
    new = carry_over(params, fresh)
    moved = {k for k, v in paths(new).items() if k in paths(params) and v is paths(params)[k]}
    assert {k for k in paths(params) if "norm" not in k.lower()} <= moved  # every weight but the norms'
    trained, losses = steps(new, next_token(rms, ids), lambda path: True)
    assert losses[-1] < 0.8 * losses[0]


def test_a_frozen_loaded_encoder_trains_only_its_new_head():
    """(b) optax labels from params paths: the loaded encoder stays bit-identical, the new
    question-answering head (filled with fresh weights) learns."""
    model, state = loaded("BertModel", "BertConfig", head="question_answering", **BERT)
    params = dp.load_pretrained(model, state, fill=jax.random.key(1), ignore=("pooler.",))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (4, 12)))
    starts = jnp.array([1, 3, 5, 7])

    net = dp.batched(model)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(net(p, ids)[0], starts).mean()
    p, losses = steps(params, loss, lambda path: path.startswith("['question_answering']"), n=40, lr=5e-2)
    assert losses[-1] < 0.5 * losses[0]
    chex.assert_trees_all_equal({k: v for k, v in p.items() if k != "question_answering"},
                                {k: v for k, v in params.items() if k != "question_answering"})
    assert not np.allclose(p["question_answering"]["weight"], params["question_answering"]["weight"])


def test_low_rank_adapters_on_a_loaded_gpt2_train_alone_and_merge_back():
    """(c) LoRA on the attention of a loaded GPT-2: the adapted model starts out equal to the
    original, trains its adapters alone (every pretrained weight unchanged), and merged back into
    the dense weights gives the original architecture with the adapted model's logits (1e-5)
    and its greedy generation."""
    # weights drawn at the scale of trained ones (initializer_range 0.5, not 0.02), or the frozen
    # tied table would keep every logit near 0 whatever the adapters do
    model, state = loaded("GPT2LMHeadModel", "GPT2Config", **GPT2, initializer_range=0.5)
    params = dp.load_pretrained(model, state)
    adapted, lora = dp.low_rank(model, params, jax.random.key(2), rank=2, alpha=4.0)
    assert len(dp.find(adapted, dp.LowRank, lora)) == 1  # the blocks' attention, stacked
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (4, 12)))
    chex.assert_trees_all_close(dp.batched(adapted)(lora, ids), dp.batched(model)(params, ids), atol=1e-6)
    pattern = jnp.tile(jnp.arange(12) % 4 + 7, (4, 1))  # a sequence the adapters can learn to continue
    trained, losses = steps(lora, next_token(adapted, pattern), lambda path: "low_rank" in path, n=40, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    chex.assert_trees_all_equal({k: v for k, v in paths(trained).items() if "low_rank" not in k}, paths(params))
    merged_model, merged = dp.merge_low_rank(adapted, trained)
    assert merged_model == model and jax.tree.structure(merged) == jax.tree.structure(params)
    chex.assert_trees_all_close(dp.batched(merged_model)(merged, ids), dp.batched(adapted)(trained, ids), atol=1e-5)
    assert not np.allclose(dp.batched(merged_model)(merged, ids), dp.batched(model)(params, ids), atol=1e-3)
    np.testing.assert_array_equal(dp.generate(merged_model, merged, ids[:, :4], 6), dp.generate(adapted, trained, ids[:, :4], 6))
