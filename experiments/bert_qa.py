"""The notes' question answering on real text: BERT selects the span of a paragraph that answers
a question, trained from scratch or after masked-LM pretraining on the same text.

    python -m experiments.bert_qa --text ../shared/data/tinyshakespeare.txt

The questions come from the text itself. Its paragraphs (~16 words, so that question and
paragraph fit in 80 tokens) are cut, by position, into train / validation / test (80/10/10), and
each paragraph gives up to `--per_type` questions of each type, the answer a span of it:

- next:      what follows "<4 words>"?                   → the 3 words after them;
- sentence:  what begins the sentence after "<4 words>"? → the first 3 words of the next sentence;
- speaker:   who says "<4 words>"?                       → the name on the "NAME:" line above that
  speech (plays only): finding the quote is string matching, the answer is not next to it.

A cased WordPiece vocabulary is learned from the training paragraphs. Three arms train the same
BERT (`reader`: pre-LN blocks with rotary positions) on every training question: (a) span QA
from random initialisation, `--qa_steps`; (b) masked-LM pretraining on the training paragraphs
(BERT's 15% of tokens, 80% [MASK] / 10% random / 10% kept, `--pretrain_steps`), then the same
span QA from those weights: equal fine-tuning; (c) span QA from random initialisation for
qa_steps + pretrain_steps: equal total compute with (b). QA's learning rate is constant after its
warmup, so (c) is (a) trained on: it resumes (a)'s checkpoint.
With `--labels` (the `labels` preset), a label-efficiency curve: arms (a) and (b) fine-tuned on
that many labelled questions, `--seeds` seeds each (the pretraining is run once). Reported on
the test paragraphs: SQuAD's exact match and token F1 per arm and question type, beside two
baselines — position prior (the most frequent answer offset and length of the question type in
training) and overlap (the answer-length span with the most words in common with the question)
— with validation scores and train EM (can the model fit its questions?), learning curves, one
example's attention from the question to the paragraph (read through `dp.taps`), and decoded
test answers, right and wrong. Without --text it reads English prose that ships with Python
(pydoc_data), so it runs offline.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import string
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from tqdm import tqdm

import diffprog as dp

from .common import at_least, markdown_table, parser, positive_float, read_text, run_dir, save_config, save_json

WORD = re.compile(r"\w+(?:'\w+)*")
SPEAKER = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*)*):[ \t]*$", re.M)
QUOTE, ANSWER = 4, 3  # words quoted in a question; words in a next / sentence answer
TYPES = ("next", "sentence", "speaker")
PAD, MASK = 0, 4  # dp.text.WORDPIECE_SPECIALS: [PAD] [UNK] [CLS] [SEP] [MASK] are ids 0..4
FIRST_WORD = len(dp.text.WORDPIECE_SPECIALS)
LONGEST_SPAN = 16  # tokens a predicted answer may have
ROTARY_THETA = 10_000.0
ARMS = ("(a) from scratch", "(b) masked-LM pretrained", "(c) from scratch, equal compute")
LABEL_ARMS = {"scratch": "from scratch", "pretrained": "masked-LM pretrained"}

PRESETS = {
    "default": dict(layers=2, d=128, heads=8, vocab=3000, words=16, max_len=80, qa_steps=2500, pretrain_steps=500,
                    batch=32, per_type=4, eval_every=500, eval_questions=512, seeds=3, labels=()),
    "labels": dict(layers=2, d=128, heads=8, vocab=3000, words=16, max_len=80, qa_steps=1000, pretrain_steps=500,
                   batch=32, per_type=4, eval_every=500, eval_questions=512, seeds=3, labels=(100, 1000, 10_000, 10 ** 6)),
    "tiny": dict(layers=1, d=32, heads=2, vocab=400, words=16, max_len=80, qa_steps=8, pretrain_steps=4, batch=4,
                 per_type=2, eval_every=4, eval_questions=8, seeds=2, labels=()),
}
"""default: the three arms (~13 min here); labels: the label-efficiency curve, each run qa_steps
long (sizes past the questions there are mean all of them; ~1 h here); tiny: the tests' smoke run."""


