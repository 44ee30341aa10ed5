"""No silent failures: every misuse of the public API listed here raises an error that names
the function or layer, what it expected and what it got. One row per misuse:
(name, call, error type, message fragment). A change that makes one of them silent again, or
its message vague, fails here."""
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffprog as dp

KEY = jax.random.key(0)
X = jnp.ones((4, 3))
TOY = dp.Dense(1) @ dp.FeedForward(4)


def toy_data(step, **extra):
    return {"inputs": jnp.ones((4, 3)), "targets": jnp.zeros((4, 1)), **extra}


def toy_loss(out, batch):
    return dp.metrics.mse(out, batch["targets"])


SGD = optax.sgd(0.1)  # one object: the toy trains with one compiled step


def train(**kw):
    kw = {"steps": 2, "quiet": True, **kw}
    return dp.train(TOY, kw.pop("loss", toy_loss), SGD, kw.pop("data", toy_data), **kw)


def lm():
    return dp.LanguageModel(11, 8, dp.TransformerBlock(8, 2, 16, causal=True), positions=dp.LearnedPositions(8),
                            per_position=True)


def lm_params():
    return lm().init(KEY, jnp.zeros(4, jnp.int32))


def dense_params(out, bias=True):
    return dp.Dense(out, use_bias=bias).init(KEY, jnp.ones(3))


