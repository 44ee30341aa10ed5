"""SimpleRNN vs LSTM vs Transformer vs Mamba vs Transformer++ on generated tasks that probe long-range dependence.

    python -m experiments.compare                 # default preset, ≤ 10 minutes on 2 CPU cores
    python -m experiments.compare --preset full   # longer sweep, 2 seeds per cell
    python -m experiments.compare --preset full --tasks adding --lengths 200 --seeds 0   # one cell

For each task × sequence length × model: train with Adam, then report the final held-out metric
next to the task's trivial baseline. Writes results.json, config.json, metric_vs_length.png and
learning_curves.png under runs/compare/<timestamp>/ and prints a markdown summary.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import diffprog as dp
from experiments import tasks

from .common import markdown_table, parser, run_dir, save_config, save_json


@dataclasses.dataclass(frozen=True)
class Task:
    make: Callable            # (key, batch, length) -> batch dict
    vocab: int                # 0: float inputs
    outputs: int              # regression: 1; classification: classes
    per_position: bool
    metric: str               # "mse" (lower is better) or "accuracy"
    length_name: str


TASKS = {
    "adding": Task(tasks.adding, 0, 1, False, "mse", "T"),
    "copy": Task(lambda k, b, n: tasks.copy(k, b, n), 10, 10, True, "accuracy", "delay"),
    "parens": Task(lambda k, b, n: tasks.parens(k, b, n), 2, 9, True, "accuracy", "T"),
    "recall": Task(lambda k, b, n: tasks.recall(k, b, n), 0, 16, False, "accuracy", "pairs"),
    "selective_copy": Task(lambda k, b, n: tasks.selective_copy(k, b, n), 10, 10, True, "accuracy", "T"),
    "mqar": Task(lambda k, b, n: tasks.mqar(k, b, n), 32, 16, True, "accuracy", "pairs"),
}

PRESETS = {
    "quick": {"lengths": {"adding": [10], "copy": [4], "parens": [8], "recall": [2], "selective_copy": [8], "mqar": [2]},
              "steps": {"adding": 20, "copy": 20, "parens": 20, "recall": 20, "selective_copy": 20, "mqar": 20},
              "seeds": [0], "width": 16},
    "default": {"lengths": {"adding": [50], "copy": [20], "parens": [64], "recall": [8], "selective_copy": [32],
                            "mqar": [8]},
                "steps": {"adding": 600, "copy": 500, "parens": 400, "recall": 600, "selective_copy": 600, "mqar": 800},
                "seeds": [0], "width": 48},
    "full": {"lengths": {"adding": [25, 50, 100, 200], "copy": [5, 10, 20, 40], "parens": [16, 32, 64, 128],
                         "recall": [4, 8, 12], "selective_copy": [16, 32, 64, 128], "mqar": [4, 8, 16, 32]},
             "steps": {"adding": 2000, "copy": 1500, "parens": 800, "recall": 1500, "selective_copy": 2000, "mqar": 2000},
             "seeds": [0, 1], "width": 48},
}
MODELS = ("rnn", "lstm", "transformer", "mamba", "transformer++")


def build(model: str, task: Task, length_of_inputs: int, width: int) -> dp.Layer:
    """embed → body → head. Widths are chosen so that the bodies have similar sizes: an LSTM of
    width w has 8w² weights, two Transformer blocks of width d = 2w/3 have 2·(4d² + 4d²) (FF 2d),
    two Transformer++ blocks 2·(4d² + 4d²) (a SwiGLU of 4d/3; grouped-query attention left out:
    at 4 heads of width 8 it delayed learning MQAR), two Mamba blocks of width d = 2w/3 about
    2·8.5d² (inner 2d, state 16)."""
    d = max(2 * width // 3 // 4 * 4, 8) if model in ("transformer", "transformer++", "mamba") else width
    embed = dp.EmbedToken(task.vocab, d) if task.vocab else dp.Dense(d)
    causal = task.per_position
    body = {"rnn": lambda: dp.SimpleRNN(2 * width),
            "lstm": lambda: dp.LSTM(width),
            "transformer": lambda: dp.TransformerBlock(d, 4, 2 * d, causal=causal) ** 2
            @ dp.LearnedPositions(length_of_inputs),
            "mamba": lambda: dp.RMSNorm() @ dp.AddNorm(dp.SelectiveSSM(), pre_norm=True, norm=dp.RMSNorm()) ** 2,
            "transformer++": lambda: dp.RMSNorm() @ dp.TransformerBlock(
                d, 4, 4 * d // 3, causal=causal, pre_norm=True, activation="silu", gated=True, use_bias=False,
                rotary=10000.0, norm=dp.RMSNorm()) ** 2}[model]()
    head = dp.Dense(task.outputs) if task.per_position else dp.Dense(task.outputs) @ dp.Collapse("last")
    return head @ body @ embed


def objective(task: Task):
    if task.metric == "mse":
        return lambda out, b: dp.metrics.mse(out, b["targets"])
    return lambda out, b: dp.metrics.cross_entropy(out, b["targets"], b.get("mask"))


def score(task: Task):
    if task.metric == "mse":
        return lambda out, b: dp.metrics.mse(out, b["targets"])
    return lambda out, b: dp.metrics.accuracy(out, b["targets"], b.get("mask"))


def baseline(name: str, task: Task, batch: dict) -> float:
    """The trivial predictor's metric on the evaluation data."""
    if name == "adding":
        return float(jnp.mean((batch["targets"] - 1.0) ** 2))   # predict E[sum] = 1; ≈ 1/6
    targets = np.asarray(batch["targets"])
    if name == "parens":
        return float(np.bincount(targets.ravel()).max() / targets.size)  # most frequent depth
    return 1.0 / {"copy": 8, "recall": 16, "selective_copy": 8, "mqar": 16}[name]   # uniform guess


