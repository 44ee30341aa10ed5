"""Causal self-attention's fast paths: the fused C++ kernel (CPU, float32) and query blocks
(elsewhere). The definition is `jax.nn.dot_product_attention` with a causal mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .library import on_cpu, require
from .partition import batch_partitioned

CAUSAL_BLOCK = 64


def causal_attention(q, k, v):
    """Causal dot-product attention of q (T, heads, head_dim) over k, v (T, heads, head_dim)
    (any leading batch axes): the C++ kernel on the CPU for float32, `causal_attention_blocks`
    elsewhere."""
    return on_cpu(causal_attention_kernel, jax.vmap(causal_attention_blocks) if q.ndim > 3 else causal_attention_blocks,
                  q, k, v)


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


@batch_partitioned("... t h d, ... t h d, ... t h d -> ... t h d, ... t h")
def _forward_call(q, k, v):
    lse_shape = jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)
    return tuple(jax.ffi.ffi_call("diffprog_causal_attention_forward", (jax.ShapeDtypeStruct(q.shape, q.dtype), lse_shape),
                                  vmap_method="broadcast_all")(q, k, v, scale=_scale(q)))


@batch_partitioned("... t h d, ... t h d, ... t h d, ... t h d, ... t h, ... t h d -> ... t h d, ... t h d, ... t h d")
def _backward_call(q, k, v, out, lse, d_out):
    like = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return tuple(jax.ffi.ffi_call("diffprog_causal_attention_backward", (like, like, like),
                                  vmap_method="broadcast_all")(q, k, v, out, lse, d_out, scale=_scale(q)))


def _forward(q, k, v):
    if q.ndim < 3 or not q.shape == k.shape == v.shape:
        raise ValueError(f"causal_attention: expected q, k, v of one shape (..., T, heads, head_dim), "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    require("causal_attention")
    out, lse = _forward_call(q, k, v)
    return out, (q, k, v, out, lse)


def _backward(residuals, d_out):
    return _backward_call(*residuals, d_out)


@jax.custom_vjp
def causal_attention_kernel(q, k, v):
    """softmax(q kᵀ/√D, causal) v for float32 q, k, v (..., T, H, D) by the C++ kernel (CPU only;
    `dp.kernels.available()`): one fused pass per (example, head), probabilities recomputed
    backward."""
    return _forward(q, k, v)[0]


causal_attention_kernel.defvjp(_forward, _backward)
