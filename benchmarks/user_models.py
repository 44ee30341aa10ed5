"""One timing of a model as users write it, for `benchmarks.commits` (run in a subprocess
whose `import diffprog` is the commit under test; only the API every commit has is used).

    python benchmarks/user_models.py CASE [--quick] [--reps N]    # prints {"case", "seconds"} as JSON

Cases: {rnn,lstm,transformer}_{train,forward} — the char-LMs written as the README writes them,
`dp.Dense(65) @ body ** 2 @ dp.EmbedToken(65, 256)` (Transformer: 4 heads, FF 1024, learned
positions, causal) through `dp.batched`, under `jax.jit`, B 32, T 128, Adam (the loss on the
logits in float32); {rnn,lstm,transformer}_bfloat16_{train,forward} — the same models with their
params cast to bfloat16 (as `model.to(torch.bfloat16)`; not among the guard's defaults); lm_train — the
LSTM as a `dp.LanguageModel`; bert_forward — BERT-base (random weights), B 8, T 128;
gpt2_generate — GPT-2 small (random weights), 4 prompts of 8 tokens, 32 greedy tokens.
--quick: width 64, T 32, 2-layer BERT and GPT-2 of width 64. The figure is the median of --reps
calls after two warm-up calls (compilation excluded), after `dp.keep_freed_memory()` as the
README's first model calls it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import diffprog as dp

CASES = [f"{k}_{m}" for k in ("rnn", "lstm", "transformer") for m in ("train", "forward")] + [
    "lm_train", "bert_forward", "gpt2_generate"]
BFLOAT16_CASES = [f"{k}_bfloat16_{m}" for k in ("rnn", "lstm", "transformer") for m in ("train", "forward")]


def char_lm(kind, width, steps):
    body = {"rnn": dp.SimpleRNN(width) ** 2, "lstm": dp.LSTM(width) ** 2,
            "transformer": dp.TransformerBlock(width, 4, 4 * width, causal=True) ** 2}[kind]
    if kind == "transformer":
        return dp.Dense(65) @ body @ dp.LearnedPositions(steps) @ dp.EmbedToken(65, width)
    return dp.Dense(65) @ body @ dp.EmbedToken(65, width)


def trainer(model, ids, dtype=jnp.float32):
    net, opt = dp.batched(model), optax.adam(1e-3)
    params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0), ids[0]))

    @jax.jit
    def step(state):
        params, opt_state = state
        logits = lambda p: net.apply(p, ids).astype(jnp.float32)
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p), ids).mean()
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    state = [(params, opt.init(params))]

    def run():
        state[0] = step(state[0])
        jax.block_until_ready(state[0])
    return run


def runner(case: str, quick: bool):
    width, steps, batch = (64, 32, 8) if quick else (256, 128, 32)
    ids = jax.random.randint(jax.random.key(1), (batch, steps), 0, 65)
    kind, mode = case.rsplit("_", 1)
    dtype = jnp.bfloat16 if kind.endswith("_bfloat16") else jnp.float32
    kind = kind.removesuffix("_bfloat16")
    if kind in ("rnn", "lstm", "transformer"):
        model = char_lm(kind, width, steps)
        if mode == "train":
            return trainer(model, ids, dtype)
        params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0), ids[0]))
        forward = jax.jit(dp.batched(model).apply)
        return lambda: forward(params, ids).block_until_ready()
    if case == "lm_train":
        return trainer(dp.LanguageModel(65, width, dp.LSTM(width) ** 2, per_position=True), ids)
    small = dict(n_layer=2, n_embd=64, n_head=4) if quick else {}
    if case == "bert_forward":
        model = dp.bert(**({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                            "intermediate_size": 256} if quick else {}))
        tokens = jax.random.randint(jax.random.key(1), (8, steps), 0, model.vocab)
        params, forward = model.init(jax.random.key(0), tokens[0]), jax.jit(dp.batched(model).apply)
        return lambda: jax.block_until_ready(forward(params, tokens))
    model = dp.gpt2(**small)
    params = model.init(jax.random.key(0), jnp.zeros(8, jnp.int32))
    prompts = jax.random.randint(jax.random.key(1), (4, 8), 0, model.vocab)
    return lambda: dp.generate(model, params, prompts, 8 if quick else 32).block_until_ready()


def main(argv=None):
    dp.keep_freed_memory()  # as the README's first model does (at b833c9d importing diffprog did it)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=CASES + BFLOAT16_CASES)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    run = runner(args.case, args.quick)
    for _ in range(2):
        run()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"case": args.case, "seconds": statistics.median(times)}))


if __name__ == "__main__":
    main()
