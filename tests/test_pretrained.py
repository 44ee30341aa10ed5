"""BERT and GPT-2 against Hugging Face `transformers` (random weights from small configs, no
download): the same numbers from the same weights, weights loaded from every kind of source,
errors that name the weight or the config field, and word-piece tokenizers."""
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffprog as dp

from helpers import assert_causal_lm_equals

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=24, type_vocab_size=2)
GPT2 = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
HEADS = {"pooler": "BertModel", "masked_lm": "BertForMaskedLM", "question_answering": "BertForQuestionAnswering"}


def reference(cls, **config):
    torch.manual_seed(0)
    config_cls = transformers.GPT2Config if cls.startswith("GPT2") else transformers.BertConfig
    return getattr(transformers, cls)(config_cls(**config)).eval()


def state_dict(module):
    return {k: v.numpy() for k, v in module.state_dict().items()}


def batch():
    """Three sequences of 10 with 10, 7 and 4 valid tokens (right padding), two segments."""
    ids = np.random.RandomState(0).randint(0, 99, (3, 10))
    segments = (np.arange(10) >= 5).astype(np.int64)[None].repeat(3, 0)
    lengths = np.array([10, 7, 4])
    return ids, segments, lengths


@pytest.mark.parametrize("layers", [2, 1])  # one layer: `block ** 1` is a stack of one
@pytest.mark.parametrize("head", sorted(HEADS))
def test_bert_equals_transformers(head, layers):
    ref = reference(HEADS[head], **{**BERT, "num_hidden_layers": layers})
    ids, segments, lengths = batch()
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(segments), attention_mask=torch.tensor(mask))
    theirs = {"pooler": lambda: (out.last_hidden_state, out.pooler_output), "masked_lm": lambda: out.logits,
              "question_answering": lambda: (out.start_logits, out.end_logits)}[head]()
    model = dp.bert(ref.config, head=head)
    params = dp.load_pretrained(model, state_dict(ref))
    ours = jax.jit(dp.batched(model).apply)(params, jnp.asarray(ids), segments=jnp.asarray(segments),
                                            lengths=jnp.asarray(lengths))
    chex.assert_trees_all_close(ours, jax.tree.map(lambda t: t.numpy(), theirs), atol=1e-5, rtol=1e-5)
    # one example at a time (the notes' type int[T] → ...) is the same computation
    one = model(params, jnp.asarray(ids[1, :7]), segments=jnp.asarray(segments[1, :7]))
    chex.assert_trees_all_close(one, jax.tree.map(lambda t: t[1, :7] if t.shape[1] == 10 else t[1], ours), atol=1e-5)


def test_bert_reads_like_the_notes_and_scans_its_blocks():
    model = dp.bert(BERT, head="question_answering")
    assert repr(model).startswith("SelectSpan ∘ TransformerBlock(32, 4, 37, dropout=0.1, activation='gelu', eps=1e-12")
    assert repr(model).endswith("^2 ∘ Dropout(0.1) ∘ LayerNorm(eps=1e-12) ∘ EmbedSegment(2) ∘ "
                                "LearnedPositions(24) ∘ EmbedToken(99, 32)")
    ids = jnp.arange(8) % 99
    params = model.init(jax.random.key(0), ids)
    scans = [e for e in jax.make_jaxpr(model.apply)(params, ids).jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 2
    # dropout is on with a key, off without one
    run = jax.jit(model.apply)
    a, b = (run(params, ids, key=jax.random.key(k)) for k in (1, 2))
    assert not np.allclose(a[0], b[0])
    chex.assert_trees_all_equal(run(params, ids), run(params, ids))


def test_bfloat16_bert_and_gpt2_stay_bfloat16_and_compute_what_float32_does():
    """Params cast to bfloat16 (`model.to(torch.bfloat16)`): every output is bfloat16 and the
    float32 model's to bfloat16 precision (a float32 constant in "gelu" once turned a block's
    output float32, and the scan over the blocks refused it)."""
    ids = jnp.arange(10) % 99
    for model in (dp.bert(BERT), dp.gpt2(GPT2)):
        params = model.init(jax.random.key(0), ids)
        run = jax.jit(dp.batched(model).apply)
        want = run(params, ids[None])
        got = run(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), ids[None])
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.dtype == jnp.bfloat16
            np.testing.assert_allclose(g.astype(jnp.float32), w, atol=0.03 * float(jnp.abs(w).max()))


