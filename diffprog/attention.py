"""Multi-head attention: a soft lookup of every query in the (key, value) memory of a sequence."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .basic import Dense, affine
from .core import Combinator, LayerError, layerclass
from .sequence import check_lengths, check_sequence, valid_steps
from .soft import score_layer


@layerclass
class Attention(Combinator):
    """Attention : SequenceModel, (T, d) → (T, d) — the notes' attention, `heads` times.

    For each head h, with q_t = W_q^h x_t, k_s = W_k^h m_s, v_s = W_v^h m_s:

        α_{t,s} = softmax_s(score(q_t, k_s)),  head_h(x)_t = Σ_s α_{t,s} v_s
        Attention(x)_t = W_o [head_1(x)_t; ...; head_H(x)_t] + b_o

    m = x (self-attention) or the `context=` side input (S, d_c) when `cross=True`.
    score "dot" is q·k/√head_dim computed by `jax.nn.dot_product_attention` (self-attention
    without masks besides causal: `dp.kernels.self_attention`, on the CPU a fused C++ kernel; with
    one key/value head per query head and no rotary positions `dp.kernels.projected_self_attention`,
    the kernel reading q, k, v from the one projection x [W_q W_k W_v]);
    "general" and "concat" are the notes' other soft-lookup scores (see `dp.soft`), computed
    explicitly.

    Masks (combined): `causal=True` (t attends to s ≤ t); `lengths=` (self: valid steps of x) or
    `context_lengths=` (cross: valid steps of the context) hide padded keys; `mask=` a boolean
    (T, S) where True means "may attend". A query whose every key is masked reads nothing: its
    output (before W_o) and its α row are 0, and so are their gradients. `return_weights=True` returns (y, α (heads, T, S)).
    `dropout` on α is active when `key=` is given.
    Grouped-query attention (`kv_heads` < heads, Llama's): the keys and values have kv_heads
    heads, each read by heads / kv_heads query heads. Rotary positions (`rotary=θ`, RoPE, Llama's
    θ = 10000): q_t and k_s are rotated by angles t·θ^(−2i/head_dim) before the score (the
    halves-rotation of Hugging Face's Llama), so that q_t·k_s depends on t − s.
    Params: query {weight (d, heads·head_dim), bias}, key/value {weight (d, kv_heads·head_dim),
    bias}, output {weight, bias} (no biases with use_bias=False), and "score" for the
    general/concat scores.
    """

    heads: int
    causal: bool = False
    cross: bool = False
    score: str = "dot"
    dropout: float = 0.0
    return_weights: bool = False
    use_bias: bool = True
    kv_heads: Optional[int] = None
    rotary: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        score_layer(self.score)
        if self.kv_heads is not None and not (isinstance(self.kv_heads, int) and 1 <= self.kv_heads <= self.heads
                                              and self.heads % self.kv_heads == 0):
            raise LayerError(f"Attention({self.heads}): kv_heads must be an int that divides heads={self.heads}, "
                             f"got {self.kv_heads!r}")
        if self.rotary is not None and not (isinstance(self.rotary, (int, float)) and self.rotary > 0):
            raise LayerError(f"Attention({self.heads}): rotary (RoPE's θ) must be a number > 0, got {self.rotary!r}")
        if self.rotary is not None and self.cross:
            raise LayerError(f"Attention({self.heads}): rotary positions are for self-attention (the context's "
                             f"steps are not positions of the sequence); got cross=True with rotary={self.rotary}")

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // (self.kv_heads or self.heads)

    @property
    def side_inputs(self):
        sides = {"mask", "lengths"}
        return frozenset(sides | {"context", "context_lengths"} if self.cross else sides)

    def init_params(self, key, spec, **side):
        check_sequence(self, spec)
        d = spec.shape[-1]
        if d % self.heads:
            raise LayerError(f"{self!r}: model width {d} is not divisible by {self.heads} heads")
        head_dim = d // self.heads
        if self.rotary is not None and head_dim % 2:
            raise LayerError(f"{self!r}: rotary positions turn pairs of features; head_dim {d} / {self.heads} = "
                             f"{head_dim} is odd")
        kq, kk, kv, ko, ks = jax.random.split(key, 5)
        memory = side.get("context", spec) if self.cross else spec  # (S, d_c): keys and values read it
        check_sequence(self, memory)
        kv_width = d // self.groups
        params = {name: Dense(width, self.use_bias).init(k, source) for name, width, k, source in
                  (("query", d, kq, spec), ("key", kv_width, kk, memory), ("value", kv_width, kv, memory),
                   ("output", d, ko, spec))}
        if self.score != "dot":
            one = jax.ShapeDtypeStruct((head_dim,), spec.dtype)
            params["score"] = score_layer(self.score).init(
                ks, (one, jax.ShapeDtypeStruct((1, head_dim), spec.dtype)))
        return params

    def heads_of(self, params, x, name, position=None):
        """The `name` projection of x (..., T, d) split into heads, (..., T, heads, head_dim)
        (keys and values: kv_heads), rotated for steps position.. (queries and keys, with `rotary`)."""
        y = self.split_heads(affine(params[name], x), params)
        return self.rotate(y, position) if name in ("query", "key") and position is not None else y

    def split_heads(self, y, params):
        """(..., T, n·head_dim) → (..., T, n, head_dim), head_dim that of the queries."""
        head_dim = params["query"]["weight"].shape[1] // self.heads
        return y.reshape(y.shape[:-1] + (-1, head_dim))

    def rotate(self, y, position):
        """RoPE: y (..., T, n, head_dim) at steps position..position+T-1 rotated pairwise, the
        halves (y_i, y_{i+D/2}) by the angle step·θ^(−2i/D) (nothing without `rotary`); in float32
        on bfloat16 values on the CPU (`dp.kernels.in_float32_on_cpu`: XLA:CPU's
        bfloat16 gradient of the slices and pads took ~9 ms per rotation in the Transformer++ step)."""
        if self.rotary is None:
            return y

        def rotated(y):
            half = y.shape[-1] // 2
            steps = position + jnp.arange(y.shape[-3])
            angles = steps[:, None] * (1.0 / self.rotary ** (np.arange(half, dtype=np.float32) * 2 / y.shape[-1]))
            cos, sin = (jnp.concatenate([f(angles)] * 2, -1)[:, None, :] for f in (jnp.cos, jnp.sin))
            turned = jnp.concatenate([-y[..., half:], y[..., :half]], -1)
            return (y * cos + turned * sin).astype(y.dtype)
        return kernels.in_float32_on_cpu(rotated, y)

    def shared(self, kv):
        """Keys or values (..., S, kv_heads, head_dim) repeated for the query heads that read them."""
        return kv if self.groups == 1 else jnp.repeat(kv, self.groups, axis=-2)

    def route(self, run, params, x, *, key=None, **side):
        """The projections over all positions at once (B·T on a batch); the attention itself
        per example, except self-attention without masks, which takes the whole batch. On the CPU
        in float32 on bfloat16 values (`dp.kernels.in_float32_on_cpu`; the products bfloat16 ×
        bfloat16 → float32 where the CPU has the hardware): the projections, the attention and the
        output projection as one float32 computation, its result rounded once (q, k, v and the heads' output no longer rounded and widened again in
        passes of their own: the README Transformer's bfloat16 forward pass 0.97–1.01× as long)."""
        arrays = {n: v for n, v in side.items() if isinstance(v, (jax.Array, np.ndarray))}  # the rest stays static
        return kernels.in_float32_on_cpu(
            lambda params, x, key, arrays: self.attend_all(run, params, x, key=key, **{**side, **arrays}),
            params, x, key, arrays)

    def attend_all(self, run, params, x, *, key=None, **side):
        """`route` as written: in the args' dtypes."""
        d = params["query"]["weight"].shape[0]
        check_sequence(self, run.example(x), d)
        if params["query"]["weight"].shape[1] % self.heads:
            raise LayerError(f"{self!r}: params have {params['query']['weight'].shape[1]} "
                             f"query features, not divisible by {self.heads} heads")
        if self.cross:
            if side.get("context") is None:
                raise LayerError(f"{self!r}: cross-attention needs context= (S, {d})")
            check_sequence(self, run.example(side["context"]), params["key"]["weight"].shape[0])
            q, k, v = (self.heads_of(params, a, n) for a, n in
                       ((x, "query"), (side["context"], "key"), (side["context"], "value")))
        else:  # self-attention: the three projections as one matrix product
            names = ("query", "key", "value")
            fused = {k: jnp.concatenate([params[n][k] for n in names], -1) for k in params["query"]}
            if self.fused(key, side) and self.groups == 1 and self.rotary is None:
                # the kernel reads q, k, v from the product and adds their bias itself
                bias = fused.get("bias", jnp.zeros(fused["weight"].shape[1], fused["weight"].dtype))
                out = kernels.projected_self_attention(affine({"weight": fused["weight"]}, x), bias, self.heads,
                                                       self.causal)
                return affine(params["output"], out.reshape(out.shape[:-2] + (-1,)))
            width = params["query"]["weight"].shape[1]
            q, k, v = (self.split_heads(a, params) for a in
                       jnp.split(affine(fused, x), [width, width + params["key"]["weight"].shape[1]], -1))
            q, k = self.rotate(q, 0), self.rotate(k, 0)
        k, v = self.shared(k), self.shared(v)
        side = {n: v for n, v in side.items() if n != "context"}
        if self.fused(key, side):
            out, weights = kernels.self_attention(q, k, v, self.causal), None
        else:
            out, weights = run.each(lambda *a: self.attend(params, *a))(q, k, v, run.keys(key, x), side)
        y = affine(params["output"], out.reshape(out.shape[:-2] + (-1,)))
        return (y, weights) if self.return_weights else y

    def explicit(self, key):
        """Whether α is computed as an array (weights returned, a non-dot score, or dropout)."""
        return self.return_weights or self.score != "dot" or (self.dropout > 0 and key is not None)

    def fused(self, key, side):
        """Dot-product self-attention, causal or not, with nothing (else) masked and α not
        needed as an array: `dp.kernels.self_attention` takes the whole batch."""
        return (not self.cross and not self.explicit(key)
                and side.get("mask") is None and side.get("lengths") is None)

    def attend(self, params, q, k, v, key, side):
        """One example: q (T, heads, head_dim), k, v (S, heads, head_dim) → (out (T, heads,
        head_dim), α (heads, T, S) or None)."""
        steps, memory_steps = q.shape[0], k.shape[0]
        lengths = side.get("context_lengths") if self.cross else side.get("lengths")
        explicit = self.explicit(key)
        allowed = self.allowed(steps, memory_steps, side.get("mask"), check_lengths(self, lengths, memory_steps))
        if explicit:
            out, weights = self.attend_explicitly(params, q, k, v, allowed, key)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=None if allowed is None else allowed[None])
            weights = None
        if allowed is None:
            return out, weights
        # a query that may attend to no key reads nothing: output 0, α 0 (and so zero gradients)
        some = allowed.any(-1)
        return (jnp.where(some[:, None, None], out, 0),
                None if weights is None else jnp.where(some[None, :, None], weights, 0))

    def allowed(self, steps, memory_steps, mask, memory_lengths) -> Optional[jax.Array]:
        """Boolean (T, S): which key each query may attend to (None: all)."""
        allowed = None
        if self.causal:
            allowed = jnp.tril(jnp.ones((steps, memory_steps), bool))
        if memory_lengths is not None:
            keys_ok = jnp.broadcast_to(valid_steps(memory_steps, memory_lengths), (steps, memory_steps))
            allowed = keys_ok if allowed is None else allowed & keys_ok
        if mask is not None:
            if np.shape(mask) != (steps, memory_steps) or jnp.result_type(mask) != bool:
                raise LayerError(f"{self!r}: expected mask= bool ({steps}, {memory_steps}), "
                                 f"got {np.shape(mask)} {jnp.result_type(mask)}")
            allowed = mask if allowed is None else allowed & mask
        return allowed

    def logits(self, params, q, k):
        """Scores (heads, T, S)."""
        if self.score == "dot":
            return jnp.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
        layer = score_layer(self.score)
        per_query = jax.vmap(lambda qt, kh: layer.apply(params["score"], (qt, kh)), (0, None))
        return jax.vmap(per_query, (1, 1))(q, k)

    def attend_explicitly(self, params, q, k, v, allowed, key):
        logits = self.logits(params, q, k)
        if allowed is not None:
            logits = jnp.where(allowed[None], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        dropped = weights
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(key, 1 - self.dropout, weights.shape)
            dropped = jnp.where(keep, weights / (1 - self.dropout), 0)
        return jnp.einsum("hts,shd->thd", dropped, v), weights

    # -- incremental decoding: a KV cache (causal self-attention) or the fixed context --
    def init_cache(self, params, max_len, dtype=jnp.float32, context=None, context_lengths=None, **side):
        """Cross-attention: the context. Causal self-attention: keys and values (kv_heads, max_len,
        head_dim), head-major so that a step's two products read them without a transpose."""
        if self.cross:
            if context is None:
                raise LayerError(f"{self!r}: decoding with cross-attention needs context= in init_cache")
            return {"context": context, **({} if context_lengths is None else {"context_lengths": context_lengths})}
        head_dim = params["query"]["weight"].shape[1] // self.heads
        shape = (params["key"]["weight"].shape[1] // head_dim, max_len, head_dim)
        return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}

    def decode(self, params, xs, cache, position):
        """The chunk xs (P, d) at steps position..position+P-1: its keys and values projected
        once and written to the cache, each query attending to the cache up to its own step."""
        if self.cross:
            return self.apply(params, xs, **cache), cache
        if not self.causal:
            raise LayerError(f"{self!r}: step-by-step decoding needs causal self-attention")
        steps, max_len = xs.shape[0], cache["key"].shape[1]
        if not isinstance(position, jax.core.Tracer) and position + steps > max_len:
            raise LayerError(f"{self!r}: steps {position}..{position + steps - 1} are past the KV cache ({max_len})")
        cache = self.write_cache(params, xs, cache, position)
        q = self.heads_of(params, xs, "query", position)
        keys, values = (cache[n].swapaxes(0, 1) for n in ("key", "value"))  # (max_len, kv_heads, head_dim)
        allowed = jnp.arange(max_len)[None] <= position + jnp.arange(steps)[:, None]
        # grouped queries: the `groups` query heads of a key/value head read it as extra query rows,
        # so the cache is read as it is, never repeated per step
        kv_heads, groups = keys.shape[1], self.groups
        rows = q.reshape(steps, kv_heads, groups, -1).swapaxes(1, 2).reshape(steps * groups, kv_heads, -1)
        out, _ = self.attend_explicitly(params, rows, keys, values, jnp.repeat(allowed, groups, axis=0), None)
        out = out.reshape(steps, groups, kv_heads, -1).swapaxes(1, 2)
        y = affine(params["output"], out.reshape(steps, -1))
        # under jit a chunk past the cache is not known while tracing: NaN, never a valid-looking output
        return jnp.where(position + steps <= max_len, y, jnp.nan), cache

    def write_cache(self, params, xs, cache, position):
        """The keys (rotated) and values of xs (P, d) written to the cache at steps position..position+P-1."""
        return {n: jax.lax.dynamic_update_slice_in_dim(
                    cache[n], self.heads_of(params, xs, n, position).swapaxes(0, 1).astype(cache[n].dtype), position, 1)
                for n in ("key", "value")}