def run_one(name, task, length, model, seed, steps, width, batch_size=32):
    make = lambda key: task.make(key, batch_size, length)
    evaluation = task.make(jax.random.key(10_000 + seed), 512, length)
    length_of_inputs = evaluation["inputs"].shape[1]
    net = build(model, task, length_of_inputs, width)
    data = jax.jit(lambda step: make(jax.random.fold_in(jax.random.key(seed), step)))
    started = time.perf_counter()
    result = dp.train(net, objective(task), optax.adam(3e-3), data, steps=steps, seed=seed, clip_norm=1.0,
                      eval_data=[evaluation], eval_every=max(steps // 10, 1),
                      eval_metrics={"metric": score(task)}, quiet=True, log_every=max(steps // 50, 1),
                      description=f"{name} {length} {model}")
    evals = [h for h in result.history if "eval_metric" in h]
    n_params = sum(a.size for a in jax.tree.leaves(result.params))
    return {"task": name, "length": length, "model": model, "seed": seed, "params": int(n_params),
            "metric_name": task.metric, "metric": evals[-1]["eval_metric"],
            "baseline": baseline(name, task, evaluation), "seconds": time.perf_counter() - started,
            "curve": [(h["step"], h["eval_metric"]) for h in evals],
            "train_loss": [(h["step"], h["loss"]) for h in result.history if "loss" in h]}


def summarise(runs):
    """Mean over seeds per task × length × model, with the baseline beside it."""
    cells = {}
    for r in runs:
        cells.setdefault((r["task"], r["length"]), {}).setdefault(r["model"], []).append(r)
    rows = []
    for (name, length), by_model in cells.items():
        first = next(iter(by_model.values()))[0]
        better = "↓" if first["metric_name"] == "mse" else "↑"
        row = [name, f"{TASKS[name].length_name}={length}", f"{first['metric_name']} {better}"]
        row += [f"{np.mean([r['metric'] for r in by_model[m]]):.3f}" if m in by_model else "" for m in MODELS]
        rows.append(row + [f"{first['baseline']:.3f}"])
    return markdown_table(["task", "length", "metric", *MODELS, "baseline"], rows)


def plot(runs, path):
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["task"] for r in runs))
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in runs if r["task"] == name]
        lengths = sorted({r["length"] for r in mine})
        for model in models:
            ys = [np.mean([r["metric"] for r in mine if r["model"] == model and r["length"] == n]) for n in lengths]
            ax.plot(lengths, ys, "o-", label=model)
        base = [np.mean([r["baseline"] for r in mine if r["length"] == n]) for n in lengths]
        ax.plot(lengths, base, "k--", label="baseline")
        ax.set(title=name, xlabel=TASKS[name].length_name, ylabel=mine[0]["metric_name"])
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path / "metric_vs_length.png", dpi=110)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        longest = max(r["length"] for r in runs if r["task"] == name)
        for model in models:
            for r in runs:
                if (r["task"], r["length"], r["model"]) == (name, longest, model) and r["seed"] == runs[0]["seed"]:
                    ax.plot(*zip(*r["curve"]), label=model)
        ax.axhline(next(r["baseline"] for r in runs if (r["task"], r["length"]) == (name, longest)),
                   color="k", ls="--", label="baseline")
        ax.set(title=f"{name}, {TASKS[name].length_name}={longest}", xlabel="step", ylabel="held-out metric")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path / "learning_curves.png", dpi=110)
    plt.close("all")


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--lengths", nargs="+", type=int, help="run only these lengths of the preset's")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the preset's)")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.lengths:
        preset["lengths"] = {t: [n for n in ns if n in args.lengths] for t, ns in preset["lengths"].items()}
        if not any(preset["lengths"][t] for t in args.tasks):
            p.error(f"--lengths {args.lengths}: none of the lengths of --tasks {args.tasks} in the "
                    f"{args.preset} preset ({ {t: PRESETS[args.preset]['lengths'][t] for t in args.tasks} })")
    if args.seeds:
        preset["seeds"] = args.seeds
    out = run_dir("compare", args.out)
    config = save_config(out, {"preset": args.preset, **preset, "tasks": args.tasks, "models": args.models,
                               "optimizer": "adam(3e-3), clip 1.0, batch 32"})
    jobs = [(t, n, m, s) for t in args.tasks for n in preset["lengths"][t] for m in args.models for s in preset["seeds"]]
    runs = []
    for name, length, model, seed in tqdm(jobs, desc="compare", dynamic_ncols=True):
        r = run_one(name, TASKS[name], length, model, seed, preset["steps"][name], preset["width"])
        runs.append(r)
        tqdm.write(f"{name:7s} {TASKS[name].length_name}={length:<4d} {model:11s} seed {seed}: "
                   f"{r['metric_name']} {r['metric']:.3f} (baseline {r['baseline']:.3f}), "
                   f"{r['params']:,} params, {r['seconds']:.0f}s")
        save_json(out / "results.json", {"config": config, "runs": runs})
    table = summarise(runs)
    params = {m: sorted({r["params"] for r in runs if r["model"] == m}) for m in args.models}
    plot(runs, out)
    print(f"\n## {' vs '.join(args.models)} ({args.preset} preset, seeds {preset['seeds']})\n")
    print(table)
    print("\nParameter counts (per task, they differ by input/output sizes): "
          + "; ".join(f"{m} {min(v):,}–{max(v):,}" for m, v in params.items()))
    print(f"\nResults, plots and config: {out}")
    save_json(out / "results.json", {"config": config, "runs": runs, "table": table})
    return runs


if __name__ == "__main__":
    main()
