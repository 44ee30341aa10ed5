"""experiments.bert_qa: BERT's masking rule, questions whose answers round-trip through the
tokeniser, the span loss and SQuAD's metrics, and the tiny preset end to end."""
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffprog as dp
from experiments import bert_qa

NAMES = ["ROMEO", "JULIET", "FIRST CITIZEN", "NURSE"]
WORDS = ("love night day sword crown grave tomorrow honour heaven fortune blood moon father king queen "
         "death truth light shadow mercy fear gold youth storm peace war name heart hand eye").split()


def play(speeches: int, seed: int = 0) -> str:
    """A play in tinyshakespeare's layout: "NAME:" lines above speeches, blank lines between."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(speeches):
        lines = [" ".join(rng.choice(WORDS, rng.integers(5, 9))).capitalize() + rng.choice([".", ",", "!", "?"])
                 for _ in range(rng.integers(1, 4))]
        out.append(f"{rng.choice(NAMES).title() if rng.random() < 0.5 else rng.choice(NAMES)}:\n" + "\n".join(lines))
    return "\n\n".join(out) + "\n"


def test_masking_follows_berts_rule():
    vocab, batch, steps = 100, 64, 128
    ids = jax.random.randint(jax.random.key(0), (batch, steps), bert_qa.FIRST_WORD, vocab)
    lengths = jax.random.randint(jax.random.key(1), (batch,), 10, steps + 1)
    ids = ids.at[:, 0].set(2).at[jnp.arange(batch), lengths - 1].set(3)  # [CLS] ... [SEP]
    ids = jnp.where(jnp.arange(steps) < lengths[:, None], ids, bert_qa.PAD)
    corrupted, chosen = map(np.asarray, bert_qa.mask_tokens(jax.random.key(2), ids, lengths, vocab))
    ids = np.asarray(ids)
    valid = (ids >= bert_qa.FIRST_WORD) & (np.arange(steps) < np.asarray(lengths)[:, None])
    assert not chosen[~valid].any() and (corrupted[~chosen] == ids[~chosen]).all()
    assert abs(chosen.sum() / valid.sum() - 0.15) < 0.015
    masked = corrupted[chosen] == bert_qa.MASK
    kept = corrupted[chosen] == ids[chosen]
    replaced = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.04 and abs(kept.mean() - 0.1) < 0.03 and abs(replaced.mean() - 0.1) < 0.03
    assert (corrupted[chosen][replaced] >= bert_qa.FIRST_WORD).all() and (corrupted < vocab).all()


@pytest.fixture(scope="module")
def asked():
    cut = bert_qa.paragraphs(play(80), 30)
    rng = np.random.default_rng(0)
    return cut, [q for paragraph in cut for q in bert_qa.questions(paragraph, rng, 3)]


def test_questions_use_every_quote_up_to_per_type():
    paragraph = bert_qa.paragraphs(play(10), 60)[0]
    rng = np.random.default_rng(0)
    every = bert_qa.questions(paragraph, rng)
    capped = bert_qa.questions(paragraph, rng, 2)
    count = lambda qs, kind: sum(q["type"] == kind for q in qs)
    assert count(every, "next") > 2 and count(capped, "next") == 2
    assert len({q["question"] for q in every}) == len(every)  # each quote asked once a type


def test_paragraphs_keep_the_text_in_order(asked):
    cut, _ = asked
    text = play(80)
    assert len(cut) > 10 and text.index(cut[1]) > text.index(cut[0])
    assert " ".join(" ".join(cut).split()) == " ".join(text.split())  # nothing lost, nothing added


def test_questions_are_answered_by_spans_that_round_trip_through_the_tokeniser(asked):
    cut, examples = asked
    assert {e["type"] for e in examples} == set(bert_qa.TYPES)
    for e in examples:
        assert e["paragraph"][e["start"]:e["start"] + len(e["answer"])] == e["answer"]
        quoted = re.search(r"\s+".join(map(re.escape, e["question"].split('"')[1].split())), e["paragraph"])
        if e["type"] == "speaker":  # the name on the nearest "NAME:" line above the quote
            names = re.findall(r"^(.+):$", e["paragraph"][:quoted.start()], re.M)
            assert names[-1] == e["answer"] and e["answer"].upper() in NAMES
        else:
            assert e["start"] >= quoted.end()
    tokenizer = bert_qa.tokenizer_for(cut, 400)
    arrays, offsets, kept = bert_qa.encode_questions(tokenizer, examples, 96)
    assert len(kept) == len(examples) > 50
    for n, e in enumerate(kept):
        first, last = arrays["targets"][n]
        assert (arrays["segments"][n, first:last + 1] == 1).all()
        assert e["paragraph"][offsets[n, first, 0]:offsets[n, last, 1]] == e["answer"]
        pieces = tokenizer.decode(arrays["inputs"][n, first:last + 1].tolist())
        assert re.findall(r"\w+", pieces) == re.findall(r"\w+", e["answer"])  # cased: ROMEO is not romeo


def test_the_reader_is_bert_with_pre_ln_rotary_blocks_and_berts_params():
    shape = dict(d=16, heads=2, layers=2, max_len=12)
    ids = jnp.arange(5, 15)
    for head in ("question_answering", "masked_lm"):
        bert = bert_qa.reader(types.SimpleNamespace(**shape, bert_blocks=True), 40, head)
        reader = bert_qa.reader(types.SimpleNamespace(**shape, bert_blocks=False), 40, head)
        assert not bert.block.pre_norm and bert.block.rotary is None
        assert reader.block.pre_norm and reader.block.rotary == bert_qa.ROTARY_THETA
        params = bert.init(jax.random.key(0), ids)
        assert jax.tree.structure(reader.init(jax.random.key(0), ids)) == jax.tree.structure(params)
        # the same weights, another function: the blocks really changed
        first = lambda model: jax.tree.leaves(model.apply(params, ids))[0]
        assert not np.allclose(first(reader), first(bert), atol=1e-3)


def test_span_loss_and_best_span_on_a_hand_made_example():
    # [CLS] q q [SEP] p p p [SEP] pad: the paragraph is positions 4..6
    batch = {"inputs": jnp.ones((1, 9), jnp.int32), "segments": jnp.array([[0, 0, 0, 0, 1, 1, 1, 1, 0]]),
             "lengths": jnp.array([8]), "targets": jnp.array([[5, 6]])}
    start = jnp.array([[9.0, 9.0, 0.0, 0.0, 1.0, 2.0, 0.5, 9.0, 9.0]])
    end = jnp.array([[0.0, 0.0, 9.0, 0.0, 2.0, 0.0, 1.8, 9.0, 9.0]])
    inside = lambda x: np.asarray(x[0, 4:7])
    log_softmax = lambda x: x - np.log(np.exp(x).sum())
    expected = -(log_softmax(inside(start))[1] + log_softmax(inside(end))[2]) / 2
    np.testing.assert_allclose(bert_qa.span_loss((start, end), batch), expected, rtol=1e-6)
    # the best start (5) and the best end (4) cross: the best span with first <= last is (5, 6)
    np.testing.assert_array_equal(bert_qa.best_span((start, end), batch), [[5, 6]])
    assert float(bert_qa.span_exact((start, end), batch)) == 1.0
    grads = jax.grad(lambda s: bert_qa.span_loss((s, end), batch))(start)
    assert not np.asarray(grads)[0, [0, 1, 2, 3, 7, 8]].any()  # nothing outside the paragraph learns


def test_squad_metrics():
    assert bert_qa.exact_match("The Crown.", "crown") == 1.0
    assert bert_qa.exact_match("a crown", "gold crown") == 0.0
    assert bert_qa.token_f1("gold crown of the king", "crown king") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))  # "the" is dropped
    assert bert_qa.token_f1("sword", "crown") == 0.0
    example = {"question": 'who says "the crown of gold"?', "paragraph": "KING:\nthe crown of gold is mine."}
    assert bert_qa.overlap_baseline(example, 3) == "the crown of"


def test_position_prior_answers_with_the_most_frequent_offset_and_length_of_the_type():
    paragraph = "KING:\nthe crown of gold is mine, said he."
    seen = [{"type": "speaker", "paragraph": paragraph, "answer": "KING", "start": 0},
            {"type": "next", "paragraph": paragraph, "answer": "is mine", "start": paragraph.index("is")},
            {"type": "next", "paragraph": paragraph, "answer": "is mine", "start": paragraph.index("is")},
            {"type": "next", "paragraph": paragraph, "answer": "the crown", "start": paragraph.index("the")}]
    prior = bert_qa.position_prior(seen)
    assert prior == {"speaker": (0, 1), "next": (5, 2)}
    other = {"type": "next", "paragraph": "QUEEN:\nno sword of mine shall fall"}
    assert bert_qa.prior_baseline(other, prior) == "shall fall"
    short = {"type": "next", "paragraph": "QUEEN:\nno sword"}
    assert bert_qa.prior_baseline(short, prior) == "sword"  # past the end: the last words there are


@pytest.mark.slow
def test_tiny_preset_runs_end_to_end(tmp_path):
    text = tmp_path / "play.txt"
    text.write_text(play(150))
    results = bert_qa.main(["--preset", "tiny", "--text", str(text), "--out", str(tmp_path), "--labels", "8", "1000"])
    out = next((tmp_path / "bert_qa").iterdir())
    assert {p.name for p in out.iterdir()} >= {"results.json", "config.json", "learning_curves.png", "attention.png",
                                               "label_efficiency.png"}
    saved = json.loads((out / "results.json").read_text())
    arms = [*bert_qa.ARMS, "position-prior baseline", "overlap baseline"]
    assert list(saved["scores"]) == arms and "| (b) masked-LM pretrained | all |" in saved["table"]
    for arm in arms:
        assert set(saved["scores"][arm]) == {"all", *bert_qa.TYPES}
        assert 0 <= saved["scores"][arm]["all"]["f1"] <= 100
        assert set(saved["train_scores"][arm]) == {"all", *bert_qa.TYPES}
    assert saved["config"]["questions"]["test"] > 0 and len(saved["decoded"]) > 0
    # 8 QA steps evaluated every 4 for (a) and (b) (after its 4 masked-LM steps); (c) takes 8 + 4
    assert [s for s, _ in results["curves"][bert_qa.ARMS[0]]] == [4, 8]
    assert [s for s, _ in results["curves"][bert_qa.ARMS[1]]] == [4, 8]
    assert [s for s, _ in results["curves"][bert_qa.ARMS[2]]] == [4, 8, 12]
    assert [s for s, _ in results["pretrain_curve"]] == [4]
    # the curve: 8 labelled questions, and all of them (1000 is more than the play gives), 2 seeds each
    every = saved["config"]["questions"]["train"]
    for arm in bert_qa.LABEL_ARMS.values():
        assert sorted(map(int, saved["label_efficiency"][arm])) == [8, every]
        assert all(len(runs) == 2 for runs in saved["label_efficiency"][arm].values())
