"""The selective state-space layer of Mamba (Gu & Dao, 2023): a recurrent layer whose state
update depends on the input, computed for all steps at once by a parallel scan."""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .basic import affine, lecun_normal
from .core import Layer, LayerError, example_spec, layerclass
from .sequence import check_lengths, check_sequence, valid_steps


@layerclass
class SelectiveSSM(Layer):
    """SelectiveSSM : SequenceModel, (T, d) → (T, d) — Mamba's mixer. With I = expand·d inner
    channels, N = `state`, R = `dt_rank` (⌈d/16⌉ unless given) and K = `conv`:

        (u, z)    = x W_in                                   u, z (T, I)
        u         = silu(causal depthwise conv_K(u) + b_conv)
        (δ, B, C) = u W_x                                    δ (T, R); B, C (T, N)
        Δ         = softplus(δ W_Δ + b_Δ)                    (T, I), input-dependent step sizes
        A         = −exp(A_log)                              (I, N)
        h_t       = exp(Δ_t A) ⊗ h_{t−1} + (Δ_t ⊗ u_t) B_t    (I, N), h_{−1} = 0
        y_t       = h_t C_t + D ⊗ u_t,   out_t = (y_t ⊗ silu(z_t)) W_out

    The recurrence is linear in h, so `dp.kernels.selective_scan` runs it as a parallel
    (associative) scan; its definition, a `lax.scan` over t, is the reference it is tested
    against (`dp.kernels.disabled()`). Decoding carries the last K − 1 inputs of the convolution
    and h, and a chunk of P steps equals P single steps.
    Side input: `lengths=` (outputs past it are 0; the layer is causal, so the valid steps never
    read the padding). Params (Hugging Face's MambaMixer, transposed): in_proj {weight (d, 2I)},
    conv {kernel (K, I), bias (I,)}, x_proj {weight (I, R + 2N)}, dt_proj {weight (R, I),
    bias (I,)}, A_log (I, N), D (I,), out_proj {weight (I, d)}; initialised as Mamba's
    (A_log = log 1..N, D = 1, Δ at start log-uniform in [0.001, 0.1]).
    """

    state: int = 16
    expand: int = 2
    conv: int = 4
    dt_rank: Optional[int] = None
    side_inputs = frozenset({"lengths"})

    def __post_init__(self):
        super().__post_init__()
        if self.dt_rank is not None and not (isinstance(self.dt_rank, int) and self.dt_rank >= 1):
            raise LayerError(f"SelectiveSSM: dt_rank must be a positive int (or None: ⌈d/16⌉), got {self.dt_rank!r}")

    def rank(self, d: int) -> int:
        return self.dt_rank or math.ceil(d / 16)

    def init_params(self, key, spec, **side):
        check_sequence(self, spec)
        d = spec.shape[-1]
        inner, rank = self.expand * d, self.rank(d)
        k = jax.random.split(key, 6)
        dt = jnp.exp(jax.random.uniform(k[4], (inner,), jnp.float32, np.log(1e-3), np.log(1e-1)))
        bound = rank ** -0.5
        return {"in_proj": {"weight": lecun_normal(k[0], (d, 2 * inner), jnp.float32)},
                "conv": {"kernel": jax.random.uniform(k[1], (self.conv, inner), jnp.float32, -1, 1) / np.sqrt(self.conv),
                         "bias": jnp.zeros((inner,), jnp.float32)},
                "x_proj": {"weight": lecun_normal(k[2], (inner, rank + 2 * self.state), jnp.float32)},
                "dt_proj": {"weight": jax.random.uniform(k[3], (rank, inner), jnp.float32, -bound, bound),
                            "bias": dt + jnp.log(-jnp.expm1(-dt))},  # softplus⁻¹(Δ)
                "A_log": jnp.log(jnp.broadcast_to(jnp.arange(1, self.state + 1, dtype=jnp.float32), (inner, self.state))),
                "D": jnp.ones((inner,), jnp.float32),
                "out_proj": {"weight": lecun_normal(k[5], (inner, d), jnp.float32)}}

    def forward(self, params, xs, *, key=None, lengths=None):
        steps = check_sequence(self, xs, params["in_proj"]["weight"].shape[0])
        lengths = check_lengths(self, lengths, steps)
        ys, _ = self.mix(params, xs, self.init_cache(params, 0, xs.dtype))
        return ys if lengths is None else jnp.where(valid_steps(steps, lengths)[:, None], ys, 0)

    def forward_batch(self, params, xs, *, key=None, lengths=None):
        """(B, T, d) → (B, T, d) as one array: the projections over all B·T positions, one scan
        over T of (B, I, N) states (vmap would take B weight gradients and sum them)."""
        steps = check_sequence(self, example_spec(xs), params["in_proj"]["weight"].shape[0])
        lengths = check_lengths(self, lengths, steps, batch=xs.shape[0])
        ys, _ = self.mix(params, xs, self.init_cache(params, 0, xs.dtype, batch=xs.shape[:1]))
        return ys if lengths is None else jnp.where((jnp.arange(steps) < lengths[:, None])[..., None], ys, 0)

    def mix(self, params, xs, cache):
        """The equations above for xs (..., P, d), continuing from `cache` {"conv": the K − 1
        inputs of the convolution before xs, "state": h}: (out (..., P, d), the cache after xs).
        In float32 on bfloat16 args on the CPU (`kernels.in_float32_on_cpu`)."""
        return kernels.in_float32_on_cpu(self._equations, params, xs, cache)

    def _equations(self, params, xs, cache):
        u, z = jnp.split(affine(params["in_proj"], xs), 2, -1)
        window = jnp.concatenate([cache["conv"].astype(u.dtype), u], -2)  # (..., K − 1 + P, I)
        kernel, steps = params["conv"]["kernel"], xs.shape[-2]
        u = jax.nn.silu(sum(kernel[j] * window[..., j:j + steps, :] for j in range(self.conv)) + params["conv"]["bias"])
        rank = params["dt_proj"]["weight"].shape[0]
        delta, b, c = jnp.split(affine(params["x_proj"], u), [rank, rank + self.state], -1)
        delta = jax.nn.softplus(affine(params["dt_proj"], delta))  # (..., P, I)
        y, h = kernels.selective_scan(delta, -jnp.exp(params["A_log"]).astype(delta.dtype), b, c, u,
                                      cache["state"].astype(delta.dtype))
        out = affine(params["out_proj"], (y + params["D"] * u) * jax.nn.silu(z))
        return out, {"conv": window[..., window.shape[-2] - (self.conv - 1):, :], "state": h}

    def init_cache(self, params, max_len, dtype=jnp.float32, batch=(), **side):
        """The K − 1 convolution inputs before the first step (0) and h_{−1} = 0 (for `batch` rows)."""
        inner = params["D"].shape[0]
        return {"conv": jnp.zeros(batch + (self.conv - 1, inner), dtype),
                "state": jnp.zeros(batch + (inner, self.state), jnp.float32)}

    def decode(self, params, xs, cache, position):
        return self.mix(params, xs, cache)