MISUSES = [
    # metrics: shapes must match, never broadcast
    ("mse (B, 1) vs (B,)", lambda: dp.metrics.mse(jnp.ones((4, 1)), jnp.ones(4)), dp.ArgumentError, r"mse: expected predictions shaped like the targets \(4,\), got \(4, 1\)"),
    ("cross_entropy wrong leading axes", lambda: dp.metrics.cross_entropy(jnp.ones((4, 5, 7)), jnp.ones((4, 6), int)), dp.ArgumentError, r"cross_entropy: .*\(4, 6\), got \(4, 5\)"),
    ("accuracy float targets", lambda: dp.metrics.accuracy(jnp.ones((4, 7)), jnp.ones(4)), dp.ArgumentError, r"accuracy: expected integer class targets"),
    ("exact_match mask shape", lambda: dp.metrics.exact_match(jnp.ones((2, 3, 5)), jnp.ones((2, 3), int), jnp.ones((2, 4))), dp.ArgumentError, r"exact_match: expected mask shaped like targets \(2, 3\)"),
    ("cross_entropy target id outside the vocabulary", lambda: dp.metrics.cross_entropy(jnp.zeros((2, 5)), jnp.array([1, 5])), dp.ArgumentError, r"cross_entropy: expected target ids in \[0, 5\) at the counted positions, got \[5\]"),
    ("accuracy negative target id", lambda: dp.metrics.accuracy(jnp.zeros((2, 5)), jnp.array([-1, 2])), dp.ArgumentError, r"accuracy: expected target ids in \[0, 5\)"),
    # train: batch keys, settings
    ("train: eval_every without eval_data", lambda: train(eval_every=1), dp.ArgumentError, r"train: eval_every=1 needs eval_data="),
    ("train: typo in a side input", lambda: train(data=lambda s: toy_data(s, length=jnp.ones(4, int))), dp.ArgumentError, r"train: data\(0\) has key\(s\) \['length'\] that are neither"),
    ("train: resume without checkpoints", lambda: train(resume=True), dp.ArgumentError, r"resume=True needs workdir= and checkpoint_every"),
    ("train: checkpoint_every without workdir", lambda: train(checkpoint_every=1), dp.ArgumentError, r"checkpoint_every needs workdir="),
    ("train: keep 0", lambda: train(keep=0), dp.ArgumentError, r"train: keep must be an int >= 1, got 0"),
    ("train: negative steps", lambda: train(steps=-1), dp.ArgumentError, r"train: steps must be an int >= 0, got -1"),
    ("train: empty eval_data", lambda: train(eval_data=[], eval_every=1), dp.ArgumentError, r"train: eval_data is empty"),
    # sampling and decoding
    ("sample top_p 0", lambda: dp.sample(KEY, jnp.ones(5), top_p=0.0), dp.ArgumentError, r"sample: top_p must be in \(0, 1\]"),
    ("sample top_p > 1", lambda: dp.sample(KEY, jnp.ones(5), top_p=1.5), dp.ArgumentError, r"top_p must be in \(0, 1\]"),
    ("sample top_k 0", lambda: dp.sample(KEY, jnp.ones(5), top_k=0), dp.ArgumentError, r"sample: top_k must be an int >= 1"),
    ("sample negative temperature", lambda: dp.sample(KEY, jnp.ones(5), temperature=-1.0), dp.ArgumentError, r"sample: temperature must be a number >= 0"),
    ("generate negative steps", lambda: dp.generate(lm(), lm_params(), jnp.zeros((1, 2), int), -1), dp.ArgumentError, r"generate: steps must be an int >= 0"),
    ("generate prompt id out of vocab", lambda: dp.generate(lm(), lm_params(), jnp.array([[3, 11]]), 2), dp.LayerError, r"generate: expected prompt ids in \[0, 11\), got \[11\]"),
    ("generate past the positions", lambda: dp.generate(lm(), lm_params(), jnp.zeros((1, 4), int), 5), dp.LayerError, r"longer than the model's positional table \(8\)"),
    ("generate lengths outside the prompts", lambda: dp.generate(lm(), lm_params(), jnp.zeros((2, 3), int), 2, lengths=[3, 0]), dp.ArgumentError, r"generate: lengths= must be 2 ints in \[1, 3\] \(one per prompt\), got \[3, 0\]"),
    ("generate lengths with a list of prompts", lambda: dp.generate(lm(), lm_params(), [[1, 2], [3]], 2, lengths=[2, 1]), dp.ArgumentError, r"a list of prompts gives its own lengths"),
    ("generate an empty prompt in a list", lambda: dp.generate(lm(), lm_params(), [[1, 2], []], 2), dp.ArgumentError, r"lengths= must be 2 ints in \[1, 2\].*got \[2, 0\]"),
    ("generate keys for another batch", lambda: dp.generate(lm(), lm_params(), [[1, 2], [3]], 2, key=jax.random.split(KEY, 3)), dp.ArgumentError, r"generate: key= must be one key or 2 keys \(one per prompt\), got shape \(3,\)"),
    ("generate eos outside the vocabulary", lambda: dp.generate(lm(), lm_params(), [[1, 2]], 2, eos=11), dp.ArgumentError, r"generate: eos and pad_id must be ids in \[0, 11\)"),
    ("generate top_k larger than the vocabulary", lambda: dp.generate(lm(), lm_params(), [[1, 2]], 2, key=KEY, top_k=50), dp.ArgumentError, r"generate: top_k=50 is larger than the vocabulary \(11\)"),
    ("generate with a model that cannot generate", lambda: dp.generate(dp.bert(dict(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8), head="masked_lm"), {}, [[1, 2]], 2), dp.ArgumentError, r"generate: expected a dp.LanguageModel .*got Bert"),
    ("generate bad sampling keyword value", lambda: dp.generate(lm(), lm_params(), jnp.zeros((1, 2), int), 2, key=KEY, top_k=0), dp.ArgumentError, r"generate: top_k must be"),
    ("train: a per-example loss", lambda: train(loss=lambda out, batch: (out - batch["targets"]) ** 2), dp.ArgumentError, r"train: the loss must return a scalar .*got shape \(4, 1\)"),
    ("apply_batch side input of another batch size", lambda: dp.SimpleRNN(4).apply_batch(dp.SimpleRNN(4).init(KEY, jnp.ones((5, 3))), jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2, 1])), dp.LayerError, r"SimpleRNN\(4\): side input lengths= has 3 rows, the batch has 2"),
    ("from_flax given a class", lambda: dp.from_flax(__import__("flax.linen", fromlist=["Dense"]).Dense), dp.ArgumentError, r"from_flax: expected a flax.linen Module instance"),
    ("from_flax given a diffprog layer", lambda: dp.from_flax(dp.Dense(2)), dp.ArgumentError, r"from_flax: expected a flax.linen Module instance .*got Dense"),
    ("soft_if T and F of different shapes", lambda: dp.soft.soft_if(jnp.float32(0.5), jnp.ones(3), jnp.ones(4)), dp.LayerError, r"soft_if: expected T and F of one shape .*T \(3,\), F \(4,\)"),
    ("soft_if gate of another shape", lambda: dp.soft.soft_if(jnp.full(2, 0.5), jnp.ones(3), jnp.ones(3)), dp.LayerError, r"soft_if: .*got g \(2,\)"),
    # configs and tokenizers
    ("gpt2 config dict with a typo", lambda: dp.gpt2({"n_embd": 8, "n_layers": 2}), dp.ArgumentError, r"gpt2: unknown config field\(s\) \['n_layers'\]"),
    ("train_wordpiece on one string", lambda: dp.text.train_wordpiece("to be or not to be"), dp.ArgumentError, r"train_wordpiece: texts must be an iterable of strings .*got one str of 18 characters"),
    ("train_bpe on one string", lambda: dp.text.train_bpe("to be"), dp.ArgumentError, r"train_bpe: texts must be an iterable of strings"),
    # params of another configuration
    ("Dense(8) params in Dense(4)", lambda: dp.Dense(4)(dense_params(8), jnp.ones(3)), dp.LayerError, r"Dense\(4\): params\['bias'\] is \(8,\) float, expected \(4,\) float"),
    ("missing bias", lambda: dp.Dense(4)(dense_params(4, bias=False), jnp.ones(3)), dp.LayerError, r"params\['bias'\] is absent, expected \(4,\) float"),
    ("params for another input width", lambda: dp.Dense(4).apply_batch(dense_params(4), jnp.ones((2, 5))), dp.LayerError, r"Dense\(4\)"),
    # soft programming: τ > 0
    ("soft_if τ = 0", lambda: dp.soft.soft_if(jnp.full(3, 0.7), X[0], X[1], temperature=0.0), dp.LayerError, r"sharpen_gate: temperature must be > 0 \(for hard choices pass hard=True\), got 0.0"),
    ("soft_lookup τ < 0", lambda: dp.soft.soft_lookup(jnp.ones(3), X, X, temperature=-1.0), dp.LayerError, r"soft_lookup: temperature must be > 0"),
    ("gate τ = 0", lambda: dp.soft.gate(X, X, X, temperature=0), dp.LayerError, r"gate: temperature must be > 0"),
    ("Switch layer τ = 0", lambda: dp.Switch((dp.Dense(2), dp.Dense(2)), dp.Dense(2), temperature=0.0), dp.LayerError, r"Switch: temperature must be a number > 0 \(hard choices are hard=True\), got 0.0"),
    # conv
    ("Conv with an empty output", lambda: dp.Conv(4, kernel=5, padding="VALID").apply(dp.Conv(4, kernel=5, padding="VALID").init(KEY, jnp.ones((3, 2))), jnp.ones((3, 2))), dp.LayerError, r"Conv\(4, kernel=5, padding='VALID'\): kernel \(5,\) with padding 'VALID' leaves no output on input \(3, 2\)"),
    # hyperparameters at construction
    ("Dense(0)", lambda: dp.Dense(0), dp.LayerError, r"Dense: out must be a positive int, got 0"),
    ("Dense(2.5)", lambda: dp.Dense(2.5), dp.LayerError, r"Dense: out must be a positive int, got 2.5"),
    ("LSTM(-1)", lambda: dp.LSTM(-1), dp.LayerError, r"LSTM: hidden must be a positive int, got -1"),
    ("Attention(0)", lambda: dp.Attention(0), dp.LayerError, r"Attention: heads must be a positive int"),
    ("Attention unknown score", lambda: dp.Attention(2, score="cosine"), dp.LayerError, r"unknown score 'cosine'"),
    ("TransformerBlock d not divisible by heads", lambda: dp.TransformerBlock(10, 3, 8), dp.LayerError, r"width d=10 is not divisible by heads=3"),
    ("Attention kv_heads not dividing heads", lambda: dp.Attention(4, kv_heads=3), dp.LayerError, r"kv_heads must be an int that divides heads=4, got 3"),
    ("Attention rotary on cross-attention", lambda: dp.Attention(2, cross=True, rotary=1e4), dp.LayerError, r"rotary positions are for self-attention"),
    ("Attention rotary with an odd head width", lambda: dp.Attention(4, rotary=1e4).init(KEY, jnp.ones((3, 12))), dp.LayerError, r"head_dim 12 / 4 = 3 is odd"),
    ("LanguageModel norm without final_norm", lambda: dp.LanguageModel(5, 4, dp.LSTM(4), norm=dp.RMSNorm()), dp.LayerError, r"norm=RMSNorm\(\) is applied only with final_norm=True"),
    ("AddNorm norm that is not a layer", lambda: dp.AddNorm(dp.Dense(4), norm="rms"), dp.LayerError, r"AddNorm: norm must be a layer"),
    ("SelectiveSSM dt_rank 0", lambda: dp.SelectiveSSM(dt_rank=0), dp.LayerError, r"dt_rank must be a positive int"),
    ("SelectiveSSM state 0", lambda: dp.SelectiveSSM(state=0), dp.LayerError, r"SelectiveSSM: state must be a positive int, got 0"),
    ("LowRank on a layer without the target weight", lambda: dp.LowRank(dp.Dense(4), 2).init(KEY, jnp.ones(3)), dp.LayerError, r"has no weight at \['query', 'key', 'value', 'output'\]"),
    ("upgrade_params of params of another model", lambda: dp.upgrade_params(dp.Dense(2) @ dp.Dense(3), {"0_Tanh": {}}, jnp.ones(2)), dp.LayerError, r"not diffprog 0.1 params of this model"),
    ("TransformerBlock ff 0", lambda: dp.TransformerBlock(8, 2, 0), dp.LayerError, r"TransformerBlock: ff must be a positive int, got 0"),
    ("TransformerBlock dropout 1", lambda: dp.TransformerBlock(8, 2, 8, dropout=1.0), dp.LayerError, r"dropout must be a number in \[0, 1\), got 1.0"),
    ("Conv stride 0", lambda: dp.Conv(4, stride=0), dp.LayerError, r"Conv: stride must be a positive int or a tuple of positive ints, got 0"),
    ("Conv kernel of zeros", lambda: dp.Conv(4, kernel=(3, 0)), dp.LayerError, r"Conv: kernel must be a positive int or a tuple"),
    ("Conv kernel of another rank", lambda: dp.Conv(4, kernel=(3, 3)).init(KEY, jnp.ones((8, 2))), dp.LayerError, r"Conv\(4, kernel=\(3, 3\)\): kernel \(3, 3\) has 2 entries, but the input has 1 spatial axis"),
    ("MaxPool window of another rank", lambda: dp.MaxPool((2, 2, 2))({}, jnp.ones((4, 4, 2))), dp.LayerError, r"window \(2, 2, 2\) has 3 entries, but the input has 2 spatial axes"),
    ("MaxPool window 0", lambda: dp.MaxPool(0), dp.LayerError, r"MaxPool: window must be a positive int"),
    ("EmbedToken vocab 0", lambda: dp.EmbedToken(0, 4), dp.LayerError, r"EmbedToken: vocab must be a positive int"),
    ("FeedForward unknown activation", lambda: dp.FeedForward(3, activation="swish"), dp.LayerError, r"FeedForward: unknown activation 'swish'"),
    ("LayerNorm eps 0", lambda: dp.LayerNorm(eps=0.0), dp.LayerError, r"LayerNorm: eps must be a number > 0"),
    ("Dropout rate 1", lambda: dp.Dropout(1.0), dp.LayerError, r"Dropout: rate must be a number in \[0, 1\), got 1.0"),
    ("f ** 0", lambda: dp.Dense(2) ** 0, dp.LayerError, r"the power must be an int >= 1"),
    ("a layer called with params and no input", lambda: dp.Dense(2)(dense_params(2)), dp.LayerError, r"called with params but no input; write Dense\(2\)\(params, x\)"),
    # recurrent state forms
    ("LSTM initial_state as one array", lambda: dp.LSTM(4)(dp.LSTM(4).init(KEY, X), X, initial_state=jnp.zeros(4)), dp.LayerError, r"expected initial_state \(h0, c0\) or a dict with keys \['c', 'h'\], got 1 array"),
]


