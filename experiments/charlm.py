"""A character-level language model on any UTF-8 text, in nanoGPT's spirit.

    python -m experiments.charlm --text input.txt --body transformer --max_iters 2000

Without --text it trains on English text that ships with every Python installation (the
documentation topics in `pydoc_data`), so it runs offline. LanguageModel = GenerateToken ∘
body ∘ positions ∘ EmbedToken with tied embeddings, trained on next-character prediction with a
90/10 train/validation split. Reports train/val loss (nats) and bits per character, prints
samples, checkpoints to runs/charlm/<timestamp>/ (or --workdir) and resumes with --resume.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffprog as dp

from .common import (at_least, markdown_table, parser, positive_float, probability, read_text, run_dir, save_config,
                     save_json)


def build(body: str, vocab: int, n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float):
    if body == "transformer":
        stack = dp.TransformerBlock(n_embd, n_head, 4 * n_embd, causal=True, pre_norm=True, dropout=dropout) ** n_layer
        return dp.LanguageModel(vocab, n_embd, stack, positions=dp.LearnedPositions(block_size),
                                final_norm=True, per_position=True)
    cell = {"rnn": dp.SimpleRNN, "lstm": dp.LSTM}[body](n_embd)
    return dp.LanguageModel(vocab, n_embd, cell ** n_layer, per_position=True)


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--text", help="UTF-8 text file (default: Python's bundled documentation)")
    p.add_argument("--body", choices=["rnn", "lstm", "transformer"], default="transformer")
    p.add_argument("--n_layer", type=at_least(1), default=4)
    p.add_argument("--n_head", type=at_least(1), default=4)
    p.add_argument("--n_embd", type=at_least(1), default=128)
    p.add_argument("--block_size", type=at_least(1), default=64)
    p.add_argument("--batch_size", type=at_least(1), default=12)
    p.add_argument("--max_iters", type=at_least(1), default=2000)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--dropout", type=probability, default=0.0)
    p.add_argument("--eval_interval", type=at_least(0), default=250)
    p.add_argument("--eval_batches", type=at_least(1), default=20)
    p.add_argument("--checkpoint_every", type=at_least(0), default=500)
    p.add_argument("--workdir", help="run folder (default: a new runs/charlm/<timestamp>/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample_chars", type=at_least(0), default=300)
    args = p.parse_args(argv)
    if args.resume and not args.workdir:
        p.error("--resume needs --workdir")
    out = Path(args.workdir) if args.workdir else run_dir("charlm", args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = read_text(p, args.text)
    if len(text) < 20 * args.block_size:
        p.error(f"the text has {len(text)} characters; need at least {20 * args.block_size}")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], np.int32)
    split = int(0.9 * len(ids))
    train_ids, val_ids = jnp.asarray(ids[:split]), jnp.asarray(ids[split:])
    save_config(out, {**vars(args), "characters": len(text), "vocab": len(chars)})

    @functools.partial(jax.jit, static_argnums=3, compiler_options=dp.core.QUICK_COMPILE)
    def windows(source, seed, index, batch):
        """Batch `index` of random windows from `source`: one program per source and batch, compiled
        for compile time (it gathers a few hundred numbers)."""
        key = jax.random.fold_in(jax.random.key(seed), index)
        starts = jax.random.randint(key, (batch,), 0, source.shape[0] - args.block_size - 1)
        take = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(source, s, args.block_size + 1))(starts)
        return {"inputs": take[:, :-1], "targets": take[:, 1:]}

    data = lambda step: windows(train_ids, args.seed, step, args.batch_size)
    val = [windows(val_ids, 10_000, i, 32) for i in range(args.eval_batches)]
    model = build(args.body, len(chars), args.n_layer, args.n_head, args.n_embd, args.block_size, args.dropout)
    loss = lambda logits, b: dp.metrics.cross_entropy(logits, b["targets"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.max_iters // 10), args.max_iters, 0.1 * args.lr)
    result = dp.train(model, loss, optax.adamw(schedule, weight_decay=0.01), data, steps=args.max_iters,
                      seed=args.seed, eval_data=val, eval_every=args.eval_interval, workdir=out,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, clip_norm=1.0,
                      description=f"charlm {args.body}")
    evals = [h for h in result.history if "eval_loss" in h]
    train_loss = float(np.mean([h["loss"] for h in result.history if "loss" in h][-10:] or [float("nan")]))
    val_loss = evals[-1]["eval_loss"]
    prompt = jnp.asarray(ids[split: split + 16])[None]
    steps = min(args.sample_chars, args.block_size - prompt.shape[1]) if args.body == "transformer" else args.sample_chars
    sample = dp.generate(model, result.params, prompt, steps, key=jax.random.key(args.seed), temperature=0.8)
    text_out = "".join(chars[i] for i in np.asarray(prompt[0])) + "".join(chars[i] for i in np.asarray(sample[0]))
    results = {"train_loss": train_loss, "val_loss": val_loss, "val_bits_per_char": float(dp.metrics.bits(val_loss)),
               "params": int(sum(a.size for a in jax.tree.leaves(result.params))), "steps": result.step,
               "sample": text_out, "evals": evals}
    save_json(out / "results.json", results)
    print(markdown_table(["body", "params", "steps", "train loss", "val loss", "val bits/char"],
                         [[args.body, f"{results['params']:,}", result.step, f"{train_loss:.3f}", f"{val_loss:.3f}",
                           f"{results['val_bits_per_char']:.3f}"]]))
    print("\nSample:\n" + text_out)
    print(f"\nResults, metrics.jsonl and checkpoints: {out}")
    return results


if __name__ == "__main__":
    main()