def paragraphs(text: str, words: int) -> list:
    """The text cut, in order, into paragraphs of about `words` words: at a blank line once a
    paragraph has `words` words, at a line end once it has 1.5×, anywhere once it has 2×."""
    found, start, count, end = [], 0, 0, 0
    for match in WORD.finditer(text):
        gap = text[end:match.start()]
        if count and ((count >= words and "\n\n" in gap) or (count >= 1.5 * words and "\n" in gap) or count >= 2 * words):
            found.append(text[start:match.start()].rstrip())
            count = 0
        if count == 0:
            start = match.start()
        count, end = count + 1, match.end()
    if count >= words // 2:
        found.append(text[start:].rstrip())
    return found


def questions(paragraph: str, rng: np.random.Generator, per_type: int = 1 << 30) -> list:
    """Up to `per_type` questions of each type about `paragraph` (see the module docstring), drawn
    without replacement from every quote that asks one, each {"type", "question", "paragraph",
    "answer", "start"}: the answer is paragraph[start:start + len(answer)]. A quote is QUOTE
    consecutive words that occur once in the paragraph."""
    words = list(WORD.finditer(paragraph))
    lowered = [w.group().lower() for w in words]
    counts = collections.Counter(tuple(lowered[i:i + QUOTE]) for i in range(len(words) - QUOTE + 1))
    labels = list(SPEAKER.finditer(paragraph))
    in_label = {i for i, w in enumerate(words) for m in labels if m.start(1) <= w.start() < m.end(1)}

    def quotable(i):  # words i..i+QUOTE-1 exist, occur once and hold no speaker's name
        return (i + QUOTE <= len(words) and counts[tuple(lowered[i:i + QUOTE])] == 1
                and not in_label & set(range(i, i + QUOTE)))

    def quote(i):  # as it stands in the paragraph, its line breaks and indents as single spaces
        return " ".join(paragraph[words[i].start():words[i + QUOTE - 1].end()].split())

    def answer_words(i):
        return words[i].start(), words[i + ANSWER - 1].end()

    ends_sentence = [bool(re.search(r"[.!?]", paragraph[words[i].end():words[i + 1].start()]))
                     for i in range(len(words) - 1)]
    starts = [0] + [i + 1 for i, end in enumerate(ends_sentence) if end]  # first word of each sentence
    sentence_of = np.searchsorted(starts, np.arange(len(words)), side="right") - 1
    candidates = {
        "next": [(i, answer_words(i + QUOTE)) for i in range(len(words) - QUOTE - ANSWER + 1) if quotable(i)],
        "sentence": [(i, answer_words(starts[s + 1])) for i in range(len(words)) for s in [sentence_of[i]]
                     if quotable(i) and sentence_of[i + QUOTE - 1] == s and s + 1 < len(starts)
                     and starts[s + 1] + ANSWER <= len(words)
                     and sentence_of[starts[s + 1] + ANSWER - 1] == s + 1],
        "speaker": [(i, (label.start(1), label.end(1))) for k, label in enumerate(labels)
                    for i in range(len(words)) if quotable(i) and words[i].start() > label.end()
                    and (k + 1 == len(labels) or words[i + QUOTE - 1].end() < labels[k + 1].start())],
    }
    asked = {"next": 'what follows "{}"?', "sentence": 'what begins the sentence after "{}"?', "speaker": 'who says "{}"?'}
    made = []
    for kind in TYPES:
        for k in rng.permutation(len(candidates[kind]))[:per_type]:
            i, (start, end) = candidates[kind][k]
            made.append({"type": kind, "question": asked[kind].format(quote(i)), "paragraph": paragraph,
                         "answer": paragraph[start:end], "start": start})
    return made


def token_span(encoding, start: int, end: int):
    """(first, last) token of the second sequence (the paragraph) whose characters are exactly
    [start, end), or None when the tokens do not cover that range exactly."""
    inside = [t for t, (sequence, (a, b)) in enumerate(zip(encoding.sequence_ids, encoding.offsets))
              if sequence == 1 and a < end and b > start]
    if not inside or encoding.offsets[inside[0]][0] != start or encoding.offsets[inside[-1]][1] != end:
        return None
    return inside[0], inside[-1]