def test_generate_compiles_once_per_model_and_shape():
    model = dp.gpt2(GPT2)
    params = model.init(jax.random.key(0), jnp.zeros(4, jnp.int32))
    prompts = np.zeros((2, 3), np.int32)
    dp.generate(model, params, prompts, 4)
    before = importlib.import_module("diffprog.generate")._generate._cache_size()
    for _ in range(2):
        dp.generate(model, jax.tree.map(lambda a: a + 1, params), prompts + 1, 4)
    assert importlib.import_module("diffprog.generate")._generate._cache_size() == before


@pytest.mark.parametrize("layers", [2, 1])
def test_gpt2_logits_and_greedy_generation_equal_transformers(layers):
    ref = reference("GPT2LMHeadModel", **{**GPT2, "n_layer": layers})
    ids, _, _ = batch()
    model = dp.gpt2(ref.config)
    assert_causal_lm_equals(model, dp.load_pretrained(model, state_dict(ref)), ref, ids, 32)


def test_gpt2_ragged_batch_and_stop_tokens_equal_transformers():
    """Prompts of different lengths (transformers: left padding and an attention mask) and a
    stop token (transformers: eos_token_id, then pad_token_id) give the same tokens."""
    ref = reference("GPT2LMHeadModel", **GPT2)
    model = dp.gpt2(ref.config)
    params = dp.load_pretrained(model, state_dict(ref))
    prompts = [[8, 9], [5, 6, 7, 1], [3, 4, 5]]
    ids = torch.tensor([[0] * (4 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (4 - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                              pad_token_id=0)[:, 4:].numpy()
    np.testing.assert_array_equal(dp.generate(model, params, prompts, 12), theirs)
    stop = int(theirs[1, 3])
    with torch.no_grad():
        stopped = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=stop,
                               pad_token_id=98)[:, 4:].numpy()
    stopped = np.pad(stopped, ((0, 0), (0, 12 - stopped.shape[1])), constant_values=98)
    tokens, lengths = dp.generate(model, params, prompts, 12, eos=stop, pad_id=98)
    np.testing.assert_array_equal(tokens, stopped)
    first = [np.flatnonzero(row == stop) for row in theirs]
    assert lengths[1] <= 4 and list(lengths) == [int(f[0]) + 1 if f.size else 12 for f in first]


def test_loads_safetensors_files_and_save_pretrained_directories(tmp_path):
    from safetensors.numpy import save_file
    ref = reference("GPT2LMHeadModel", **GPT2, tie_word_embeddings=False)
    ref.save_pretrained(tmp_path / "gpt2")
    model, params = dp.from_pretrained(tmp_path / "gpt2")
    assert not model.tied and params["head"]["table"].shape == (99, 32)
    ids = jnp.asarray(batch()[0])
    with torch.no_grad():
        logits = ref(torch.tensor(np.asarray(ids))).logits.numpy()
    np.testing.assert_allclose(dp.batched(model)(params, ids), logits, atol=1e-5, rtol=1e-5)
    save_file(state_dict(ref), str(tmp_path / "weights.safetensors"))
    chex.assert_trees_all_equal(dp.load_pretrained(model, tmp_path / "weights.safetensors"), params)

    bert = reference("BertForMaskedLM", **BERT)
    bert.save_pretrained(tmp_path / "bert")
    model, params = dp.from_pretrained(tmp_path / "bert", head="masked_lm")
    chex.assert_trees_all_equal(params, dp.load_pretrained(model, state_dict(bert)))


def test_a_missing_extra_or_misshapen_weight_is_named():
    ref = state_dict(reference("BertForMaskedLM", **BERT))
    model = dp.bert(BERT, head="masked_lm")
    missing = {k: v for k, v in ref.items() if k != "bert.encoder.layer.1.output.dense.bias"}
    with pytest.raises(dp.LayerError, match=r"lacks \['encoder.layer.1.output.dense.bias'\]"):
        dp.load_pretrained(model, missing)
    with pytest.raises(dp.LayerError, match="holds \\['extra.weight'\\]"):
        dp.load_pretrained(model, {**ref, "extra.weight": np.zeros(3)})
    wrong = {**ref, "bert.embeddings.token_type_embeddings.weight": np.zeros((3, 32), np.float32)}
    with pytest.raises(dp.LayerError, match=r"token_type_embeddings.weight .*\(3, 32\).*\(2, 32\)"):
        dp.load_pretrained(model, wrong)
    with pytest.raises(dp.LayerError, match=r"encoder.layer.0.intermediate.dense.(weight|bias) \(and the other 1 layers\)"):
        dp.load_pretrained(dp.bert(BERT, head="masked_lm", intermediate_size=36), ref)
    untied = {**ref, "cls.predictions.decoder.weight": ref["cls.predictions.decoder.weight"] + 1}
    with pytest.raises(dp.LayerError, match="cls.predictions.decoder.weight differs from embeddings.word_embeddings"):
        dp.load_pretrained(model, untied)
    # a pretrained body under a new head: the head's params from `fill`, the old head ignored
    qa = dp.bert(BERT, head="question_answering")
    fresh = qa.init(jax.random.key(1), jnp.zeros(4, jnp.int32))
    with pytest.raises(dp.LayerError, match="qa_outputs"):
        dp.load_pretrained(qa, ref, ignore=("cls.",))
    params = dp.load_pretrained(qa, ref, fill=fresh, ignore=("cls.",))
    chex.assert_trees_all_equal(params["question_answering"], fresh["question_answering"])
    chex.assert_trees_all_equal(dp.load_pretrained(qa, ref, fill=jax.random.key(1), ignore=("cls.",)), params)
    chex.assert_trees_all_equal(params["encoder"]["stack"]["feedforward"]["norm"]["scale"][1],
                                ref["bert.encoder.layer.1.output.LayerNorm.weight"])


@pytest.mark.parametrize("build, fields, field", [
    (dp.bert, {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    (dp.bert, {"hidden_act": "swish"}, "hidden_act"),
    (dp.bert, {"is_decoder": True}, "is_decoder"),
    (dp.bert, {"hiden_size": 32}, "hiden_size"),
    (dp.gpt2, {"activation_function": "quick_gelu"}, "activation_function"),
    (dp.gpt2, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_configs_diffprog_cannot_express_are_errors_naming_the_field(build, fields, field):
    with pytest.raises(dp.ArgumentError, match=field):
        build(**fields)
    if field != "hiden_size":  # the same from a config object
        config = (transformers.BertConfig if build is dp.bert else transformers.GPT2Config)(**fields)
        with pytest.raises(dp.ArgumentError, match=field):
            build(config)


def test_a_config_of_another_model_is_refused():
    with pytest.raises(dp.ArgumentError, match="bert: got the config of a 'gpt2' model"):
        dp.bert(transformers.GPT2Config(**GPT2))
    with pytest.raises(dp.ArgumentError, match="tie_word_embeddings"):
        dp.bert(BERT, head="masked_lm", tie_word_embeddings=False)


def test_segments_are_checked():
    model = dp.bert(BERT, head=None)
    ids = jnp.arange(5)
    params = model.init(jax.random.key(0), ids)
    with pytest.raises(dp.LayerError, match=r"EmbedSegment\(2\): expected input \(5,\) int"):
        model(params, ids, segments=jnp.zeros(4, jnp.int32))
    with pytest.raises(dp.LayerError, match=r"token ids in \[0, 2\), got \[2\]"):
        model(params, ids, segments=jnp.array([0, 0, 1, 1, 2]))
    assert np.isnan(jax.jit(model.apply)(params, ids, segments=jnp.array([0, 0, 1, 1, 2]))[0]).all()


def test_block_keywords_change_exactly_what_they_name():
    x = jax.random.normal(jax.random.key(0), (5, 8))
    block = dp.TransformerBlock(8, 2, 16, use_bias=False, activation="gelu_tanh", eps=1e-3)
    params = block.init(jax.random.key(1), x)
    assert not [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                if "bias" in dp.checks.path_name(p) and "norm" not in dp.checks.path_name(p)]
    # the post-LN equation with these choices, written out
    attention = params["attention"]["f"]["0_Attention"]
    a = dp.Attention(2, use_bias=False)(attention, x)
    norm = lambda p, v: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-3) * p["scale"] + p["bias"]
    h = norm(params["attention"]["norm"], x + a)
    ff = params["feedforward"]["f"]
    f = jax.nn.gelu(h @ ff["0_FeedForward"]["weight"], approximate=True) @ ff["1_Dense"]["weight"]
    np.testing.assert_allclose(block(params, x), norm(params["feedforward"]["norm"], h + f), atol=1e-5)


def test_language_model_heads_untied_and_biased():
    body = dp.TransformerBlock(8, 2, 16, causal=True)
    ids = jnp.arange(6) % 11
    for tied, bias in [(True, True), (False, False), (False, True)]:
        model = dp.LanguageModel(11, 8, body, per_position=True, tied=tied, head_bias=bias)
        params = model.init(jax.random.key(0), ids)
        table = params["embed"]["table"] if tied else params["head"]["table"]
        params = jax.tree.map(lambda a: a + 0.1, params)  # a nonzero bias
        table = table + 0.1
        h = dp.LanguageModel(11, 8, body, per_position=True, tied=tied, head_bias=bias).apply(params, ids)
        hidden = body(params["body"], params["embed"]["table"][ids])
        expected = hidden @ table.T + (params["head"]["bias"] if bias else 0)
        np.testing.assert_allclose(h, expected, atol=1e-5)
        assert ("head" in params) == (bias or not tied)


def test_wordpiece_and_bpe_tokenizers_trained_offline(tmp_path):
    lines = ["The quick brown fox jumps over the lazy dog.", "Who says 'to be or not to be'? Hamlet says it."] * 50
    wordpiece = dp.text.train_wordpiece(lines, vocab_size=120, min_frequency=1)
    assert [wordpiece.token_to_id(t) for t in dp.text.WORDPIECE_SPECIALS] == [0, 1, 2, 3, 4]
    question, paragraph = "who says it?", "Hamlet says it."
    enc = wordpiece.encode(question, paragraph)
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]" and enc.tokens.count("[SEP]") == 2
    first = enc.type_ids.index(1)
    assert set(enc.type_ids[:first]) == {0} and enc.sequence_ids[first] == 1
    # a character span of the paragraph → its tokens → the same characters
    start, end = paragraph.index("Hamlet"), paragraph.index("Hamlet") + len("Hamlet")
    tokens = [i for i, (s, o) in enumerate(zip(enc.sequence_ids, enc.offsets)) if s == 1 and o[0] >= start and o[1] <= end]
    assert paragraph[enc.offsets[tokens[0]][0]:enc.offsets[tokens[-1]][1]] == "Hamlet"
    assert wordpiece.decode(enc.ids) == "who says it? hamlet says it."
    bpe = dp.text.train_bpe(lines, vocab_size=300, min_frequency=1)
    text = "Ünïcode and the lazy dog\n  twice"
    assert bpe.decode(bpe.encode(text).ids) == text
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    assert dp.text.load_tokenizer(tmp_path).encode(question, paragraph).ids == enc.ids


@pytest.mark.slow
def test_benchmark_quick_compares_the_same_computation(tmp_path):
    from benchmarks import pretrained
    results = pretrained.main(["--quick", "--out", str(tmp_path)])
    bert, *generations = results["cases"]
    assert bert["error"] < 1e-4 and len(generations) == 3 and all(g["agreement"] == 1.0 for g in generations)
    assert (tmp_path / "pretrained_quick.md").exists()
