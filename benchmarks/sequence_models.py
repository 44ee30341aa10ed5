"""SimpleRNN vs LSTM vs Transformer character LMs: diffprog against PyTorch and Flax, one run.

    python -m benchmarks.sequence_models            # full measurement (several minutes)
    python -m benchmarks.sequence_models --quick    # small shapes, under a minute

Models (all three kits): vocab 65 → embedding 256 → 2 layers of width 256 → tied head;
Transformer: 4 heads, FF 1024, learned positions, causal, post-LN. Cross-entropy, Adam 1e-3.
Measures, per kit and model: train-step time (forward + backward + Adam) at batch 32, T 128
(median over --reps steps after warm-up, best of --rounds interleaved rounds) and tokens/s;
forward-only tokens/s; step time and compile time as T grows (batch 16); peak memory of the
compiled step (XLA memory analysis); model FLOP utilisation = (model FLOPs / step time) / (float32 GEMM
FLOP/s measured in the same run), with model FLOPs per token = 6·N + 12·L·T·d (Transformer
attention; 0 for RNNs), N = the weights used in matrix products (recurrent and gate matrices,
attention and feed-forward projections, the tied output head), L layers, width d — the
usual 2 FLOPs per multiply-add, ×3 for forward + backward. The JSON's `product_flops` is what
diffprog's step executes in matrix products (`diffprog.summary.product_flops` of its jaxpr),
fewer than the model FLOPs where the library skips work (the recurrent layers' table lookup
after the embedding, the causal attention's skipped key blocks). PyTorch runs when torch is
installed (`pip install -e ".[bench]"`), Flax always. Writes benchmarks/results/
sequence_models.{json,md} and step_time_vs_T.png.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffprog as dp
from diffprog.summary import product_flops

from .common import (block, gemm_rate, machine, markdown_table, median_time, optional_torch,
                     timing_arguments, write)

VOCAB, KINDS = 65, ("rnn", "lstm", "transformer")


# -- diffprog -------------------------------------------------------------------------------

def diffprog_model(kind, width, max_len):
    body = {"rnn": lambda: dp.SimpleRNN(width) ** 2, "lstm": lambda: dp.LSTM(width) ** 2,
            "transformer": lambda: dp.TransformerBlock(width, 4, 4 * width, causal=True) ** 2}[kind]()
    positions = dp.LearnedPositions(max_len) if kind == "transformer" else None
    return dp.LanguageModel(VOCAB, width, body, positions=positions, per_position=True)


def jax_steps(apply, params):
    """jit-compiled (train_step, forward) for an apply(params, ids (B, T)) -> logits."""
    opt = optax.adam(1e-3)

    def train_step(state, ids, targets):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: dp.metrics.cross_entropy(apply(p, ids), targets))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss
    params = jax.tree.map(jnp.copy, params)  # the step donates its state; keep the caller's arrays
    return jax.jit(train_step, donate_argnums=0), jax.jit(apply), (params, opt.init(params))


def prepare_jax(apply, params, batch, steps, reps):
    """Compile the train step once; return (static facts, a function that times one round)."""
    train_step, forward, state = jax_steps(apply, params)
    ids = jax.random.randint(jax.random.key(1), (batch, steps), 0, VOCAB)
    start = time.perf_counter()
    compiled = train_step.lower(state, ids, ids).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = None if memory is None else (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                        + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    holder = [state]

    def one():
        holder[0], loss = train_step(holder[0], ids, ids)
        block(loss)

    def round_():
        return {"step_s": median_time(one, reps),
                "forward_s": median_time(lambda: block(forward(holder[0][0], ids)), reps)}
    executed = product_flops(jax.make_jaxpr(train_step)(state, ids, ids).jaxpr)
    facts = {"compile_s": compile_s, "product_flops": executed, "peak_bytes": peak,
             "params": int(sum(a.size for a in jax.tree.leaves(params)))}
    return facts, round_


def diffprog_runner(kind, width, max_len):
    model = diffprog_model(kind, width, max_len)
    params = model.init(jax.random.key(0), jnp.zeros(8, jnp.int32))
    return dp.batched(model).apply, params


# -- Flax linen -----------------------------------------------------------------------------

def flax_runner(kind, width, max_len):
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            x = nn.LayerNorm()(x + nn.MultiHeadDotProductAttention(4)(x, x, mask=mask))
            return nn.LayerNorm()(x + nn.Dense(width)(nn.relu(nn.Dense(4 * width)(x))))

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(VOCAB, width)
            x = embed(ids)
            if kind == "transformer":
                x = x + self.param("positions", nn.initializers.normal(0.02), (max_len, width))[: ids.shape[1]]
                for _ in range(2):
                    x = Block()(x)
            else:
                cell = nn.SimpleCell if kind == "rnn" else nn.OptimizedLSTMCell
                for _ in range(2):
                    x = nn.RNN(cell(width))(x)
            return embed.attend(x)

    model = LM()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return model.apply, params


# -- PyTorch --------------------------------------------------------------------------------

def torch_runner(kind, width, max_len):
    import torch

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, width)
            if kind == "transformer":
                self.positions = torch.nn.Parameter(0.02 * torch.randn(max_len, width))
                layer = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
                self.body = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            else:
                self.body = (torch.nn.RNN if kind == "rnn" else torch.nn.LSTM)(width, width, 2, batch_first=True)

        def forward(self, ids):
            x = self.embed(ids)
            if kind == "transformer":
                t = ids.shape[1]
                mask = torch.nn.Transformer.generate_square_subsequent_mask(t)
                x = self.body(x + self.positions[:t], mask=mask, is_causal=True)
            else:
                x = self.body(x)[0]
            return x @ self.embed.weight.T
    return LM()


def prepare_torch(kind, width, max_len, batch, steps, reps):
    torch = optional_torch()
    torch.manual_seed(0)
    model = torch_runner(kind, width, max_len)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    ids = torch.randint(0, VOCAB, (batch, steps))
    loss_fn = torch.nn.CrossEntropyLoss()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(ids).reshape(-1, VOCAB), ids.reshape(-1))
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad():
            model(ids)

    def round_():
        return {"step_s": median_time(one, reps), "forward_s": median_time(forward, reps)}
    return {"params": sum(p.numel() for p in model.parameters())}, round_


def model_flops(kind, width, batch, steps, layers=2):
    """Training FLOPs of one step: (6·N + 12·L·T·d) per token (see the module docstring)."""
    per_layer = {"rnn": 2 * width * width, "lstm": 8 * width * width, "transformer": 12 * width * width}[kind]
    n = layers * per_layer + VOCAB * width
    attention = 12 * layers * steps * width if kind == "transformer" else 0
    return (6 * n + attention) * batch * steps


# -- the run --------------------------------------------------------------------------------

def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = timing_arguments(__doc__, "small shapes and few repetitions (< 1 minute)")
    p.add_argument("--models", nargs="+", choices=KINDS, default=list(KINDS))
    args = p.parse_args(argv)
    if args.quick:
        width, batch, steps, sweep, sweep_batch, args.reps, args.rounds = 32, 4, 32, (16,), 4, 3, 1
    else:
        width, batch, steps, sweep, sweep_batch = 256, 32, 128, (64, 128, 256, 512, 1024), 16
    max_len = max(max(sweep), steps)
    peers = ("flax", "pytorch") if optional_torch() is not None else ("flax",)
    # the GEMM rate is read once per round as well: a reading taken while the shared machine is
    # slow would otherwise inflate every MFU; the fastest reading of the run is the rate
    gemm_size = 256 if args.quick else 2048
    gemm_readings = [gemm_rate(gemm_size)]
    results = {"machine": machine(), "gemm_readings_flops_per_s": gemm_readings,
               "shape": {"batch": batch, "T": steps, "width": width}, "models": {}}
    runners = {"diffprog": diffprog_runner, "flax": flax_runner}
    for kind in args.models:
        entry = results["models"].setdefault(kind, {})
        prepared = {}
        for kit in ("diffprog", *peers):
            if kit == "pytorch":
                prepared[kit] = prepare_torch(kind, width, max_len, batch, steps, args.reps)
            else:
                prepared[kit] = prepare_jax(*runners[kit](kind, width, max_len), batch, steps, args.reps)
        rounds = {kit: [] for kit in prepared}
        for _ in range(args.rounds):  # interleaved: every kit once per round
            for kit, (_, round_) in prepared.items():
                rounds[kit].append(round_())
            gemm_readings.append(gemm_rate(gemm_size))
        for kit, (facts, _) in prepared.items():
            best = {**facts, "step_s": min(r["step_s"] for r in rounds[kit]),
                    "forward_s": min(r["forward_s"] for r in rounds[kit]),
                    "rounds_step_s": [r["step_s"] for r in rounds[kit]]}
            best["tokens_per_s"] = batch * steps / best["step_s"]
            best["forward_tokens_per_s"] = batch * steps / best["forward_s"]
            if kit == "diffprog":
                best["model_flops"] = model_flops(kind, width, batch, steps)
            entry[kit] = best
            print(f"{kind:11s} {kit:8s} step {best['step_s'] * 1e3:8.1f} ms  "
                  f"{best['tokens_per_s']:>9,.0f} tok/s  params {best['params']:,}", flush=True)
        entry["diffprog"]["sweep"] = {}
        for t in sweep:
            facts, round_ = prepare_jax(*diffprog_runner(kind, width, max_len), sweep_batch, t, max(args.reps // 2, 3))
            entry["diffprog"]["sweep"][t] = {"step_s": round_()["step_s"], "compile_s": facts["compile_s"]}
    gemm = results["gemm_flops_per_s"] = max(gemm_readings)
    for entry in results["models"].values():
        entry["diffprog"]["mfu"] = entry["diffprog"]["model_flops"] / entry["diffprog"]["step_s"] / gemm
    rows = []
    for kind, entry in results["models"].items():
        ours = entry["diffprog"]
        best_peer = min((entry[k]["step_s"] for k in peers), default=float("nan"))
        rows.append([kind, f"{ours['params']:,}", f"{ours['step_s'] * 1e3:.1f}",
                     *(f"{entry[k]['step_s'] * 1e3:.1f}" for k in peers),
                     f"{best_peer / ours['step_s']:.2f}", f"{ours['tokens_per_s']:,.0f}",
                     f"{ours['forward_tokens_per_s']:,.0f}", f"{ours['mfu']:.1%}",
                     f"{(ours['peak_bytes'] or 0) / 2**20:.1f}", f"{ours['compile_s']:.1f}"])
    header = ["model", "params", "diffprog ms", *(f"{k} ms" for k in peers), "speed ratio (best peer / diffprog)",
              "train tok/s", "forward tok/s", "MFU", "peak MiB", "compile s"]
    sweep_rows = [[kind, *(f"{results['models'][kind]['diffprog']['sweep'][t]['step_s'] * 1e3:.1f}" for t in sweep)]
                  for kind in args.models]
    table = (f"Train step, batch {batch}, T {steps}, width {width} "
             f"(float32 GEMM: {gemm / 1e9:.0f} GFLOP/s, the fastest of {len(gemm_readings)} readings in this run; "
             "MFU = (6N + 12LTd) FLOPs per token / step time / GEMM rate)\n\n"
             + markdown_table(header, rows)
             + f"\n\ndiffprog train-step ms vs T (batch {sweep_batch})\n\n"
             + markdown_table(["model", *(f"T={t}" for t in sweep)], sweep_rows))
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in args.models:
        ax.plot(sweep, [results["models"][kind]["diffprog"]["sweep"][t]["step_s"] * 1e3 for t in sweep], "o-", label=kind)
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="train step (ms)", title=f"diffprog, batch {sweep_batch}")
    ax.legend()
    write("sequence_models", results, table, args.out, args.quick, {"step_time_vs_T": fig})
    return results


if __name__ == "__main__":
    main()
