"""The notes' "cell state as counter": an LSTM trained to output the nesting depth of a
parenthesis string keeps the depth in one of its cells.

    python -m experiments.lstm_counter [--steps 600] [--hidden 16]

Trains Dense ∘ LSTM ∘ EmbedToken on the parens task, then reads every step's cell state c_t
(LSTM(return_gates=True)) on held-out strings and reports each cell's correlation with the
depth; plots the best cell next to the depth for one string.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffprog as dp
from experiments import tasks

from .common import at_least, markdown_table, parser, run_dir, save_config, save_json


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=at_least(1), default=600)
    p.add_argument("--hidden", type=at_least(1), default=16)
    p.add_argument("--length", type=at_least(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = run_dir("lstm_counter", args.out)
    save_config(out, vars(args))
    model = dp.Dense(9) @ dp.LSTM(args.hidden) @ dp.EmbedToken(2, 8)
    data = jax.jit(lambda s: tasks.parens(jax.random.fold_in(jax.random.key(args.seed), s), 32, args.length))
    loss = lambda o, b: dp.metrics.cross_entropy(o, b["targets"], b["mask"])
    held_out = tasks.parens(jax.random.key(10_000), 256, args.length)
    result = dp.train(model, loss, optax.adam(1e-2), data, steps=args.steps, seed=args.seed,
                      eval_data=[held_out], eval_every=args.steps // 5, description="lstm_counter",
                      eval_metrics={"accuracy": lambda o, b: dp.metrics.accuracy(o, b["targets"], b["mask"])})
    params = result.params
    # the LSTM's gates and cell states: the model up to the LSTM (the same params keys), the LSTM
    # asked for its gates
    inspect = dp.rewrite(dp.serial(*model.stages[:-1]), lambda l: isinstance(l, dp.LSTM),
                         lambda l: dataclasses.replace(l, return_gates=True))
    _, trace = jax.vmap(lambda ids: inspect({k: params[k] for k in inspect.names()}, ids))(held_out["inputs"])
    cells = np.asarray(trace["cell"]).reshape(-1, args.hidden)
    depth = np.asarray(held_out["targets"]).ravel()
    correlation = np.array([np.corrcoef(cells[:, j], depth)[0, 1] for j in range(args.hidden)])
    best = int(np.nanargmax(np.abs(correlation)))
    accuracy = [h["eval_accuracy"] for h in result.history if "eval_accuracy" in h][-1]

    import matplotlib.pyplot as plt
    string = "".join("()"[int(c)] for c in held_out["inputs"][0])
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.plot(np.asarray(held_out["targets"][0]), "k-", label="nesting depth")
    ax2 = ax.twinx()
    ax2.plot(np.asarray(trace["cell"][0, :, best]), "C1-", label=f"cell {best} (r = {correlation[best]:+.3f})")
    ax.set_xticks(range(len(string)), list(string), fontsize=6)
    ax.set(ylabel="depth", title="LSTM cell state as a counter")
    ax2.set_ylabel("c_t")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "cell_vs_depth.png", dpi=110)
    results = {"held_out_accuracy": accuracy, "best_cell": best, "best_correlation": float(correlation[best]),
               "correlations": correlation.tolist(), "history": result.history}
    save_json(out / "results.json", results)
    print(markdown_table(["held-out depth accuracy", "best cell", "correlation with depth"],
                         [[f"{accuracy:.3f}", best, f"{correlation[best]:+.3f}"]]))
    print(f"\nResults and plot: {out}")
    return results


if __name__ == "__main__":
    main()
