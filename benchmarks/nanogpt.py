"""`experiments.charlm` against nanoGPT at nanoGPT's CPU configuration, wall time and loss.

    python -m benchmarks.nanogpt --nanogpt PATH --text tinyshakespeare.txt [--rounds 2]

PATH is a checkout of github.com/karpathy/nanoGPT (not installable from PyPI; nothing is
downloaded). Both train the character-level Transformer of nanoGPT's README "I only have a
macbook" run — 4 layers, 4 heads, width 128, block 64, batch 12, 2000 iterations, no dropout,
evaluation every 250 — on --text split 90/10 (nanoGPT's `shakespeare_char` data, written from
that text into PATH/data/shakespeare_char/ as its prepare.py would). Each run is its own process,
timed whole (start-up, compilation, evaluations, checkpoints, sampling included), the two
alternated for --rounds. charlm uses a compilation cache (`--compile_cache`) that is empty
before round 1: round 1 compiles every program, later rounds load them from the cache, as a
user's second run does. The ratio is taken within each round (the two runs are neighbours in time,
the machine's drift is slower). Reports the wall times, their ratios, the median time of an iteration
(nanoGPT's logged per-iteration time, which reads the loss every iteration; charlm's from its
tokens/s, logged every 10 steps) and each run's final validation loss. Writes benchmarks/results/nanogpt.{json,md}.
"""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import at_least, machine, markdown_table, parser, write

NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
               "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def prepare(nanogpt: Path, text: str):
    """nanoGPT's data/shakespeare_char/prepare.py on `text`: sorted characters, 90/10, uint16."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], np.uint16)
    split = int(0.9 * len(ids))
    folder = nanogpt / "data" / "shakespeare_char"
    folder.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(folder / "train.bin")
    ids[split:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": index}, f)


def timed(command, cwd=None):
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def main(argv=None):
    p = parser(__doc__.splitlines()[0], "benchmarks/results", "folder for the JSON and markdown", compile_cache=False)
    p.add_argument("--nanogpt", required=True, help="a checkout of karpathy/nanoGPT")
    p.add_argument("--text", required=True, help="UTF-8 text (nanoGPT's is tinyshakespeare)")
    p.add_argument("--rounds", type=at_least(1), default=2)
    args = p.parse_args(argv)
    nanogpt = Path(args.nanogpt).resolve()
    if not (nanogpt / "train.py").exists():
        p.error(f"--nanogpt {nanogpt}: no train.py there (a checkout of karpathy/nanoGPT is expected)")
    prepare(nanogpt, Path(args.text).read_text(encoding="utf-8"))
    runs = {"nanoGPT": [], "diffprog charlm": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            seconds, log = timed([sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={scratch}/nanogpt{round_}"],
                                 cwd=nanogpt)
            val = float(re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", log)[-1])
            iteration_ms = np.median([float(t) for t in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", log, re.M)])
            runs["nanoGPT"].append({"wall_s": seconds, "val_loss": val, "iteration_ms": iteration_ms})
            workdir = Path(scratch) / f"charlm{round_}"
            seconds, _ = timed([sys.executable, "-m", "experiments.charlm", "--text", str(Path(args.text).resolve()),
                                "--workdir", str(workdir), "--compile_cache", f"{scratch}/compile-cache"])
            val = json.loads((workdir / "results.json").read_text())["val_loss"]
            rates = [json.loads(line).get("tokens_per_s") for line in open(workdir / "metrics.jsonl")]
            iteration_ms = 1e3 * 12 * 64 / np.median([r for r in rates if r])
            runs["diffprog charlm"].append({"wall_s": seconds, "val_loss": val, "iteration_ms": iteration_ms})
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f} s" for k, v in runs.items()))
    rows = [[k, " / ".join(f"{r['wall_s']:.1f}" for r in v), " / ".join(f"{r['iteration_ms']:.1f}" for r in v),
             " / ".join(f"{r['val_loss']:.3f}" for r in v)] for k, v in runs.items()]
    table = markdown_table(["run", "wall s per round", "median ms per iteration", "final val loss"], rows)
    ratios = [n["wall_s"] / c["wall_s"] for n, c in zip(runs["nanoGPT"], runs["diffprog charlm"])]
    table += f"\n\nnanoGPT / diffprog, each round's two runs: round 1 (charlm compiling every program) {ratios[0]:.2f}×"
    if args.rounds > 1:
        table += (f"; rounds 2–{args.rounds} (charlm's programs from its compile cache) "
                  + " / ".join(f"{r:.2f}×" for r in ratios[1:]))
    write("nanogpt", {"machine": machine(), "runs": runs}, table, args.out)


if __name__ == "__main__":
    main()
