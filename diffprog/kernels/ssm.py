"""The selective scan of `dp.SelectiveSSM`: a linear recurrence over time, read out."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .library import enabled



def selective_scan(a, b, c, h0):
    """y_t = h_t c_t with h_t = a_t ⊗ h_{t−1} + b_t from h_{−1} = h0: a, b (T, ..., I, N),
    c (T, ..., N), h0 (..., I, N) → (y (T, ..., I), h_{T−1}) (any batch axes after time). On accelerators `parallel_selective`, a
    `jax.lax.associative_scan` of log T sequential depth; on the CPU, and inside `disabled()`,
    the definition `scan_selective`, one step at a time: there the parallel form does ~log T
    times the work and its backward pass ran 6× slower (benchmarks/README.md)."""
    if not enabled():
        return scan_selective(a, b, c, h0)
    return jax.lax.platform_dependent(a, b, c, h0, cpu=written_selective, default=parallel_selective)


def parallel_selective(a, b, c, h0):
    """`selective_scan` as an associative scan over the pairs (a_t, b_t):
    (a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂)."""
    b = b.at[0].add(a[0] * h0)  # h_0 = a_0 h0 + b_0: the scan then starts from zero

    def combine(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return a1 * a2, a2 * b1 + b2
    _, h = jax.lax.associative_scan(combine, (a, b))
    return _read(h, c), h[-1]


def _read(h, c):
    """y = h c over the state axis: (..., I, N), (..., N) → (..., I), as a product and a sum
    (XLA:CPU runs the batched matrix-vector product of an einsum several times slower)."""
    return (h * c[..., None, :]).sum(-1)


def scan_selective(a, b, c, h0):
    """The definition of `selective_scan`: a `lax.scan` over t."""
    def step(h, abc):
        a_t, b_t, c_t = abc
        h = a_t * h + b_t
        return h, _read(h, c_t)
    h, y = jax.lax.scan(step, h0, (a, b, c))
    return y, h


@jax.custom_vjp
def written_selective(a, b, c, h0):
    """`scan_selective` with its backward pass written out (the CPU's path): the forward scan
    keeps every h_t, the backward pass is the reverse recurrence of the state's gradient,

        g_t = c_t ⊗ ∂y_t + a_{t+1} ⊗ g_{t+1},   ∂b_t = g_t,  ∂a_t = g_t ⊗ h_{t−1},  ∂c_t = Σ_i h_t ∂y_t,

    instead of autodiff's stacking of per-step residuals, which ran 4× slower on XLA:CPU."""
    return scan_selective(a, b, c, h0)


def _written_forward(a, b, c, h0):
    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h
    last, hs = jax.lax.scan(step, h0, (a, b))
    return (_read(hs, c), last), (a, c, h0, hs)


def _written_backward(residuals, cotangents):
    a, c, h0, hs = residuals
    dy, dlast = cotangents

    def step(later, inputs):  # later: the gradient reaching h_t from the steps after t (and ∂h_last)
        dy_t, c_t, a_t = inputs
        g = dy_t[..., None] * c_t[..., None, :] + later
        return a_t * g, g
    dh0, g = jax.lax.scan(step, dlast, (dy, c, a), reverse=True)
    before = jnp.concatenate([h0[None], hs[:-1]])  # h_{t−1}
    return g * before, g, (hs * dy[..., None]).sum(-2), dh0


written_selective.defvjp(_written_forward, _written_backward)
