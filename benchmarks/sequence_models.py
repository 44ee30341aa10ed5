"""Character LMs of five families: diffprog against PyTorch, Flax and `transformers`, one run.

    python -m benchmarks.sequence_models            # full measurement (about 25 minutes)
    python -m benchmarks.sequence_models --quick    # small shapes, about a minute

Models (vocab 65 → embedding 256 → 2 layers of width 256 → head):
- rnn, lstm, transformer, in all three kits (diffprog, PyTorch, Flax linen), each with its own
  dense head (weight and bias); diffprog's written as the README writes them,
  `dp.Dense(65) @ body ** 2 @ dp.EmbedToken(65, 256)` through `dp.batched` (the Transformer with
  `dp.LearnedPositions` after the embedding); Transformer: 4 heads, FF 1024, learned positions,
  causal, post-LN;
- mamba (`dp.mamba`: state 16, expand 2, conv 4) and transformer++ (`dp.llama`: 4 heads, RoPE,
  SwiGLU 688, RMSNorm, no biases), against the same configs in `transformers`' PyTorch models:
  `MambaForCausalLM` with the `mambapy` package's parallel scan (`use_mambapy=True`, its fastest
  CPU setting) and with its sequential default, and `LlamaForCausalLM`.
Cross-entropy, Adam 1e-3. Measures, per kit and model: train-step time (forward + backward +
Adam) at batch 32, T 128 (median over --reps steps after warm-up, fewer where a step takes
seconds: at most ~20 s a round; best of --rounds interleaved rounds) and tokens/s; forward-only
tokens/s; step time and compile time as T grows (batch 16), and for mamba and transformer++ the
`transformers` steps at the longest T (one step after one warm-up step; not the sequential
Mamba, whose autograd graph there took 15 GB and minutes a step); peak memory of the compiled step (XLA
memory analysis); model FLOP utilisation = (model FLOPs / step time) / (float32 GEMM FLOP/s
measured in the same run), with model FLOPs per token = 6·N + 12·L·T·d (attention; 0 for the
recurrent models), N = the weights used in matrix products (recurrent and gate matrices, Mamba's
four projections, attention and feed-forward projections, the output head), L layers,
width d — the usual 2 FLOPs per multiply-add, ×3 for forward + backward. The JSON's
`product_flops` is what diffprog's step executes in matrix products
(`diffprog.summary.product_flops` of its jaxpr), fewer than the model FLOPs where the library
skips work (the recurrent layers' table lookup after the embedding, the causal attention's
skipped key blocks). PyTorch and `transformers` run when installed (`pip install -e
".[bench,test]"`), Flax always. Writes benchmarks/results/sequence_models.{json,md} and
step_time_vs_T.png.
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

VOCAB, CLASSIC, MODERN = 65, ("rnn", "lstm", "transformer"), ("mamba", "transformer++")
KINDS = CLASSIC + MODERN
ROUND_S = 20.0  # a kit's steps in one round stop after about this long (at least one step)


def hf_config(kind, width):
    """The `transformers` config (as a dict) of the mamba and transformer++ LMs."""
    if kind == "mamba":
        return dict(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=2, state_size=16)
    return dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=8 * width // 3 // 16 * 16 + 16,
                num_attention_heads=4, num_hidden_layers=2, tie_word_embeddings=True)


def peers_of(kind, torch):
    """The kits diffprog is compared with for `kind` (torch: PyTorch is installed)."""
    if kind in CLASSIC:
        return ("flax", "pytorch") if torch else ("flax",)
    if not torch:
        return ()
    return ("transformers (mambapy)", "transformers (sequential)") if kind == "mamba" else ("transformers",)


# -- diffprog -------------------------------------------------------------------------------

def diffprog_model(kind, width, max_len):
    """The classic LMs as the README writes them; mamba and transformer++ from their configs."""
    if kind in MODERN:
        return (dp.mamba if kind == "mamba" else dp.llama)(hf_config(kind, width))
    body = {"rnn": lambda: dp.SimpleRNN(width) ** 2, "lstm": lambda: dp.LSTM(width) ** 2,
            "transformer": lambda: dp.TransformerBlock(width, 4, 4 * width, causal=True) ** 2}[kind]()
    if kind == "transformer":
        return dp.Dense(VOCAB) @ body @ dp.LearnedPositions(max_len) @ dp.EmbedToken(VOCAB, width)
    return dp.Dense(VOCAB) @ body @ dp.EmbedToken(VOCAB, width)


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
            x = nn.Embed(VOCAB, width)(ids)
            if kind == "transformer":
                x = x + self.param("positions", nn.initializers.normal(0.02), (max_len, width))[: ids.shape[1]]
                for _ in range(2):
                    x = Block()(x)
            else:
                cell = nn.SimpleCell if kind == "rnn" else nn.OptimizedLSTMCell
                for _ in range(2):
                    x = nn.RNN(cell(width))(x)
            return nn.Dense(VOCAB)(x)

    model = LM()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
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
            self.head = torch.nn.Linear(width, VOCAB)

        def forward(self, ids):
            x = self.embed(ids)
            if kind == "transformer":
                t = ids.shape[1]
                mask = torch.nn.Transformer.generate_square_subsequent_mask(t)
                x = self.body(x + self.positions[:t], mask=mask, is_causal=True)
            else:
                x = self.body(x)[0]
            return self.head(x)
    return LM()


def transformers_runner(kind, width, peer):
    """`transformers`' MambaForCausalLM / LlamaForCausalLM as ids → logits."""
    import torch
    import transformers
    from transformers.utils.import_utils import is_mambapy_available
    if kind == "mamba":
        if "mambapy" in peer and not is_mambapy_available():
            raise RuntimeError("sequence_models: use_mambapy=True needs the mambapy package (pip install mambapy; "
                               "without it transformers runs its sequential scan under that name)")
        config = transformers.MambaConfig(**hf_config(kind, width), use_mambapy="mambapy" in peer)
        model = transformers.MambaForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(kind, width)))

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids).logits
    return Logits()


