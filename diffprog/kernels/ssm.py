"""The selective scan of `dp.SelectiveSSM`: a linear recurrence over time, read out."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .library import enabled


def selective_scan(a, b, c, h0):
    """y_t = h_t c_t with h_t = a_t ⊗ h_{t−1} + b_t from h_{−1} = h0: a, b (T, I, N), c (T, N),
    h0 (I, N) → (y (T, I), h_{T−1}). `jax.lax.associative_scan` over the pairs (a_t, b_t) —
    log T sequential depth, every platform — unless inside `disabled()`; the definition is
    `scan_selective`, one step at a time."""
    if not enabled():
        return scan_selective(a, b, c, h0)
    b = b.at[0].add(a[0] * h0)  # h_0 = a_0 h0 + b_0: the scan then starts from zero

    def combine(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return a1 * a2, a2 * b1 + b2
    _, h = jax.lax.associative_scan(combine, (a, b))
    return jnp.einsum("tin,tn->ti", h, c), h[-1]


def scan_selective(a, b, c, h0):
    """The definition of `selective_scan`: a `lax.scan` over t."""
    def step(h, abc):
        a_t, b_t, c_t = abc
        h = a_t * h + b_t
        return h, h @ c_t
    h, y = jax.lax.scan(step, h0, (a, b, c))
    return y, h