@pytest.mark.parametrize("name, call, error, message", MISUSES, ids=[m[0] for m in MISUSES])
def test_misuse_raises_a_clear_error(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_load_torch_refuses_what_does_not_fit():
    torch = pytest.importorskip("torch")
    linear = {k: v.numpy() for k, v in torch.nn.Linear(6, 4).state_dict().items()}
    with pytest.raises(dp.LayerError, match=r"load_torch\(Dense\(5\)\): expected weight \(out, in\) shaped \(5,\), got \(4,\)"):
        dp.load_torch(dp.Dense(5), linear)
    two_layers = {k: v.numpy() for k, v in torch.nn.LSTM(3, 4, num_layers=2).state_dict().items()}
    with pytest.raises(dp.LayerError, match=r"holds \['bias_hh_l1', 'bias_ih_l1', 'weight_hh_l1', 'weight_ih_l1'\]"):
        dp.load_torch(dp.LSTM(4), two_layers)
    with pytest.raises(dp.LayerError, match=r"holds \['extra'\]"):
        dp.load_torch(dp.Dense(4), {**linear, "extra": np.zeros(1)})


def test_parameterless_layers_called_with_no_arguments_are_themselves():
    assert dp.Flatten() is dp.Flatten and dp.Relu() is dp.Relu
    assert dp.SinusoidalPositions() == dp.SinusoidalPositions()()
    x = jnp.ones((2, 3))
    model = dp.Flatten() @ dp.Relu()
    assert model(model.init(KEY, x), x).shape == (6,)


@pytest.mark.parametrize("layer, state", [
    (dp.SimpleRNN(4), lambda h: h), (dp.GRU(4), lambda h: h), (dp.LSTM(4), lambda h: (h, 2 * h))])
def test_initial_state_takes_the_pytorch_and_flax_forms(layer, state):
    xs = jax.random.normal(KEY, (5, 3))
    p = layer.init(KEY, xs)
    h = jax.random.normal(jax.random.key(1), (4,))
    as_dict = {"h": h} if not isinstance(layer, dp.LSTM) else {"h": h, "c": 2 * h}
    np.testing.assert_allclose(layer(p, xs, initial_state=state(h)), layer(p, xs, initial_state=as_dict))
    batch = jnp.stack([xs, xs])
    np.testing.assert_allclose(layer.apply_batch(p, batch, initial_state=state(jnp.stack([h, h])))[1],
                               layer(p, xs, initial_state=as_dict), atol=1e-6)


@pytest.mark.parametrize("layer", [dp.SimpleRNN(4), dp.LSTM(4), dp.GRU(4)], ids=repr)
def test_bf16_inputs_with_float32_params_keep_one_carry_dtype(layer):
    xs = jax.random.normal(KEY, (2, 5, 3))
    p = layer.init(KEY, xs[0])
    out = jax.jit(layer.apply_batch)(p, xs.astype(jnp.bfloat16))
    reference = layer.apply_batch(p, xs.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(out, reference, atol=2e-2)
    np.testing.assert_allclose(jax.vmap(lambda x: layer(p, x))(xs.astype(jnp.bfloat16)), reference, atol=2e-2)


def test_a_query_with_no_key_to_read_outputs_zeros_and_gets_zero_gradients():
    """mask= hides every key from query 2: its attention output (before W_o) is 0 on every path
    — dot_product_attention, the explicit weights, dropout — and no gradient flows through it."""
    x = jax.random.normal(KEY, (5, 8))
    mask = jnp.ones((5, 5), bool).at[2].set(False)
    for layer in (dp.Attention(2), dp.Attention(2, causal=True), dp.Attention(2, return_weights=True)):
        p = layer.init(KEY, x)
        apply = jax.jit(layer.apply)
        out = apply(p, x, mask=mask)
        y, weights = out if layer.return_weights else (out, None)
        np.testing.assert_allclose(y[2], p["output"]["bias"], atol=1e-6)  # W_o · 0 + b_o
        if weights is not None:
            assert float(jnp.abs(weights[:, 2]).max()) == 0.0
        grad = jax.jit(jax.grad(lambda x: jnp.sum((apply(p, x, mask=mask)[0] if layer.return_weights else apply(p, x, mask=mask))[2] ** 2)))(x)
        assert float(jnp.abs(grad).max()) == 0.0
    # the fused causal path never has such a row (each query sees itself), and agrees with the masked path
    causal = dp.Attention(2, causal=True)
    p = causal.init(KEY, x)
    np.testing.assert_allclose(causal(p, x), causal(p, x, mask=jnp.ones((5, 5), bool)), atol=1e-5)


def test_decoding_past_the_kv_cache_under_jit_is_nan():
    """Eagerly an error; under jit the position is unknown while tracing, so the step returns NaN
    (never logits that look valid)."""
    block = dp.Attention(2, causal=True)
    x = jnp.ones((1, 8))
    p = block.init(KEY, x)
    cache = block.init_cache(p, 3)
    with pytest.raises(dp.LayerError, match=r"steps 3..3 are past the KV cache \(3\)"):
        block.decode(p, x, cache, 3)
    with pytest.raises(dp.LayerError, match=r"steps 2..3 are past the KV cache \(3\)"):
        block.decode(p, jnp.ones((2, 8)), cache, 2)
    y, _ = jax.jit(block.decode)(p, x, cache, 3)
    assert np.isnan(y).all()
    y, _ = jax.jit(block.decode)(p, jnp.ones((2, 8)), cache, 2)  # a chunk that runs past the cache
    assert np.isnan(y).all()
    y, _ = jax.jit(block.decode)(p, x, cache, 2)
    assert np.isfinite(y).all()
    positions = dp.LearnedPositions(3)
    q = positions.init(KEY, x)
    assert np.isnan(jax.jit(positions.decode)(q, x, {}, 3)[0]).all()
    rows = jax.jit(positions.decode)(q, jnp.ones((2, 8)), {}, 2)[0]
    assert np.isfinite(rows[0]).all() and np.isnan(rows[1]).all()


def test_train_reports_a_batch_that_does_not_divide_the_devices_at_any_step():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))  # conftest: 4 host devices
    data = lambda s: {"inputs": jnp.ones((4 if s < 3 else 3, 3)), "targets": jnp.zeros((4 if s < 3 else 3, 1))}
    with pytest.raises(dp.TrainingError, match=r"step 3: batch\['inputs'\] has leading shape \(3,\), not divisible by the 2 devices"):
        dp.train(dp.Dense(1), toy_loss, SGD, data, steps=5, mesh=mesh, quiet=True)


