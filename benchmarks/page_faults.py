"""Page faults per call of a jitted step, with glibc's defaults and after `dp.keep_freed_memory()`.

    python -m benchmarks.page_faults [--quick]

The step's temporaries take n² floats (16 MiB at n = 2048). glibc serves blocks that large with
mmap and unmaps them on free, so each call maps fresh pages and faults on every 4 KiB of them;
`keep_freed_memory()` keeps them in the heap. Each setting runs in a fresh process (the setting
is process-wide, and what earlier allocations did to glibc's dynamic threshold would leak into
the other). A measurement of the machine, not a test: other processes' activity changes it.
"""
from __future__ import annotations

import subprocess
import sys

from .common import machine, markdown_table, parser, write

STEP = """if True:
    import resource, sys
    import jax, jax.numpy as jnp
    import diffprog
    if sys.argv[1] == "kept":
        assert diffprog.keep_freed_memory()
    n, reps = int(sys.argv[2]), int(sys.argv[3])
    f = jax.jit(lambda x: jnp.tanh(jnp.tanh(x) @ x).sum())
    x = jnp.ones((n, n))
    for _ in range(3):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / reps)"""


def main(argv=None):
    p = parser(__doc__.splitlines()[0], "benchmarks/results", "folder for the JSON and markdown", compile_cache=False)
    p.add_argument("--quick", action="store_true", help="n = 512, 2 calls")
    args = p.parse_args(argv)
    n, reps = (512, 2) if args.quick else (2048, 10)
    faults = {}
    for setting in ("glibc defaults", "kept"):
        out = subprocess.run([sys.executable, "-c", STEP, setting.split()[0], str(n), str(reps)],
                             capture_output=True, text=True, check=True)
        faults[setting] = float(out.stdout.split()[-1])
    results = {"machine": machine(), "n": n, "temporary_pages": n * n * 4 // 4096, "faults_per_call": faults}
    table = (f"Minor page faults per call, temporaries of {n * n * 4 // 4096:,} pages\n\n"
             + markdown_table(["malloc", "faults per call"], [[k, f"{v:,.0f}"] for k, v in faults.items()]))
    write("page_faults", results, table, args.out, args.quick)
    return results


if __name__ == "__main__":
    main()
