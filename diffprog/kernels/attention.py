"""Self-attention's fast paths: the fused C++ kernel (CPU, float32; its products in bfloat16 on
AMX under `autocast`), causal or over all keys, and, for causal attention elsewhere, query
blocks. The definition is `jax.nn.dot_product_attention` (with a causal mask when causal)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .library import amx_attention, on_cpu, require
from .partition import batch_partitioned
from .products import bfloat16_products

CAUSAL_BLOCK = 64


def self_attention(q, k, v, causal: bool):
    """Dot-product attention of q (T, heads, head_dim) over k, v (T, heads, head_dim) (any
    leading batch axes), every query over every key or (`causal`) over the keys up to its own
    step: the C++ kernel on the CPU for float32 (inside `autocast(bfloat16)`, on a CPU with AMX,
    its products in bfloat16, summed in float32); elsewhere `causal_attention_blocks` (causal) or
    `jax.nn.dot_product_attention`."""
    if causal:
        reference = jax.vmap(causal_attention_blocks) if q.ndim > 3 else causal_attention_blocks
    else:
        reference = jax.nn.dot_product_attention
    return on_cpu(attention_kernel(causal, bfloat16_products() and amx_attention()), reference, q, k, v)


def causal_attention(q, k, v):
    """`self_attention(q, k, v, causal=True)`."""
    return self_attention(q, k, v, True)


def causal_attention_blocks(q, k, v):
    """Causal attention computed for blocks of `CAUSAL_BLOCK` queries: the block of queries
    [i, j) attends only to the keys [0, j), so the scores above the diagonal blocks — about half
    of them for long sequences — are never computed. Each block is one
    `jax.nn.dot_product_attention`. q, k, v: (T, heads, head_dim)."""
    steps = q.shape[0]
    outs = []
    for start in range(0, steps, CAUSAL_BLOCK):
        stop = min(start + CAUSAL_BLOCK, steps)
        allowed = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
        outs.append(jax.nn.dot_product_attention(q[start:stop], k[:stop], v[:stop], mask=allowed[None]))
    return jnp.concatenate(outs)


def _scale(q):
    return np.float32(1 / np.sqrt(q.shape[-1]))


@functools.cache
def attention_kernel(causal: bool, bfloat16: bool = False):
    """softmax(q kᵀ/√D (causal: masked to j ≤ i)) v for float32 q, k, v (..., T, H, D) by the
    C++ kernel (CPU only; `dp.kernels.available()`): one fused pass per (example, head),
    probabilities recomputed backward. `bfloat16` (needs `amx_attention()`): the six products
    (Q Kᵀ, P V and the backward pass's four) take their operands rounded to bfloat16 and sum
    in float32 on AMX tiles, as under PyTorch's autocast; the softmax stays float32."""
    suffix = "_bf16" if bfloat16 else ""

    @batch_partitioned("... t h d, ... t h d, ... t h d -> ... t h d, ... t h")
    def forward_call(q, k, v):
        lse_shape = jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)
        return tuple(jax.ffi.ffi_call("diffprog_attention_forward" + suffix, (jax.ShapeDtypeStruct(q.shape, q.dtype), lse_shape),
                                      vmap_method="broadcast_all")(q, k, v, scale=_scale(q), causal=causal))

    @batch_partitioned("... t h d, ... t h d, ... t h d, ... t h d, ... t h, ... t h d -> ... t h d, ... t h d, ... t h d")
    def backward_call(q, k, v, out, lse, d_out):
        like = jax.ShapeDtypeStruct(q.shape, q.dtype)
        return tuple(jax.ffi.ffi_call("diffprog_attention_backward" + suffix, (like, like, like),
                                      vmap_method="broadcast_all")(q, k, v, out, lse, d_out, scale=_scale(q), causal=causal))

    def forward(q, k, v):
        if q.ndim < 3 or not q.shape == k.shape == v.shape:
            raise ValueError(f"self_attention: expected q, k, v of one shape (..., T, heads, head_dim), "
                             f"got {q.shape}, {k.shape}, {v.shape}")
        require("self_attention")
        out, lse = forward_call(q, k, v)
        return out, (q, k, v, out, lse)

    @jax.custom_vjp
    def kernel(q, k, v):
        return forward(q, k, v)[0]

    kernel.defvjp(forward, lambda residuals, d_out: backward_call(*residuals, d_out))
    return kernel


causal_attention_kernel = attention_kernel(True)
