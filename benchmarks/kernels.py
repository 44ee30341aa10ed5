"""Kernel choices inside diffprog, measured: attention, pooling, and the LSTM's loop.

    python -m benchmarks.kernels [--quick]

- attention: `jax.nn.dot_product_attention` vs an explicit einsum-softmax vs diffprog's
  `causal_attention_blocks` (dot_product_attention per block of 64 queries; causal only) vs its
  `self_attention` (the C++ kernel of `dp.kernels` on the CPU), and PyTorch's
  scaled_dot_product_attention when torch is installed, (B, T, H, D), causal at B16 T256 H4 D64
  and over all keys at B32 T200 H4 D8 (`experiments.compare`'s bidirectional Transformer on
  adding, T = 200);
- the attention's score product q·kᵀ for all B·H heads at B32 T128 H4 D64: XLA's batched
  product vs one 2-D product of the same FLOPs, and PyTorch's torch.bmm when torch is installed;
- matrix products x w (M × K)·(K × N) at the shapes of the char-LMs' layers (B32·T128 rows) and
  of generation (4 rows), float32 and bfloat16: XLA's dot (in bfloat16 also into a float32
  result) vs MKL (gemm.cc) vs `dp.kernels.gemm` as `runs_on_mkl` chooses between them (the seam
  `product` takes on the CPU at ≥ `VENDOR_MIN_WORK` multiply-adds, sides ≥ `VENDOR_MIN_SIDE`) vs
  PyTorch's matmul, forward and forward + backward (both gradients), with GFLOP/s of the forward;
- pooling: MaxPool by reshape-fold vs `lax.reduce_window` (window == stride == 2);
- LSTM: one layer's batch loop (input projection included; gradients for the weights) as
  the C++ kernel of `dp.kernels` and as `lax.scan` with unroll 1, 2, 4, 8, and PyTorch's
  nn.LSTM (one layer on float inputs, oneDNN) beside them when torch is installed.
Writes benchmarks/results/kernels.{json,md}.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import diffprog as dp

from .common import parser, block, machine, markdown_table, median_time, optional_torch, write


def explicit_attention(q, k, v, causal):
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        t = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), v)


def attention(results, shape, causal, reps):
    """Self-attention (B, T, H, D) forward and forward + backward, causal or over all keys."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, *shape))
    variants = [("dot_product_attention", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)),
                ("einsum-softmax", partial(explicit_attention, causal=causal))]
    if causal:
        variants.append(("dp causal_attention_blocks (query blocks)", jax.vmap(dp.kernels.causal_attention_blocks)))
    variants.append(("dp self_attention (C++ kernel)", partial(dp.kernels.self_attention, causal=causal)))
    case = f"attention (B{shape[0]} T{shape[1]} H{shape[2]} D{shape[3]}, {'causal' if causal else 'all keys'})"
    for name, f in variants:
        fwd = jax.jit(f)
        bwd = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2)))
        results[f"{case}/{name}"] = {"forward_s": median_time(lambda: block(fwd(q, k, v)), reps),
                                     "backward_s": median_time(lambda: block(bwd(q, k, v)), reps)}
    torch = optional_torch()
    if torch is not None:  # (B, H, T, D) for torch
        tq, tk, tv = (torch.tensor(np.asarray(a).transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        with torch.no_grad():
            forward_s = median_time(sdpa, reps)
        results[f"{case}/PyTorch scaled_dot_product_attention"] = {
            "forward_s": forward_s, "backward_s": median_time(lambda: torch.autograd.grad(sdpa().sum(), (tq, tk, tv)), reps)}
    return [[case, name.split("/", 1)[1], f"{r['forward_s'] * 1e3:.2f}", f"{r['backward_s'] * 1e3:.2f}"]
            for name, r in results.items() if name.startswith(case + "/")]


def score_products(results, quick, reps):
    """q·kᵀ for every (example, head): (B·H) products of (T × D)·(D × T), forward only."""
    heads, steps, dim = (4, 16, 8) if quick else (128, 128, 64)
    q, k = jax.random.normal(jax.random.key(3), (2, heads, steps, dim))
    flat_q, keys = q.reshape(-1, dim), k[0]  # the same FLOPs as one 2-D product
    variants = [("XLA batched (einsum)", jax.jit(lambda q, k: jnp.einsum("ntd,nsd->nts", q, k)), (q, k)),
                ("XLA one 2-D product, same FLOPs", jax.jit(lambda q, k: q @ k.T), (flat_q, keys))]
    torch = optional_torch()
    if torch is not None:
        variants.append(("PyTorch torch.bmm", lambda q, k: q @ k.transpose(1, 2),
                         (torch.tensor(np.asarray(q)), torch.tensor(np.asarray(k)))))
    rows, flops = [], 2 * heads * steps * steps * dim
    for name, f, args in variants:
        seconds = median_time(lambda: block(f(*args)), reps)
        results[f"score_product/{name}"] = {"forward_s": seconds, "gflop_per_s": flops / seconds / 1e9}
        rows.append([f"score product, {heads} × ({steps}×{dim})·({dim}×{steps})", name,
                     f"{seconds * 1e3:.2f} ({flops / seconds / 1e9:.0f} GFLOP/s)", ""])
    return rows


PRODUCT_SHAPES = [(4096, 256, 1024), (4096, 1024, 256), (4096, 256, 768), (4096, 256, 65), (4, 768, 768),
                  (4, 768, 3072), (32, 32, 32), (1024, 1024, 1024)]


def products(results, quick, reps):
    """x w for each of `PRODUCT_SHAPES` (M, K, N), float32 and bfloat16."""
    torch, rows = optional_torch(), []
    for m, k, n in [(64, 64, 64), (4, 32, 32)] if quick else PRODUCT_SHAPES:
        for dtype in (jnp.float32, jnp.bfloat16):
            x, w = (jax.random.normal(key, shape, dtype) for key, shape in zip(jax.random.split(jax.random.key(4)), ((m, k), (k, n))))
            variants = [("XLA dot", jnp.matmul, False)]
            if dtype == jnp.bfloat16:
                variants.append(("XLA dot into float32", partial(jnp.matmul, preferred_element_type=jnp.float32), False))
            if dp.kernels.vendor_blas() is not None:
                variants.append(("MKL (gemm.cc)", dp.kernels.gemm, True))
                if dtype == jnp.bfloat16:
                    variants.append(("dp.kernels.gemm (as `runs_on_mkl` chooses)", dp.kernels.gemm, False))
            for name, product, mkl_only in variants:
                f = lambda x, w, product=product: product(x, w)  # traced anew: jax caches traces by function
                with mock.patch.object(dp.kernels.products, "runs_on_mkl", lambda *_: True) if mkl_only else nullcontext():
                    fwd, bwd = jax.jit(f).lower(x, w).compile(), jax.jit(jax.grad(
                        lambda x, w: f(x, w).astype(jnp.float32).sum(), (0, 1))).lower(x, w).compile()
                results[f"product/{m}x{k}x{n}/{dtype.__name__}/{name}"] = r = {
                    "forward_s": median_time(lambda: block(fwd(x, w)), reps), "backward_s": median_time(lambda: block(bwd(x, w)), reps)}
                rows.append([f"product ({m}×{k})·({k}×{n}) {dtype.__name__}", name,
                             f"{r['forward_s'] * 1e3:.3f} ({2 * m * k * n / r['forward_s'] / 1e9:.0f} GFLOP/s)",
                             f"{r['backward_s'] * 1e3:.3f}"])
            if torch is not None:
                tdtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
                tx, tw = (torch.tensor(np.asarray(a, np.float32)).to(tdtype).requires_grad_() for a in (x, w))
                with torch.no_grad():
                    forward_s = median_time(lambda: tx @ tw, reps)
                backward_s = median_time(lambda: torch.autograd.grad((tx @ tw).float().sum(), (tx, tw)), reps)
                results[f"product/{m}x{k}x{n}/{dtype.__name__}/PyTorch"] = {"forward_s": forward_s, "backward_s": backward_s}
                rows.append([f"product ({m}×{k})·({k}×{n}) {dtype.__name__}", "PyTorch matmul",
                             f"{forward_s * 1e3:.3f} ({2 * m * k * n / forward_s / 1e9:.0f} GFLOP/s)", f"{backward_s * 1e3:.3f}"])
    return rows


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = parser(__doc__.splitlines()[0], "benchmarks/results", "folder for the JSON, markdown and plots", compile_cache=False)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    reps = 3 if args.quick else 20
    results = {"machine": machine()}
    rows = []
    rows += attention(results, (2, 32, 2, 8) if args.quick else (16, 256, 4, 64), True, reps)
    # experiments.compare's bidirectional Transformer on adding, T = 200 (width 32, 4 heads)
    rows += attention(results, (2, 40, 4, 8) if args.quick else (32, 200, 4, 8), False, reps)
    rows += score_products(results, args.quick, reps)
    rows += products(results, args.quick, reps)
    x = jax.random.normal(jax.random.key(1), (16, 32, 32, 16) if not args.quick else (2, 8, 8, 4))
    pool = dp.MaxPool(2)
    for name, f in [("reshape-fold", lambda x: pool.fold(x, (2, 2))), ("reduce_window", lambda x: pool.sliding(x, (2, 2), (2, 2)))]:
        batched = jax.vmap(f)
        fwd = jax.jit(batched)
        bwd = jax.jit(jax.grad(lambda x: batched(x).sum()))
        results[f"maxpool/{name}"] = {"forward_s": median_time(lambda: block(fwd(x)), reps),
                                      "backward_s": median_time(lambda: block(bwd(x)), reps)}
        r = results[f"maxpool/{name}"]
        rows.append([f"max pool 2×2 on {tuple(x.shape)}", name, f"{r['forward_s'] * 1e3:.2f}", f"{r['backward_s'] * 1e3:.2f}"])
    B, T, W = (2, 16, 16) if args.quick else (32, 128, 256)
    xs = jax.random.normal(jax.random.key(2), (B, T, W))
    lstm = dp.LSTM(W)
    weights = lstm.weights(lstm.init(jax.random.key(0), xs[0]))
    time_major, carry = jnp.swapaxes(xs, 0, 1), lstm.initial_carry(xs.dtype, (B,))
    loops = {"C++ kernel (dp.LSTM on the CPU)": partial(dp.kernels.lstm_recurrence, lstm, False)}
    loops |= {f"lax.scan, unroll={unroll}": partial(dp.kernels.scan_recurrence, dp.LSTM(W, unroll=unroll))
              for unroll in (1, 2, 4, 8)}
    for name, loop in loops.items():
        net = partial(lambda loop, weights: loop(weights, time_major, carry, None)[1]["h"], loop)
        fwd = jax.jit(net)
        bwd = jax.jit(jax.grad(lambda weights: net(weights).sum()))
        results[f"lstm/{name}"] = {"forward_s": median_time(lambda: block(fwd(weights)), reps),
                                   "backward_s": median_time(lambda: block(bwd(weights)), reps)}
        r = results[f"lstm/{name}"]
        rows.append([f"LSTM({W}) B{B} T{T}", name, f"{r['forward_s'] * 1e3:.2f}", f"{r['backward_s'] * 1e3:.2f}"])
    torch = optional_torch()
    if torch is not None:
        layer, txs = torch.nn.LSTM(W, W, batch_first=True), torch.tensor(np.asarray(xs))

        def forward():
            with torch.no_grad():
                layer(txs)

        def forward_backward():
            layer.zero_grad(set_to_none=True)
            layer(txs)[0].sum().backward()
        results["lstm/pytorch"] = {"forward_s": median_time(forward, reps), "backward_s": median_time(forward_backward, reps)}
        r = results["lstm/pytorch"]
        rows.append([f"LSTM({W}) B{B} T{T}", "PyTorch nn.LSTM", f"{r['forward_s'] * 1e3:.2f}", f"{r['backward_s'] * 1e3:.2f}"])
    table = markdown_table(["kernel", "variant", "forward ms", "forward+backward ms"], rows)
    write("kernels", results, table, args.out, args.quick)
    return results


if __name__ == "__main__":
    main()