def encode_questions(tokenizer, examples: list, max_len: int):
    """([CLS] question [SEP] paragraph [SEP] as arrays {"inputs", "segments", "lengths",
    "targets" (the answer's first and last token)}, character offsets (N, max_len, 2), the
    examples kept): an example is dropped when it does not fit in max_len tokens or its answer
    is not a whole token span."""
    rows, kept = [], []
    for example, encoding in zip(examples, tokenizer.encode_batch([(e["question"], e["paragraph"]) for e in examples])):
        span = token_span(encoding, example["start"], example["start"] + len(example["answer"]))
        if len(encoding.ids) <= max_len and span is not None:
            rows.append((encoding, span))
            kept.append(example)
    arrays = {"inputs": np.zeros((len(rows), max_len), np.int32), "segments": np.zeros((len(rows), max_len), np.int32),
              "lengths": np.array([len(e.ids) for e, _ in rows], np.int32),
              "targets": np.array([span for _, span in rows], np.int32).reshape(-1, 2)}
    offsets = np.zeros((len(rows), max_len, 2), np.int32)
    for n, (encoding, _) in enumerate(rows):
        arrays["inputs"][n, :len(encoding.ids)] = encoding.ids
        arrays["segments"][n, :len(encoding.ids)] = encoding.type_ids
        offsets[n, :len(encoding.ids)] = encoding.offsets
    return arrays, offsets, kept


def encode_text(tokenizer, texts: list, max_len: int) -> dict:
    """[CLS] text [SEP] (cut to max_len tokens, [SEP] kept last) as {"inputs", "lengths"}."""
    encodings = tokenizer.encode_batch(texts)
    ids = [e.ids if len(e.ids) <= max_len else e.ids[:max_len - 1] + e.ids[-1:] for e in encodings]
    inputs = np.zeros((len(ids), max_len), np.int32)
    for n, row in enumerate(ids):
        inputs[n, :len(row)] = row
    return {"inputs": inputs, "lengths": np.array([len(row) for row in ids], np.int32)}


def mask_tokens(key, ids, lengths, vocab: int, rate: float = 0.15):
    """BERT's masked-LM corruption of ids (B, T) with valid `lengths` (B,): each valid token that
    is not special (id ≥ FIRST_WORD) is chosen with probability `rate`; a chosen token becomes
    [MASK] with probability 0.8, a random non-special token with 0.1, and stays itself with 0.1.
    Returns (corrupted ids, chosen (B, T) bool): the loss counts the chosen positions."""
    choose, action, replace = jax.random.split(key, 3)
    valid = (ids >= FIRST_WORD) & (jnp.arange(ids.shape[1]) < lengths[:, None])
    chosen = valid & (jax.random.uniform(choose, ids.shape) < rate)
    u = jax.random.uniform(action, ids.shape)
    random_ids = jax.random.randint(replace, ids.shape, FIRST_WORD, vocab)
    return jnp.where(chosen & (u < 0.8), MASK, jnp.where(chosen & (u >= 0.9), random_ids, ids)), chosen


def masked_batch(key, batch: dict, vocab: int) -> dict:
    corrupted, chosen = mask_tokens(key, batch["inputs"], batch["lengths"], vocab)
    return {"inputs": corrupted, "targets": batch["inputs"], "mask": chosen, "lengths": batch["lengths"]}


def paragraph_logits(outputs, batch):
    """The start and end logits with every position outside the paragraph ([CLS], the question,
    the [SEP]s, padding) at -1e9, so that a span can only be chosen inside the paragraph."""
    steps = jnp.arange(batch["inputs"].shape[1])
    inside = (batch["segments"] == 1) & (steps < batch["lengths"][:, None] - 1)
    return [jnp.where(inside, logits, -1e9) for logits in outputs]


