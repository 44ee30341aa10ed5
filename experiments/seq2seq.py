"""Sequence-to-sequence on a generated transduction task: reverse a digit string.

    python -m experiments.seq2seq [--steps 1500] [--max_len 12] [--models lstm+attention transformer]

Trains the LSTM encoder/decoder with additive attention and the encoder/decoder Transformer
on strings of 3..max_len digits (teacher forcing, padded batches with source_lengths=), then
decodes greedily and reports exact-match accuracy per input length. Plots accuracy vs length
and a heatmap of the LSTM model's attention weights for one example (a model that has learned
the task by attention puts its weight on the anti-diagonal: output i reads input n−1−i).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffprog as dp
from diffprog.recurrent import reverse_valid_prefix

from .common import at_least, markdown_table, parser, run_dir, save_config, save_json

START, VOCAB = 1, 12  # 0 pad, 1 start, 2..11 digits
MODELS = ("lstm+attention", "transformer")


def batch(key, size, max_len, lengths=None):
    kl, kd = jax.random.split(key)
    if lengths is None:
        lengths = jax.random.randint(kl, (size,), 3, max_len + 1)
    valid = jnp.arange(max_len) < lengths[:, None]
    source = jnp.where(valid, jax.random.randint(kd, (size, max_len), 2, VOCAB), 0)
    target = jnp.where(valid, jax.vmap(reverse_valid_prefix)(source, lengths), 0)
    target_in = jnp.concatenate([jnp.full((size, 1), START), target[:, :-1]], 1)
    return {"inputs": (source, target_in), "targets": target, "mask": valid, "source_lengths": lengths}


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=at_least(1), default=1500)
    p.add_argument("--max_len", type=at_least(1), default=12)
    p.add_argument("--dim", type=at_least(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = p.parse_args(argv)
    out = run_dir("seq2seq", args.out)
    save_config(out, vars(args))
    models = {"lstm+attention": dp.rnn_seq2seq(VOCAB, VOCAB, args.dim),
              "transformer": dp.transformer_seq2seq(VOCAB, VOCAB, args.dim, 4, 2 * args.dim, 2, args.max_len)}
    models = {name: models[name] for name in args.models}
    data = jax.jit(lambda s: batch(jax.random.fold_in(jax.random.key(args.seed), s), 32, args.max_len))
    loss = lambda logits, b: dp.metrics.cross_entropy(logits, b["targets"], b["mask"])
    lengths = list(range(3, args.max_len + 1))
    results, trained = {}, {}
    for name, model in models.items():
        r = dp.train(model, loss, optax.adam(2e-3), data, steps=args.steps, seed=args.seed, clip_norm=1.0,
                     description=name)
        trained[name] = r.params
        accuracy = []
        for n in lengths:
            test = batch(jax.random.key(1000 + n), 256, args.max_len, jnp.full(256, n))
            decoded = dp.translate(model, r.params, test["inputs"][0], args.max_len, START,
                                   source_lengths=test["source_lengths"])
            right = (decoded == test["targets"]) | ~test["mask"]
            accuracy.append(float(right.all(-1).mean()))
        results[name] = {"exact_match": dict(zip(lengths, accuracy)),
                         "final_loss": r.history[-1]["loss"]}
    save_json(out / "results.json", results)

    import matplotlib.pyplot as plt
    heatmap = "lstm+attention" in models
    fig, axes = plt.subplots(1, 1 + heatmap, figsize=(5 + 5 * heatmap, 3.6), squeeze=False)
    axes = axes[0]
    for name, r in results.items():
        axes[0].plot(lengths, list(r["exact_match"].values()), "o-", label=name)
    axes[0].set(xlabel="input length", ylabel="exact match", title="reversal: exact match vs length", ylim=(0, 1.05))
    axes[0].legend()
    if heatmap:
        model = models["lstm+attention"]
        params = trained["lstm+attention"]
        example = batch(jax.random.key(7), 1, args.max_len, jnp.array([args.max_len]))
        source, target_in = example["inputs"][0][0], example["inputs"][1][0]
        context = model.encode(params, source)
        decoder = model.decoder  # AddNorm(Attention) ∘ LSTM ∘ EmbedToken
        names = decoder.names()
        hidden = decoder.stages[1].apply(params["decoder"][names[1]], decoder.stages[0].apply(params["decoder"][names[0]], target_in))
        inspect = dp.Attention(1, cross=True, score="concat", return_weights=True)
        _, weights = inspect(params["decoder"][names[2]]["f"], hidden, context=context)
        axes[1].imshow(np.asarray(weights[0]), cmap="viridis")
        digits = [str(int(t) - 2) for t in source]
        axes[1].set(title="LSTM attention weights", xlabel="input position (digit)", ylabel="output step")
        axes[1].set_xticks(range(len(digits)), digits)
    fig.tight_layout()
    fig.savefig(out / "seq2seq.png", dpi=110)
    rows = [[n] + [f"{results[m]['exact_match'][n]:.3f}" for m in models] for n in lengths]
    print(markdown_table(["length", *models], rows))
    print(f"\nResults and plots: {out}")
    return results


if __name__ == "__main__":
    main()