def test_metrics_under_jit_are_nan_for_target_ids_outside_the_vocabulary():
    """Under jit the ids are not known while tracing: an out-of-range id at a counted position
    makes the metric NaN (dp.train then stops, naming the step); masked-out positions may hold
    any id (e.g. -100 padding)."""
    logits, targets = jnp.zeros((2, 3, 5)), jnp.array([[0, 1, 7], [2, 3, -100]])
    for metric in (dp.metrics.cross_entropy, dp.metrics.accuracy, dp.metrics.exact_match):
        assert np.isnan(jax.jit(metric)(logits, targets))
        counted = (targets >= 0) & (targets < 5)
        np.testing.assert_allclose(jax.jit(metric)(logits, targets, counted), metric(logits, jnp.where(counted, targets, 0), counted))
    grads = jax.grad(lambda l: dp.metrics.cross_entropy(l, targets, (targets >= 0) & (targets < 5)))(logits)
    assert np.isfinite(grads).all() and not grads[0, 2].any()


def test_an_invalid_tokenizer_file_is_named(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ')
    with pytest.raises(dp.ArgumentError, match=r"load_tokenizer: .*tokenizer.json is not a valid tokenizer.json"):
        dp.text.load_tokenizer(tmp_path)


def test_apply_batch_converts_side_inputs_given_as_lists(key):
    rnn = dp.SimpleRNN(4)
    p = rnn.init(key, jnp.ones((5, 3)))
    xs = jax.random.normal(key, (2, 5, 3))
    np.testing.assert_array_equal(rnn.apply_batch(p, xs, lengths=[5, 2]), rnn.apply_batch(p, xs, lengths=jnp.array([5, 2])))


def test_half_precision_torch_state_dicts_load_as_float32():
    torch = pytest.importorskip("torch")
    linear = torch.nn.Linear(3, 2)
    full = dp.load_torch(dp.Dense(2), linear.state_dict())
    for dtype in (torch.bfloat16, torch.float16):
        half = dp.load_torch(dp.Dense(2), linear.to(dtype).state_dict())
        assert half["weight"].dtype == jnp.float32
        np.testing.assert_allclose(half["weight"], full["weight"], atol=1e-2)


def test_a_checkpoint_without_its_metadata_is_a_checkpoint_error(tmp_path):
    train(workdir=tmp_path, checkpoint_every=2, steps=2)
    (tmp_path / "checkpoints" / "2" / "default" / "_METADATA").unlink()
    with pytest.raises(dp.CheckpointError, match=r"checkpoints/2: cannot restore checkpoint: its metadata is missing"):
        train(workdir=tmp_path, checkpoint_every=2, steps=4, resume=True)


@pytest.mark.parametrize("layer", [dp.SimpleRNN(5), dp.LSTM(5), dp.GRU(5)], ids=repr)
def test_a_length_of_zero_is_an_empty_sequence_with_and_without_jit(layer):
    """lengths=0: the layer keeps its initial state and outputs zeros (example path, batch path
    and kernel alike), Collapse gives zeros, attention over no key outputs 0 — eagerly and under
    jit (where lengths was once clipped to 1 and computed a one-step result)."""
    rnn = dataclasses.replace(layer, return_state=True)
    xs = jax.random.normal(KEY, (2, 6, 3))
    p = rnn.init(KEY, xs[0])
    h0 = jax.random.normal(jax.random.key(1), (2, 5))
    initial = (h0, 2 * h0) if isinstance(layer, dp.LSTM) else h0
    lengths = jnp.array([0, 4])
    for run in (rnn.apply_batch, jax.jit(rnn.apply_batch)):
        ys, state = run(p, xs, lengths=lengths, initial_state=initial)
        assert not ys[0].any()
        np.testing.assert_allclose(state["h"][0], h0[0])
        ys_4, _ = rnn.apply_batch(p, xs[1:, :4], initial_state=jax.tree.map(lambda a: a[1:], initial))
        np.testing.assert_allclose(ys[1, :4], ys_4[0], atol=1e-5)
    one = jax.jit(lambda p, x, n: rnn(p, x, lengths=n, initial_state=jax.tree.map(lambda a: a[0], initial)))
    np.testing.assert_allclose(one(p, xs[0], 0)[1]["h"], h0[0])
    for mode in ("first", "last", "mean"):
        collapse = jax.jit(lambda x, n: dp.Collapse(mode)({}, x, lengths=n))
        assert not collapse(xs[0], 0).any() and not dp.Collapse(mode)({}, xs[0], lengths=0).any()
    attention = dp.Attention(1, cross=True)
    q = attention.init(KEY, xs[0], context=xs[1])
    read = jax.jit(lambda n: attention(q, xs[0], context=xs[1], context_lengths=n))
    assert not read(0).any() and read(3).any()


def test_train_converts_side_inputs_given_as_lists():
    model = dp.Dense(1) @ dp.Collapse("mean") @ dp.SimpleRNN(4)
    data = lambda s: {"inputs": jnp.ones((2, 5, 3)), "targets": jnp.zeros((2, 1)), "lengths": [5, 2]}
    result = dp.train(model, toy_loss, optax.sgd(0.1), data, steps=2, quiet=True)
    assert result.step == 2


def test_a_failed_checkpoint_save_names_the_path_and_the_intact_checkpoint(tmp_path, monkeypatch):
    """A save that fails (disk full, read-only) raises CheckpointError naming the checkpoint and
    the newest intact one; that one still restores."""
    train(workdir=tmp_path, checkpoint_every=1, steps=1)
    import orbax.checkpoint as ocp

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(dp.CheckpointError, match=r"checkpoints/2: cannot save checkpoint \(OSError: .*No space left.*the checkpoint of step 1 in .* is intact"):
        train(workdir=tmp_path, checkpoint_every=1, steps=2, resume=True)
    monkeypatch.undo()
    assert train(workdir=tmp_path, checkpoint_every=1, steps=1, resume=True).step == 1


def test_resuming_with_another_optimiser_names_the_optimiser_state(tmp_path):
    train(workdir=tmp_path, checkpoint_every=1, steps=1)
    with pytest.raises(dp.CheckpointError, match=r"opt_state.* in the checkpoint, the optimiser expects"):
        dp.train(TOY, toy_loss, optax.adam(0.1), toy_data, steps=2, quiet=True, workdir=tmp_path,
                 checkpoint_every=1, resume=True)


@pytest.mark.parametrize("argv, message", [
    (["--max_iters", "0"], "--max_iters: must be >= 1, got 0"),
    (["--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    (["--lr", "-1"], "--lr: must be > 0, got -1.0"),
    (["--dropout", "1"], "--dropout: must be in [0, 1), got 1.0"),
    (["--out", "/proc/diffprog-not-writable"], "--out /proc/diffprog-not-writable is not a folder this process can write to"),
])
def test_experiment_and_benchmark_clis_refuse_invalid_values(argv, message, capsys):
    from experiments import charlm
    with pytest.raises(SystemExit):
        charlm.main(argv)
    assert message in capsys.readouterr().err


def test_benchmark_clis_refuse_invalid_values(capsys):
    from benchmarks import sequence_models
    with pytest.raises(SystemExit):
        sequence_models.main(["--reps", "-1"])
    assert "--reps: must be >= 1, got -1" in capsys.readouterr().err


def test_the_params_check_adds_nothing_to_the_compiled_program(monkeypatch):
    """check_params runs in Python while tracing: the jit-compiled program is the same with and
    without it (so a step costs the same)."""
    model = dp.batched(dp.Dense(2) @ dp.LSTM(4) @ dp.EmbedToken(7, 3))
    ids = jnp.zeros((2, 5), int)
    params = model.init(KEY, ids)
    checked = jax.jit(model.apply).lower(params, ids).as_text()
    monkeypatch.setattr(dp.checks, "check_params", lambda *args: None)
    assert jax.jit(lambda p, x: model.apply(p, x)).lower(params, ids).as_text().replace("jit__lambda", "jit_apply") == checked