def span_loss(outputs, batch):
    """SQuAD's loss: the mean of the cross-entropies of the answer's first and last token, each a
    softmax over the paragraph's positions. outputs: start and end logits (B, T); targets (B, 2)."""
    start, end = paragraph_logits(outputs, batch)
    return (dp.metrics.cross_entropy(start, batch["targets"][:, 0])
            + dp.metrics.cross_entropy(end, batch["targets"][:, 1])) / 2


def best_span(outputs, batch):
    """(B, 2): the span first ≤ last < first + LONGEST_SPAN inside the paragraph with the
    largest start_first + end_last."""
    start, end = paragraph_logits(outputs, batch)
    steps = start.shape[1]
    first, last = jnp.arange(steps)[:, None], jnp.arange(steps)[None]
    scores = jnp.where((last >= first) & (last < first + LONGEST_SPAN), start[:, :, None] + end[:, None, :], -jnp.inf)
    flat = jnp.argmax(scores.reshape(start.shape[0], -1), -1)
    return jnp.stack([flat // steps, flat % steps], -1)


def span_exact(outputs, batch):
    """The fraction of questions whose predicted token span is the answer's."""
    return jnp.mean(jnp.all(best_span(outputs, batch) == batch["targets"], -1))


def normalize(text: str) -> list:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles; its words."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return [w for w in text.split() if w not in ("a", "an", "the")]


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize(prediction) == normalize(truth))


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD's F1 between the normalised words of a prediction and of the true answer."""
    predicted, true = normalize(prediction), normalize(truth)
    common = sum((collections.Counter(predicted) & collections.Counter(true)).values())
    if not predicted or not true:
        return float(predicted == true)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(true)
    return 2 * precision * recall / (precision + recall)


def overlap_baseline(example: dict, length: int) -> str:
    """The span of `length` words of the paragraph with the most words in common with the question."""
    words = list(WORD.finditer(example["paragraph"]))
    asked = {w.lower() for w in WORD.findall(example["question"])}
    best = max(range(max(len(words) - length + 1, 1)),
               key=lambda i: len(asked & {w.group().lower() for w in words[i:i + length]}))
    return example["paragraph"][words[best].start():words[min(best + length, len(words)) - 1].end()]


def word_span(example: dict):
    """(index of the answer's first word among the paragraph's words, its number of words)."""
    starts = [w.start() for w in WORD.finditer(example["paragraph"])]
    return starts.index(example["start"]), len(WORD.findall(example["answer"]))


def position_prior(examples: list) -> dict:
    """{type: (word offset, words)}: the most frequent answer span of each question type."""
    counts = collections.defaultdict(collections.Counter)
    for e in examples:
        counts[e["type"]][word_span(e)] += 1
    return {kind: c.most_common(1)[0][0] for kind, c in counts.items()}


def prior_baseline(example: dict, prior: dict) -> str:
    """The paragraph's words at its question type's most frequent answer offset and length."""
    offset, length = prior[example["type"]]
    words = list(WORD.finditer(example["paragraph"]))
    first = min(offset, len(words) - 1)
    return example["paragraph"][words[first].start():words[min(first + length, len(words)) - 1].end()]


def scores(predictions: list, examples: list) -> dict:
    """Exact match and F1 (in %) over all examples and by question type."""
    out = {}
    for kind in ("all",) + TYPES:
        pairs = [(p, e["answer"]) for p, e in zip(predictions, examples) if kind in ("all", e["type"])]
        if pairs:
            out[kind] = {"exact_match": 100 * np.mean([exact_match(*p) for p in pairs]),
                         "f1": 100 * np.mean([token_f1(*p) for p in pairs]), "questions": len(pairs)}
    return out


def reader(args, vocab: int, head: str):
    """The BERT that answers: `dp.bert` of the flags' shape (no dropout: an arm sees each question
    about once, and with dropout a step took ~2× as long), its blocks pre-LN with rotary positions
    (RoPE, θ = 10⁴, beside BERT's learned positions), as ModernBERT's are — unless
    `--bert_blocks` keeps BERT's original post-LN blocks. Finding a quote and pointing past it is
    a comparison of each position with its neighbours, which rotary positions make a function of
    the offset alone; with the original blocks "what follows" stays near 0% EM in this budget."""
    model = dp.bert(dict(vocab_size=vocab, hidden_size=args.d, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, intermediate_size=4 * args.d,
                         max_position_embeddings=args.max_len, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0), head=head)
    if args.bert_blocks:
        return model
    return dp.rewrite(model, lambda layer: isinstance(layer, dp.TransformerBlock),
                      lambda block: dataclasses.replace(block, pre_norm=True, rotary=ROTARY_THETA))


def tokenizer_for(paragraphs: list, vocab: int):
    """A cased WordPiece vocabulary of `vocab` tokens learned from `paragraphs` (as bert-base-cased:
    a speaker's "NAME:" label stands out by its capitals, also for names never seen in training)."""
    return dp.text.train_wordpiece(paragraphs, vocab_size=vocab, lowercase=False)


def batches(arrays: dict, size: int) -> list:
    """The arrays cut into batches of `size` rows (a last smaller batch dropped)."""
    return [{k: jnp.asarray(v[i:i + size]) for k, v in arrays.items()} for i in range(0, len(arrays["inputs"]) - size + 1, size)]


def sampler(arrays: dict, size: int, seed: int, corrupt=None):
    """data(step): `size` random rows of the arrays (then corrupt(key, batch)), jit-compiled."""
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    rows = len(arrays["inputs"])

    def data(step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        batch = {k: v[jax.random.randint(key, (size,), 0, rows)] for k, v in arrays.items()}
        return corrupt(jax.random.fold_in(key, 1), batch) if corrupt else batch
    return jax.jit(data)


def optimizer(lr: float, warmup: int, steps: int = 0):
    """AdamW (weight decay 0.01), its learning rate rising linearly to `lr` in `warmup` steps, then
    constant (steps=0) or decaying along a cosine to lr / 10 at `steps`."""
    schedule = (optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr / 10) if steps
                else optax.linear_schedule(0.0, lr, warmup))
    return optax.adamw(schedule, weight_decay=0.01)


def span_finder(model):
    """spans(params, batch) -> (B, 2): `best_span` of the model's outputs, dropout off; jit-compiled."""
    net = dp.batched(model)
    return jax.jit(lambda params, b: best_span(net.apply(params, b["inputs"], segments=b["segments"], lengths=b["lengths"]), b))


def predict(spans, params, arrays: dict, offsets, examples: list, size: int) -> list:
    """The predicted answer text of every example, from the token spans `spans` finds."""
    spans = np.concatenate([np.asarray(spans(params, {k: jnp.asarray(v[i:i + size]) for k, v in arrays.items()}))
                            for i in range(0, len(examples), size)])
    return [e["paragraph"][offsets[n, first, 0]:offsets[n, last, 1]] for n, (e, (first, last)) in enumerate(zip(examples, spans))]


def question_attention(model, params, arrays: dict, n: int):
    """The last block's attention weights of example n, averaged over heads: (T, T), T its length."""
    length = int(arrays["lengths"][n])
    ids, segments = jnp.asarray(arrays["inputs"][n, :length]), jnp.asarray(arrays["segments"][n, :length])
    *_, last = dp.taps(model, params, ids, lambda layer: isinstance(layer, dp.Attention), segments=segments)
    _, weights = dataclasses.replace(last.layer, return_weights=True).apply(last.params, last.input)
    return np.asarray(weights.mean(0))


def plot(out: Path, curves: dict, baseline: float, pretrain: list, attention, tokens, question, paragraph):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, points in curves.items():
        axes[0].plot([s for s, _ in points], [100 * v for _, v in points], marker="o", label=arm)
    axes[0].axhline(baseline, color="gray", ls="--", label="position-prior baseline (test EM)")
    axes[0].set(xlabel="step (arm (b): after pretraining)", ylabel="validation span exact match (%)", title="span QA")
    axes[0].legend()
    if pretrain:
        axes[1].plot([s for s, _ in pretrain], [v for _, v in pretrain], marker="o")
    axes[1].set(xlabel="pretraining step", ylabel="validation masked-LM loss (nats)", title="masked-LM pretraining")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(paragraph)), max(3, 0.25 * len(question))))
    ax.imshow(attention[np.ix_(question, paragraph)], aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(paragraph)), [tokens[t] for t in paragraph], rotation=90, fontsize=7)
    ax.set_yticks(range(len(question)), [tokens[t] for t in question], fontsize=7)
    ax.set(title="last block's attention (mean over heads): question tokens → paragraph tokens")
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=120)
    plt.close(fig)


