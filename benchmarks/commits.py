"""Two versions of the kit timed on the models as users write them, interleaved: the guard that
every change to a hot path reports.

    python -m benchmarks.commits BASE [HEAD]            # HEAD: a commit, or "." (the working tree, the default)
    python -m benchmarks.commits BASE --quick --rounds 2 --cases lstm_train
    python -m benchmarks.commits BASE --in-process --rounds 8 --cases transformer_train

Each commit is checked out into a temporary git worktree. Every round times every case once per
version, A then B in odd rounds and B then A in even ones (an order effect — the process
before leaving the machine warm or busy — hits both alike), each in a fresh process (`benchmarks/user_models.py` of this tree, whose
`import diffprog` is that version's), so a drift of the machine hits both alike. Per case: each
version's median over rounds (seconds), and the ratio B / A with its spread, the smallest and
largest per-round ratio: a ratio whose spread stays above 1 is a slowdown. Writes
commits.{json,md} (with the CPU) to --out.

--in-process: both versions in this one process instead, each case compiled once per version and
the two programs alternated round by round — on a shared machine whose speed drifts from one
process to the next, a far narrower spread. A version other than this tree's is imported under
its own module name (`diffprog_a`, `diffprog_b`; the package's imports are relative), with
`benchmarks/user_models.py` bound to it, and builds its own copy of the C++ kernels (its own
cache folder, so its MKL hand-over and switches are its own), registered and called under its
own target names (`a_diffprog_…`). The versions share jax and the process: a change to what the
kit sets process-wide (malloc, flags) is not seen; use the default mode for those.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from tqdm import tqdm

from . import user_models
from .common import at_least, machine, markdown_table, median_time, parser, write
from .user_models import BFLOAT16_CASES, CASES

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


@contextlib.contextmanager
def own_kernels(prefix: str, cache: Path):
    """While active, the kit's C++ kernel targets are registered and called as prefix + name, and
    its kernel libraries are built in (and loaded from) `cache`."""
    register, call, before = jax.ffi.register_ffi_target, jax.ffi.ffi_call, os.environ.get("DIFFPROG_CACHE")
    rename = lambda name: prefix + name if name.startswith("diffprog_") else name
    jax.ffi.register_ffi_target = lambda name, *a, **k: register(rename(name), *a, **k)
    jax.ffi.ffi_call = lambda name, *a, **k: call(rename(name), *a, **k)
    os.environ["DIFFPROG_CACHE"] = str(cache)
    try:
        yield
    finally:
        jax.ffi.register_ffi_target, jax.ffi.ffi_call = register, call
        if before is None:
            del os.environ["DIFFPROG_CACHE"]
        else:
            os.environ["DIFFPROG_CACHE"] = before


def load_version(tree: Path, name: str):
    """`tree`'s diffprog imported as the module `name`, and this tree's benchmarks/user_models.py
    imported with `import diffprog` bound to it; returns that user_models module."""
    def load(module_name, path, **where):
        spec = importlib.util.spec_from_file_location(module_name, path, **where)
        module = sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    package = load(name, tree / "diffprog" / "__init__.py", submodule_search_locations=[str(tree / "diffprog")])
    kit = sys.modules["diffprog"]
    sys.modules["diffprog"] = package
    try:
        return load(f"{name}_user_models", ROOT / "benchmarks" / "user_models.py")
    finally:
        sys.modules["diffprog"] = kit


def in_process_timers(trees, cases, quick, reps, scratch: Path):
    """Per version, {case: a call timing one median of `reps` calls}: every case built and
    warmed up (compiled) here, a version other than this tree's under `own_kernels`."""
    timers = []
    for tree, side in zip(trees, "ab"):
        if tree == ROOT:
            models, context = user_models, contextlib.nullcontext()
        else:
            models, context = load_version(tree, f"diffprog_{side}"), own_kernels(f"{side}_", scratch / f"kernels-{side}")
        with context:
            runs = {case: models.runner(case, quick) for case in cases}
            for run in runs.values():
                run(), run()
        timers.append({case: (lambda run=run: median_time(run, reps, warmup=0)) for case, run in runs.items()})
    return timers


def main(argv=None):
    p = parser(__doc__.splitlines()[0], "benchmarks/results", "folder for commits.json and commits.md", compile_cache=False)
    p.add_argument("base")
    p.add_argument("head", nargs="?", default=".")
    p.add_argument("--cases", nargs="+", choices=CASES + BFLOAT16_CASES, default=CASES)
    p.add_argument("--rounds", type=at_least(1), default=3)
    p.add_argument("--reps", type=at_least(1), default=10)
    p.add_argument("--quick", action="store_true", help="small shapes (see benchmarks/user_models.py)")
    p.add_argument("--in-process", action="store_true", help="both versions in this process (see above)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffprog-commits-") as tmp:
        trees = [checkout(rev, Path(tmp) / name) for rev, name in ((args.base, "a"), (args.head, "b"))]
        try:
            if args.in_process:
                user_models.dp.keep_freed_memory()  # as user_models.main does in each process of the default mode
                timers = in_process_timers(trees, args.cases, args.quick, args.reps, Path(tmp))
                time_side = lambda side, case: timers[side][case]()
            else:
                time_side = lambda side, case: time_case(trees[side], case, args.quick, args.reps)
            times = {case: ([], []) for case in args.cases}
            with tqdm(total=args.rounds * len(args.cases) * 2, desc="A/B") as bar:
                for round_ in range(args.rounds):
                    for case in args.cases:
                        order = [0, 1] if round_ % 2 == 0 else [1, 0]
                        for side in order:
                            times[case][side].append(time_side(side, case))
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
             f"median of {args.reps} calls each{' (--quick)' if args.quick else ''}"
             f"{', both versions in one process' if args.in_process else ', each version in its own processes'}\n\n"
             + markdown_table(["case", "A ms", "B ms", "B / A", "spread of B / A"], rows))
    out = {"base": args.base, "head": args.head, "in_process": args.in_process, "results": results, "machine": info}
    write("commits", out, table, args.out, args.quick)
    return out


if __name__ == "__main__":
    main()