def within_round(fn, reps):
    """How many of `reps` timed calls of fn fit in ROUND_S (at least 1), from one call (a warm-up)."""
    start = time.perf_counter()
    fn()
    return max(1, min(reps, int(ROUND_S / (time.perf_counter() - start))))


def prepare_torch(kind, width, max_len, batch, steps, reps, peer="pytorch", forward_too=True):
    torch = optional_torch()
    torch.manual_seed(0)
    model = torch_runner(kind, width, max_len) if kind in CLASSIC else transformers_runner(kind, width, peer)
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

    step_reps = within_round(one, reps)
    forward_reps = within_round(forward, reps) if forward_too else 0

    def round_():
        times = {"step_s": median_time(one, step_reps, warmup=int(step_reps > 1))}
        if forward_too:
            times["forward_s"] = median_time(forward, forward_reps, warmup=int(forward_reps > 1))
        return times
    return {"params": sum(p.numel() for p in model.parameters()), "reps": step_reps}, round_


def model_flops(kind, width, batch, steps, layers=2):
    """Training FLOPs of one step: (6·N + 12·L·T·d) per token (see the module docstring)."""
    inner, rank = 2 * width, -(-width // 16)
    per_layer = {"rnn": 2 * width * width, "lstm": 8 * width * width, "transformer": 12 * width * width,
                 "transformer++": 4 * width * width + 3 * width * hf_config("transformer++", width)["intermediate_size"],
                 "mamba": 2 * width * inner + inner * (rank + 32) + rank * inner + inner * width}[kind]
    n = layers * per_layer + VOCAB * width
    attention = 12 * layers * steps * width if "transformer" in kind else 0
    return (6 * n + attention) * batch * steps


# -- the run --------------------------------------------------------------------------------

def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = timing_arguments(__doc__, "small shapes and few repetitions (about a minute)")
    p.add_argument("--models", nargs="+", choices=KINDS, default=list(KINDS))
    args = p.parse_args(argv)
    if args.quick:
        width, batch, steps, sweep, sweep_batch, args.reps, args.rounds = 32, 4, 32, (32,), 4, 3, 1
    else:
        width, batch, steps, sweep, sweep_batch = 256, 32, 128, (64, 128, 256, 512, 1024), 16
    max_len = max(max(sweep), steps)
    torch = optional_torch()
    # the GEMM rate is read once per round as well: a reading taken while the shared machine is
    # slow would otherwise inflate every MFU; the fastest reading of the run is the rate
    gemm_size = 256 if args.quick else 2048
    gemm_readings = [gemm_rate(gemm_size)]
    results = {"machine": machine(), "gemm_readings_flops_per_s": gemm_readings,
               "shape": {"batch": batch, "T": steps, "width": width}, "models": {}}
    runners = {"diffprog": diffprog_runner, "flax": flax_runner}

    def prepare(kit, kind, batch, steps, reps, forward_too=True):
        if kit == "diffprog" or kit == "flax":
            return prepare_jax(*runners[kit](kind, width, max_len), batch, steps, reps)
        return prepare_torch(kind, width, max_len, batch, steps, reps, kit, forward_too)

    for kind in args.models:
        entry = results["models"].setdefault(kind, {})
        prepared = {kit: prepare(kit, kind, batch, steps, args.reps) for kit in ("diffprog", *peers_of(kind, torch))}
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
            print(f"{kind:13s} {kit:26s} step {best['step_s'] * 1e3:9.1f} ms  "
                  f"{best['tokens_per_s']:>9,.0f} tok/s  params {best['params']:,}", flush=True)
        entry["diffprog"]["sweep"] = {}
        for t in sweep:
            if (sweep_batch, t) == (batch, steps):  # the shape timed above (--quick): its best round
                entry["diffprog"]["sweep"][t] = {k: entry["diffprog"][k] for k in ("step_s", "compile_s")}
                continue
            facts, round_ = prepare("diffprog", kind, sweep_batch, t, max(args.reps // 2, 3))
            entry["diffprog"]["sweep"][t] = {"step_s": round_()["step_s"], "compile_s": facts["compile_s"]}
        if kind in MODERN:  # the peers at the longest T, but the sequential Mamba (15 GB, minutes a step)
            for kit in [k for k in peers_of(kind, torch) if "sequential" not in k]:
                facts, round_ = prepare(kit, kind, sweep_batch, max(sweep), 1, forward_too=False)
                entry[kit]["sweep"] = {max(sweep): {"step_s": round_()["step_s"]}}
                print(f"{kind:13s} {kit:26s} step at T={max(sweep)}: {entry[kit]['sweep'][max(sweep)]['step_s']:.2f} s", flush=True)
    gemm = results["gemm_flops_per_s"] = max(gemm_readings)
    for entry in results["models"].values():
        entry["diffprog"]["mfu"] = entry["diffprog"]["model_flops"] / entry["diffprog"]["step_s"] / gemm
    write("sequence_models", results, tables(results, args.models, sweep, sweep_batch, torch), args.out, args.quick,
          {"step_time_vs_T": plot(results, args.models, sweep, sweep_batch)})
    return results


def tables(results, kinds, sweep, sweep_batch, torch):
    shape, gemm = results["shape"], results["gemm_flops_per_s"]
    classic_peers = peers_of("rnn", torch)
    rows = []
    for kind in kinds:
        entry = results["models"][kind]
        ours = entry["diffprog"]
        peers = [k for k in entry if k != "diffprog"]
        best = {m: min((entry[k][m] for k in peers), default=float("nan")) for m in ("step_s", "forward_s")}
        rows.append([kind, f"{ours['params']:,}", f"{ours['step_s'] * 1e3:.1f}",
                     *(f"{entry[k]['step_s'] * 1e3:.1f}" if k in entry else "" for k in classic_peers),
                     f"{best['step_s'] / ours['step_s']:.2f}", f"{ours['forward_s'] * 1e3:.1f}",
                     *(f"{entry[k]['forward_s'] * 1e3:.1f}" if k in entry else "" for k in classic_peers),
                     f"{best['forward_s'] / ours['forward_s']:.2f}", f"{ours['tokens_per_s']:,.0f}",
                     f"{ours['mfu']:.1%}",
                     f"{(ours['peak_bytes'] or 0) / 2**20:.1f}", f"{ours['compile_s']:.1f}"])
    header = ["model", "params", "diffprog ms", *(f"{k} ms" for k in classic_peers), "speed ratio (best peer / diffprog)",
              "diffprog forward ms", *(f"{k} forward ms" for k in classic_peers), "forward ratio", "train tok/s",
              "MFU", "peak MiB", "compile s"]
    text = (f"Train step and forward pass, batch {shape['batch']}, T {shape['T']}, width {shape['width']} "
            f"(float32 GEMM: {gemm / 1e9:.0f} GFLOP/s, the fastest of {len(results['gemm_readings_flops_per_s'])} "
            "readings in this run; MFU = (6N + 12LTd) FLOPs per token / step time / GEMM rate; mamba and "
            "transformer++'s best peer is in the next table)\n\n" + markdown_table(header, rows))
    longest = max(sweep)
    def at_longest(e, kit):
        if "sweep" not in e[kit]:
            return ["not timed", ""]
        peer, ours = e[kit]["sweep"][longest]["step_s"], e["diffprog"]["sweep"][longest]["step_s"]
        return [f"{peer * 1e3:.1f}", f"{peer / ours:.2f}"]
    modern = [[kind, kit, f"{e['diffprog']['step_s'] * 1e3:.1f}", f"{e[kit]['step_s'] * 1e3:.1f}",
               f"{e[kit]['step_s'] / e['diffprog']['step_s']:.2f}",
               f"{e['diffprog']['sweep'][longest]['step_s'] * 1e3:.1f}", *at_longest(e, kit)]
              for kind in kinds if kind in MODERN for e in [results["models"][kind]] for kit in e if kit != "diffprog"]
    if modern:
        text += (f"\n\nAgainst `transformers`' PyTorch models of the same configs: train step at batch {shape['batch']}, "
                 f"T {shape['T']} and at batch {sweep_batch}, T {longest} (ratio = transformers / diffprog)\n\n"
                 + markdown_table(["model", "transformers", f"diffprog ms (T {shape['T']})", "transformers ms",
                                   "ratio", f"diffprog ms (T {longest})", "transformers ms", "ratio"], modern))
    sweep_rows = [[kind, *(f"{results['models'][kind]['diffprog']['sweep'][t]['step_s'] * 1e3:.1f}" for t in sweep)]
                  for kind in kinds]
    return (text + f"\n\ndiffprog train-step ms vs T (batch {sweep_batch})\n\n"
            + markdown_table(["model", *(f"T={t}" for t in sweep)], sweep_rows))


def plot(results, kinds, sweep, sweep_batch):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in kinds:
        ax.plot(sweep, [results["models"][kind]["diffprog"]["sweep"][t]["step_s"] * 1e3 for t in sweep], "o-", label=kind)
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="train step (ms)", title=f"diffprog, batch {sweep_batch}")
    ax.legend()
    return fig


if __name__ == "__main__":
    main()
