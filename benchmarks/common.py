"""Shared by the benchmarks: timing, the machine description, JSON + markdown output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.common import at_least, markdown_table, parser  # noqa: F401  (markdown_table: for the benchmarks)


def timing_arguments(doc: str, quick_help: str):
    """The flags of a benchmark that times interleaved rounds: --quick, --reps, --rounds, --out."""
    p = parser(doc.splitlines()[0], "benchmarks/results", "folder for the JSON, markdown and plots", compile_cache=False)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--reps", type=at_least(1), default=10)
    p.add_argument("--rounds", type=at_least(1), default=3)
    return p


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve") if f in flags]
    versions = {"jax": jax.__version__}
    for name in ("flax", "optax", "torch"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"cores": os.cpu_count(), "cpu": cpu, "vector_extensions": vector, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "python": platform.python_version(), **versions}


def optional_torch():
    """PyTorch (the `bench` extra) set to one thread per core, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count())
    return torch


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def median_time(fn, reps: int, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds over `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(n: int = 2048, reps: int = 10) -> float:
    """Attainable float32 matmul FLOP/s of this backend: the fastest of `reps` n×n @ n×n."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        f(a).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(seconds)


def write(name: str, results: dict, table: str, out: str = "benchmarks/results", quick: bool = False,
          figures: dict = None) -> None:
    """Write out/name.json, out/name.md and each figure as out/<stem>.png (a `_quick` suffix on
    every name with `quick`), then print the table, under a line naming the machine it ran on."""
    m = results["machine"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("jax", "torch", "transformers") if k in m)
    table = (f"Machine: {m['cpu']} ({', '.join(m['vector_extensions']) or 'no AVX2'}), {m['cores']} cores, "
             f"{m.get('backend', 'cpu')}; {versions}\n\n{table}")
    path, suffix = Path(out), "_quick" if quick else ""
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}{suffix}.json").write_text(json.dumps(results, indent=2, default=float))
    (path / f"{name}{suffix}.md").write_text(table + "\n")
    for stem, fig in (figures or {}).items():
        fig.tight_layout()
        fig.savefig(path / f"{stem}{suffix}.png", dpi=110)
    print("\n" + table)
