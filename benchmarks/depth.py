"""Compile time and step time of TransformerBlock^n: one lax.scan vs a Python-unrolled stack.

    python -m benchmarks.depth [--quick]

For n in {1, 2, 4, 8, 16, 24, 48}: the train step (forward + backward + Adam) of
TransformerBlock(d, 4, 4d)^n on (T, d) inputs, batch B. "scanned" is `block ** n` (stacked
params, one scan); "unrolled" is `dp.serial(block, block, ...)` (n separate stages).
Writes benchmarks/results/depth.{json,md} and depth.png.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import diffprog as dp

from .common import parser, block, machine, markdown_table, median_time, write


def measure(model, x, reps):
    params = model.init(jax.random.key(0), x[0])
    net = dp.batched(model).apply
    opt = optax.adam(1e-3)

    def step(state, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(net(p, x) ** 2))(state[0])
        updates, opt_state = opt.update(grads, state[1], state[0])
        return (optax.apply_updates(state[0], updates), opt_state), loss
    state = (params, opt.init(params))
    start = time.perf_counter()
    compiled = jax.jit(step).lower(state, x).compile()
    compile_s = time.perf_counter() - start
    return compile_s, median_time(lambda: block(compiled(state, x)), reps)


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = parser(__doc__.splitlines()[0], "benchmarks/results", "folder for the JSON, markdown and plots", compile_cache=False)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    depths, d, T, B, reps = ((1, 2), 16, 8, 2, 2) if args.quick else ((1, 2, 4, 8, 16, 24, 48), 64, 64, 8, 5)
    x = jax.random.normal(jax.random.key(0), (B, T, d))
    blk = dp.TransformerBlock(d, 4, 4 * d)
    results = {"machine": machine(), "shape": {"d": d, "T": T, "batch": B}, "depths": {}}
    for n in depths:
        scanned = measure(blk ** n, x, reps)
        unrolled = measure(dp.serial(*[blk] * n), x, reps)
        results["depths"][n] = {"scanned": {"compile_s": scanned[0], "step_s": scanned[1]},
                                "unrolled": {"compile_s": unrolled[0], "step_s": unrolled[1]}}
        print(f"n={n:3d}  scanned compile {scanned[0]:6.2f}s step {scanned[1] * 1e3:7.1f}ms   "
              f"unrolled compile {unrolled[0]:6.2f}s step {unrolled[1] * 1e3:7.1f}ms", flush=True)
    rows = [[n, f"{r['scanned']['compile_s']:.2f}", f"{r['unrolled']['compile_s']:.2f}",
             f"{r['scanned']['step_s'] * 1e3:.1f}", f"{r['unrolled']['step_s'] * 1e3:.1f}"]
            for n, r in results["depths"].items()]
    table = (f"TransformerBlock({d}, 4, {4 * d})^n train step, batch {B}, T {T}\n\n"
             + markdown_table(["n", "compile s (scan)", "compile s (unrolled)", "step ms (scan)", "step ms (unrolled)"], rows))
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for kind in ("scanned", "unrolled"):
        axes[0].plot(depths, [results["depths"][n][kind]["compile_s"] for n in depths], "o-", label=kind)
        axes[1].plot(depths, [results["depths"][n][kind]["step_s"] * 1e3 for n in depths], "o-", label=kind)
    axes[0].set(xlabel="depth n", ylabel="compile time (s)")
    axes[1].set(xlabel="depth n", ylabel="train step (ms)")
    axes[0].legend()
    write("depth", results, table, args.out, args.quick, {"depth": fig})
    return results


if __name__ == "__main__":
    main()
