"""The layers alone, diffprog against PyTorch: each Transformer sublayer and the recurrent stacks.

    python -m benchmarks.layers [--quick]

On float inputs x (B, T, d) — batch 32, T 128, width 256 — the forward pass, and forward +
backward with gradients for the parameters and for x, of the loss Σ tanh(y) ⊙ c (c fixed). The
tanh keeps every product of the layer alive: with Σ y ⊙ c the gradient does not need y, XLA
drops the layer's last product, and a feed-forward pair looks ~12 ms faster than it is.
Parts: TransformerBlock(256, 4 heads, 1024, causal) and its sublayers — causal self-attention
with its projections, AddNorm of it, the feed-forward pair, AddNorm of it, LayerNorm — and the
stacks SimpleRNN(256)² and LSTM(256)²; beside them the same parts of PyTorch's
nn.TransformerEncoderLayer (self_attn, norm1, linear1/linear2, norm2), and 2-layer nn.RNN and
nn.LSTM, when torch is installed. Each cell is the best of --rounds interleaved rounds of the
median of --reps calls. Writes benchmarks/results/layers.{json,md}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import diffprog as dp

from .common import block, machine, markdown_table, median_time, optional_torch, timing_arguments, write


def diffprog_parts(d, heads):
    attention = lambda: dp.Attention(heads, causal=True)
    feedforward = lambda: dp.Dense(d) @ dp.FeedForward(4 * d)
    return {"TransformerBlock": dp.TransformerBlock(d, heads, 4 * d, causal=True),
            "self-attention": attention(), "AddNorm(self-attention)": dp.AddNorm(attention()),
            "feed-forward": feedforward(), "AddNorm(feed-forward)": dp.AddNorm(feedforward()),
            "LayerNorm": dp.LayerNorm(), "SimpleRNN²": dp.SimpleRNN(d) ** 2, "LSTM²": dp.LSTM(d) ** 2}


def diffprog_timers(layer, x, c, reps):
    params = layer.init(jax.random.key(0), x[0])
    apply = dp.batched(layer).apply
    forward = jax.jit(apply)
    gradient = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.tanh(apply(p, x)) * c), (0, 1)))
    return (lambda: median_time(lambda: block(forward(params, x)), reps),
            lambda: median_time(lambda: block(gradient(params, x)), reps))


def torch_parts(torch, d, heads, steps):
    layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(steps)
    attention = lambda x: layer.self_attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
    feedforward = lambda x: layer.linear2(layer.activation(layer.linear1(x)))
    rnn, lstm = (kind(d, d, 2, batch_first=True) for kind in (torch.nn.RNN, torch.nn.LSTM))
    return {"TransformerBlock": (layer, lambda x: layer(x, src_mask=mask, is_causal=True)),
            "self-attention": (layer, attention),
            "AddNorm(self-attention)": (layer, lambda x: layer.norm1(x + attention(x))),
            "feed-forward": (layer, feedforward),
            "AddNorm(feed-forward)": (layer, lambda x: layer.norm2(x + feedforward(x))),
            "LayerNorm": (layer, layer.norm1), "SimpleRNN²": (rnn, lambda x: rnn(x)[0]),
            "LSTM²": (lstm, lambda x: lstm(x)[0])}


def torch_timers(torch, module, f, x, c, reps):
    x = torch.tensor(np.asarray(x), requires_grad=True)
    c = torch.tensor(np.asarray(c))

    def forward():
        with torch.no_grad():
            f(x)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        x.grad = None
        (torch.tanh(f(x)) * c).sum().backward()
    return lambda: median_time(forward, reps), lambda: median_time(forward_backward, reps)


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    args = timing_arguments(__doc__, "small shapes, one round (< 1 minute)").parse_args(argv)
    batch, steps, d, heads = (4, 16, 16, 2) if args.quick else (32, 128, 256, 4)
    reps, rounds = (3, 1) if args.quick else (args.reps, args.rounds)
    x, c = jax.random.normal(jax.random.key(1), (2, batch, steps, d))
    parts = diffprog_parts(d, heads)
    torch = optional_torch()
    if torch is not None:
        torch.manual_seed(0)
    peers = {} if torch is None else torch_parts(torch, d, heads, steps)
    timers = {}  # each part in both kits back to back, so drift hits both alike
    for name, layer in parts.items():
        timers[name, "diffprog"] = diffprog_timers(layer, x, c, reps)
        if name in peers:
            timers[name, "pytorch"] = torch_timers(torch, *peers[name], x, c, reps)
    rounds_ms = {key: [] for key in timers}
    for _ in range(rounds):
        for key, (forward, forward_backward) in timers.items():
            rounds_ms[key].append((forward() * 1e3, forward_backward() * 1e3))
    best = {key: tuple(min(r[i] for r in runs) for i in (0, 1)) for key, runs in rounds_ms.items()}
    results = {"machine": machine(), "shape": {"batch": batch, "steps": steps, "width": d, "heads": heads},
               "rounds_ms": {f"{name}/{kit}": runs for (name, kit), runs in rounds_ms.items()}}
    rows = []
    for name in parts:
        ours, theirs = best[name, "diffprog"], best.get((name, "pytorch"))
        cells = [f"{ours[0]:.1f}", f"{ours[1]:.1f}"]
        cells += ["", "", ""] if theirs is None else [f"{theirs[0]:.1f}", f"{theirs[1]:.1f}", f"{theirs[1] / ours[1]:.2f}"]
        rows.append([name] + cells)
    table = markdown_table(["part (B{} T{} d{})".format(batch, steps, d), "diffprog forward ms",
                            "diffprog fwd+bwd ms", "PyTorch forward ms", "PyTorch fwd+bwd ms",
                            "fwd+bwd ratio (PyTorch / diffprog)"], rows)
    write("layers", results, table, args.out, args.quick)
    return results


if __name__ == "__main__":
    main()
