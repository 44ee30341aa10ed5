"""Two versions of the kit timed on the models as users write them, interleaved: the guard that
every change to a hot path reports.

    python -m benchmarks.commits BASE [HEAD]            # HEAD: a commit, or "." (the working tree, the default)
    python -m benchmarks.commits BASE --quick --rounds 2 --cases lstm_train

Each commit is checked out into a temporary git worktree. Every round times every case once per
version, A then B in odd rounds and B then A in even ones (an order effect — the process
before leaving the machine warm or busy — hits both alike), each in a fresh process (`benchmarks/user_models.py` of this tree, whose
`import diffprog` is that version's), so a drift of the machine hits both alike. Per case: each
version's median over rounds (seconds), and the ratio B / A with its spread, the smallest and
largest per-round ratio: a ratio whose spread stays above 1 is a slowdown. Writes
commits.{json,md} (with the CPU) to --out.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from .common import at_least, machine, markdown_table, parser, write
from .user_models import CASES

ROOT = Path(__file__).resolve().parent.parent


def checkout(rev: str, into: Path) -> Path:
    """A worktree of `rev` (or this tree for ".")."""
    if rev == ".":
        return ROOT
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(into), rev], check=True)
    return into


def time_case(tree: Path, case: str, quick: bool, reps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, str(ROOT / "benchmarks" / "user_models.py"), case, "--reps", str(reps)] + (["--quick"] if quick else [])
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tree)
    if result.returncode:
        raise SystemExit(f"{case} at {tree}: failed\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None):
    p = parser(__doc__.splitlines()[0], "benchmarks/results", "folder for commits.json and commits.md", compile_cache=False)
    p.add_argument("base")
    p.add_argument("head", nargs="?", default=".")
    p.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    p.add_argument("--rounds", type=at_least(1), default=3)
    p.add_argument("--reps", type=at_least(1), default=10)
    p.add_argument("--quick", action="store_true", help="small shapes (see benchmarks/user_models.py)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffprog-commits-") as tmp:
        trees = [checkout(rev, Path(tmp) / name) for rev, name in ((args.base, "a"), (args.head, "b"))]
        try:
            times = {case: ([], []) for case in args.cases}
            with tqdm(total=args.rounds * len(args.cases) * 2, desc="A/B") as bar:
                for round_ in range(args.rounds):
                    for case in args.cases:
                        order = [0, 1] if round_ % 2 == 0 else [1, 0]
                        for side in order:
                            times[case][side].append(time_case(trees[side], case, args.quick, args.reps))
                            bar.update(1)
        finally:
            for tree in trees:
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    results = {}
    for case, (a, b) in times.items():
        ratios = [y / x for x, y in zip(a, b)]
        results[case] = {"a_s": statistics.median(a), "b_s": statistics.median(b), "ratio": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios), "a_rounds": a, "b_rounds": b}
    info = machine()
    rows = [(case, f"{r['a_s'] * 1e3:.1f}", f"{r['b_s'] * 1e3:.1f}", f"{r['ratio']:.3f}",
             f"{r['ratio_min']:.3f}–{r['ratio_max']:.3f}") for case, r in results.items()]
    table = (f"A = {args.base}, B = {args.head}; {args.rounds} rounds, "
             f"median of {args.reps} calls each{' (--quick)' if args.quick else ''}\n\n"
             + markdown_table(["case", "A ms", "B ms", "B / A", "spread of B / A"], rows))
    out = {"base": args.base, "head": args.head, "results": results, "machine": info}
    write("commits", out, table, args.out, args.quick)
    return out


if __name__ == "__main__":
    main()
