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
    return on_cpu(attention_kernel(causal, bfloat16_products() and amx_attention()), _definition(causal), q, k, v)


def _definition(causal: bool):
    def attention(q, k, v):
        if not causal:
            return jax.nn.dot_product_attention(q, k, v)
        return jax.vmap(causal_attention_blocks)(q, k, v) if q.ndim > 3 else causal_attention_blocks(q, k, v)
    return attention


def split_projection(qkv, bias, heads: int):
    """q, k, v (..., T, heads, head_dim): the thirds of qkv (..., T, 3·heads·head_dim) + bias."""
    return [a.reshape(a.shape[:-1] + (heads, -1)) for a in jnp.split(qkv + bias, 3, -1)]


def projected_self_attention(qkv, bias, heads: int, causal: bool):
    """`self_attention(q, k, v, causal)` of q, k, v = `split_projection(qkv, bias, heads)`: the
    self-attention of a fused projection qkv = x [W_q W_k W_v] (..., T, 3·heads·head_dim) and its
    bias (3·heads·head_dim,), → (..., T, heads, head_dim). On the CPU in float32 the kernel reads
    the thirds where the product wrote them and adds the bias as it reads, and its gradient is one
    ∂qkv: no slices of the projection, no concatenation of dq, dk, dv. Under autocast with AMX
    attention, the thirds are split for `self_attention`'s bfloat16 kernel."""
    if bfloat16_products() and amx_attention():
        return self_attention(*split_projection(qkv, bias, heads), causal)
    return on_cpu(projected_kernel(causal, heads),
                  lambda qkv, bias: _definition(causal)(*split_projection(qkv, bias, heads)), qkv, bias)


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


@functools.cache
def projected_kernel(causal: bool, heads: int):
    """`attention_kernel(causal)` of the thirds of a projection plus its bias (see
    `projected_self_attention`), by the float32 kernel's projected handlers: qkv (..., T, F),
    bias (F,) with F = 3·heads·head_dim → (..., T, heads, head_dim); its VJP gives ∂qkv and ∂bias
    (∂qkv summed over the leading axes)."""
    def scale(qkv):
        return np.float32(1 / np.sqrt(qkv.shape[-1] // (3 * heads)))

    @batch_partitioned("... t f, f -> ... t h d, ... t h")
    def forward_call(qkv, bias):
        out = jax.ShapeDtypeStruct(qkv.shape[:-1] + (heads, qkv.shape[-1] // (3 * heads)), qkv.dtype)
        lse = jax.ShapeDtypeStruct(qkv.shape[:-1] + (heads,), jnp.float32)
        return tuple(jax.ffi.ffi_call("diffprog_projected_attention_forward", (out, lse))(
            qkv, bias, scale=scale(qkv), causal=causal, heads=np.int64(heads)))

    @batch_partitioned("... t f, f, ... t h d, ... t h, ... t h d -> ... t f")
    def backward_call(qkv, bias, out, lse, d_out):
        return tuple(jax.ffi.ffi_call("diffprog_projected_attention_backward", (jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),))(
            qkv, bias, out, lse, d_out, scale=scale(qkv), causal=causal, heads=np.int64(heads)))

    def forward(qkv, bias):
        if qkv.ndim < 2 or qkv.shape[-1] % (3 * heads) or bias.shape != qkv.shape[-1:]:
            raise ValueError(f"projected_self_attention: expected qkv (..., T, 3·{heads}·head_dim) and its bias "
                             f"(3·{heads}·head_dim,), got {qkv.shape} and {bias.shape}")
        require("projected_self_attention")
        out, lse = forward_call(qkv, bias)
        return out, (qkv, bias, out, lse)

    def backward(residuals, d_out):
        d_qkv, = backward_call(*residuals, d_out)
        return d_qkv, d_qkv.reshape(-1, d_qkv.shape[-1]).sum(0)

    @jax.custom_vjp
    def kernel(qkv, bias):
        return forward(qkv, bias)[0]

    kernel.defvjp(forward, backward)
    return kernel