def plot_labels(out: Path, curve: dict):
    """Test EM and F1 against the number of labelled questions: mean ± spread over the seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for metric, ax in zip(("exact_match", "f1"), axes):
        for arm, points in curve.items():
            sizes = sorted(points)
            mean = np.array([np.mean([r[metric] for r in points[n]]) for n in sizes])
            low = np.array([np.min([r[metric] for r in points[n]]) for n in sizes])
            high = np.array([np.max([r[metric] for r in points[n]]) for n in sizes])
            ax.plot(sizes, mean, marker="o", label=arm)
            ax.fill_between(sizes, low, high, alpha=0.2)
        ax.set(xscale="log", xlabel="labelled training questions", ylabel=f"test {metric.replace('_', ' ')} (%)")
        ax.legend()
    fig.suptitle("label efficiency: mean and range over seeds")
    fig.tight_layout()
    fig.savefig(out / "label_efficiency.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    dp.keep_freed_memory()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--text", help="UTF-8 text file (default: Python's bundled documentation)")
    p.add_argument("--preset", choices=list(PRESETS), default="default")
    for name, value in PRESETS["default"].items():
        if not isinstance(value, tuple):
            p.add_argument(f"--{name}", type=at_least(1), help="(default: the preset's)")
    p.add_argument("--labels", type=at_least(1), nargs="*",
                   help="labelled-question counts of the label-efficiency curve (default: the preset's; none: no curve)")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--bert_blocks", action="store_true",
                   help="BERT's original post-LN blocks, learned positions only (default: pre-LN blocks with rotary positions)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.d % args.heads:
        p.error(f"--d {args.d} is not divisible by --heads {args.heads}")
    text = read_text(p, args.text)
    started = time.perf_counter()
    out = run_dir("bert_qa", args.out)
    if (out / "scratch").exists():  # (c) would resume another run's (a)
        p.error(f"{out / 'scratch'} exists: another run wrote to {out} (give another --out)")

    cut = paragraphs(text, args.words)
    if len(cut) < 20:
        p.error(f"the text gives {len(cut)} paragraphs of ~{args.words} words; need at least 20")
    bounds = {"train": (0, int(0.8 * len(cut))), "validation": (int(0.8 * len(cut)), int(0.9 * len(cut))),
              "test": (int(0.9 * len(cut)), len(cut))}
    rng = np.random.default_rng(args.seed)
    asked = {split: [q for paragraph in cut[a:b] for q in questions(paragraph, rng, args.per_type)]
             for split, (a, b) in bounds.items()}
    tokenizer = tokenizer_for(cut[slice(*bounds["train"])], args.vocab)
    vocab = tokenizer.get_vocab_size()
    encoded = {split: encode_questions(tokenizer, qs, args.max_len) for split, qs in asked.items()}
    train, _, train_examples = encoded["train"]
    sample = lambda arrays, n: {k: v[:n] for k, v in arrays.items()}
    validation = sample(encoded["validation"][0], args.eval_questions)
    test, test_offsets, test_examples = encoded["test"]
    if min(len(train["inputs"]), len(validation["inputs"]), len(test_examples)) < args.batch:
        p.error(f"too few questions for batches of {args.batch}: train {len(train['inputs'])}, "
                f"validation {len(validation['inputs'])}, test {len(test_examples)}")
    text_data = encode_text(tokenizer, cut[slice(*bounds["train"])], args.max_len)
    text_validation = encode_text(tokenizer, cut[slice(*bounds["validation"])][:args.eval_questions], args.max_len)
    config = save_config(out, {**vars(args), "vocab_size": vocab, "paragraphs": {s: b - a for s, (a, b) in bounds.items()},
                                "questions": {s: len(encoded[s][2]) for s in encoded},
                                "dropped": {s: len(asked[s]) - len(encoded[s][2]) for s in asked}})

    qa, mlm = reader(args, vocab, "question_answering"), reader(args, vocab, "masked_lm")
    spec = jax.ShapeDtypeStruct((args.max_len,), jnp.int32)
    qa_init = lambda seed: qa.init(jax.random.key(seed), spec)
    sample_rows = lambda arrays, rows: {k: v[rows] for k, v in arrays.items()}

    tuning = optimizer(args.lr, max(args.qa_steps // 10, 1))  # one object: every QA run shares one compiled step

    def finetune(params, steps, rows, name, seed, quiet=False, workdir=None, resume=False):
        """QA training; with `workdir`, checkpointed at the end (and with `resume`, continued from
        its last checkpoint)."""
        return dp.train(qa, span_loss, tuning, sampler(sample_rows(train, rows), args.batch, seed), clip_norm=1.0,
                        steps=steps, params=params, seed=seed, quiet=quiet, description=name, workdir=workdir,
                        checkpoint_every=steps if workdir else 0, resume=resume,
                        **({} if quiet else dict(eval_data=batches(validation, args.batch), eval_metrics={"span_exact": span_exact},
                                                 eval_every=args.eval_every)))

    pretrained = dp.train(mlm, lambda logits, b: dp.metrics.cross_entropy(logits, b["targets"], b["mask"]),
                          optimizer(args.lr, max(args.pretrain_steps // 10, 1), args.pretrain_steps),
                          sampler(text_data, args.batch, args.seed, lambda k, b: masked_batch(k, b, vocab)),
                          steps=args.pretrain_steps, description="masked-LM pretraining", seed=args.seed, eval_data=[
                              masked_batch(jax.random.key(10_000 + i), b, vocab)
                              for i, b in enumerate(batches(text_validation, args.batch))], clip_norm=1.0, eval_every=args.eval_every)
    body = {k: pretrained.params[k] for k in ("embeddings", "encoder")}
    starts = {"scratch": qa_init(args.seed), "pretrained": {**qa_init(args.seed), **body}}
    every = np.arange(len(train_examples))
    # (c) is (a) trained on: it resumes (a)'s checkpoint (its step, Adam's moments, the learning rate
    # held constant), so the two arms cost qa_steps + pretrain_steps steps, not 2 qa_steps + pretrain_steps
    runs = {ARMS[0]: finetune(starts["scratch"], args.qa_steps, every, ARMS[0], args.seed, workdir=out / "scratch"),
            ARMS[1]: finetune(starts["pretrained"], args.qa_steps, every, ARMS[1], args.seed)}
    runs[ARMS[2]] = finetune(starts["scratch"], args.qa_steps + args.pretrain_steps, every, ARMS[2], args.seed,
                             workdir=out / "scratch", resume=True)

    spans = span_finder(qa)
    length = collections.Counter(len(WORD.findall(e["answer"])) for e in train_examples).most_common(1)[0][0]
    prior = position_prior(train_examples)

    def evaluate(arrays, offsets, examples, arms=runs):  # ({arm: predicted answers}, {arm: scores})
        predicted = {arm: predict(spans, run.params, arrays, offsets, examples, args.batch) for arm, run in arms.items()}
        predicted["position-prior baseline"] = [prior_baseline(e, prior) for e in examples]
        predicted["overlap baseline"] = [overlap_baseline(e, length) for e in examples]
        return predicted, {arm: scores(answers, examples) for arm, answers in predicted.items()}
    predictions, results = evaluate(test, test_offsets, test_examples)
    _, validation_results = evaluate(validation, encoded["validation"][1], encoded["validation"][2][:args.eval_questions])
    fit = sample(train, args.eval_questions)  # the first questions of the text: every arm trained on them
    _, train_results = evaluate(fit, encoded["train"][1][:args.eval_questions], train_examples[:args.eval_questions])
    curve = lambda run: [(h["step"], h["eval_span_exact"]) for h in run.history if "eval_span_exact" in h]
    curves = {arm: curve(run) for arm, run in runs.items()}
    curves[ARMS[2]] = curves[ARMS[0]] + curves[ARMS[2]]  # (c)'s first qa_steps are (a)
    pretrain_curve = [(h["step"], h["eval_loss"]) for h in pretrained.history if "eval_loss" in h]

    label_curve = {}
    if args.labels:
        cases = [(n, seed) for n in args.labels for seed in range(args.seed, args.seed + args.seeds)]
        for n, seed in tqdm(cases, desc="label efficiency (sizes × seeds, both arms)"):
            rows = np.random.default_rng(seed + 1).permutation(len(train_examples))[:n]
            for start in ("scratch", "pretrained"):
                params = {**qa_init(seed), **(body if start == "pretrained" else {})}
                run = finetune(params, args.qa_steps, rows, start, seed, quiet=True)
                answers = predict(spans, run.params, test, test_offsets, test_examples, args.batch)
                label_curve.setdefault(LABEL_ARMS[start], {}).setdefault(min(n, len(rows)), []).append(
                    scores(answers, test_examples)["all"])
        plot_labels(out, label_curve)

    shown = next(n for n, e in enumerate(test_examples) if e["type"] == TYPES[-1] or n == len(test_examples) - 1)
    attention = question_attention(qa, runs[ARMS[1]].params, test, shown)
    tokens = [tokenizer.id_to_token(int(t)) for t in test["inputs"][shown, :int(test["lengths"][shown])]]
    segments = test["segments"][shown, :len(tokens)]
    plot(out, curves, results["position-prior baseline"]["all"]["exact_match"], pretrain_curve, attention, tokens,
         [t for t in range(1, len(tokens)) if segments[t] == 0 and tokens[t] != "[SEP]"],
         [t for t in range(len(tokens) - 1) if segments[t] == 1])

    cells = lambda r: [f"{r['exact_match']:.1f}", f"{r['f1']:.1f}"] if r else ["–", "–"]
    rows = [[arm, kind, r["questions"], *cells(r), *cells(validation_results[arm].get(kind)),
             cells(train_results[arm].get(kind))[0]]
            for arm, by_type in results.items() for kind, r in by_type.items()]
    table = markdown_table(["arm", "questions", "test n", "test EM %", "test F1 %", "validation EM %", "validation F1 %",
                            "train EM %"], rows)
    if label_curve:
        stat = lambda rs, m: f"{np.mean([r[m] for r in rs]):.1f} ± {np.std([r[m] for r in rs]):.1f}"
        table += "\n\nLabel efficiency: test EM / F1 %, mean ± std over seeds\n\n" + markdown_table(
            ["labelled questions", *(f"{arm} {m}" for arm in label_curve for m in ("EM", "F1"))],
            [[n, *(stat(label_curve[arm][n], m) for arm in label_curve for m in ("exact_match", "f1"))]
             for n in sorted(next(iter(label_curve.values())))])
    best = max(runs, key=lambda arm: results[arm]["all"]["exact_match"])
    right = [exact_match(predictions[best][n], e["answer"]) == 1 for n, e in enumerate(test_examples)]
    shown_examples = [n for kind in TYPES for correct in (True, False)  # of each type, one right and one wrong
                      for n in [m for m, e in enumerate(test_examples) if e["type"] == kind and right[m] == correct][:1]]
    decoded = [{"question": test_examples[n]["question"], "true": test_examples[n]["answer"],
                **{arm: predictions[arm][n] for arm in predictions}} for n in shown_examples]
    results = {"table": table, "scores": results, "validation_scores": validation_results, "train_scores": train_results,
               "curves": curves, "pretrain_curve": pretrain_curve, "label_efficiency": label_curve,
               "decoded": decoded, "wall_seconds": time.perf_counter() - started, "config": config}
    save_json(out / "results.json", results)
    print(table)
    for d in decoded:
        print(f"\nQ: {d['question']}\n  true: {d['true']!r}\n" + "\n".join(f"  {arm}: {d[arm]!r}" for arm in predictions))
    print(f"\n{results['wall_seconds']:.0f} s. Results, plots and config: {out}")
    return results


if __name__ == "__main__":
    main()
