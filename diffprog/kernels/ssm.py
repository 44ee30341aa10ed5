"""The selective scan of `dp.SelectiveSSM`: a linear recurrence over time, read out."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .library import enabled, on_cpu, require
from .partition import batch_partitioned
from .products import batch_sum


def selective_scan(delta, A, B, C, u, h0):
    """y_t = h_t C_t with h_t = exp(Δ_t A) ⊗ h_{t−1} + (Δ_t ⊗ u_t) B_t from h_{−1} = h0:
    delta, u (..., T, I); A (I, N); B, C (..., T, N); h0 (..., I, N) → (y (..., T, I), h_{T−1}
    (..., I, N)), any batch axes in front. On the CPU in float32 the C++ kernels of ssm.cc
    (`kernel_selective`: a_t and b_t never stored, the states recomputed in the backward pass);
    on the CPU otherwise `written_selective`; on accelerators `parallel_selective`, a
    `jax.lax.associative_scan` of log T sequential depth; inside `disabled()` the definition
    `scan_selective`, one step at a time."""
    args = (delta, A, B, C, u, h0)
    if not enabled():
        return scan_selective(*args)
    return on_cpu(kernel_selective, _jax_selective, *args)


def _jax_selective(*args):
    return jax.lax.platform_dependent(*args, cpu=written_selective, default=parallel_selective)


def discretized(delta, A, B, u):
    """(a, b) with a_t = exp(Δ_t A), b_t = (Δ_t ⊗ u_t) B_t: (..., I, N) each for delta, u (..., I)
    and B (..., N)."""
    return jnp.exp(delta[..., None] * A), (delta * u)[..., None] * B[..., None, :]


def _read(h, c):
    """y = h c over the state axis: (..., I, N), (..., N) → (..., I), as a product and a sum
    (XLA:CPU runs the batched matrix-vector product of an einsum several times slower)."""
    return (h * c[..., None, :]).sum(-1)


def _time_first(*arrays):
    return [jnp.moveaxis(x, -2, 0) for x in arrays]


def scan_selective(delta, A, B, C, u, h0):
    """The definition of `selective_scan`: a `lax.scan` over t."""
    def step(h, inputs):
        delta_t, B_t, C_t, u_t = inputs
        a, b = discretized(delta_t, A, B_t, u_t)
        h = a * h + b
        return h, _read(h, C_t)
    h, y = jax.lax.scan(step, h0, _time_first(delta, B, C, u))
    return jnp.moveaxis(y, 0, -2), h


def parallel_selective(delta, A, B, C, u, h0):
    """`selective_scan` as an associative scan over the pairs (a_t, b_t):
    (a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂), a and b (T, ..., I, N) stored."""
    delta, B, C, u = _time_first(delta, B, C, u)
    a, b = discretized(delta, A, B, u)
    b = b.at[0].add(a[0] * h0)  # h_0 = a_0 h0 + b_0: the scan then starts from zero

    def combine(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return a1 * a2, a2 * b1 + b2
    _, h = jax.lax.associative_scan(combine, (a, b))
    return jnp.moveaxis(_read(h, C), 0, -2), h[-1]


def written_selective(delta, A, B, C, u, h0):
    """`selective_scan` with a and b (T, ..., I, N) stored and the scan's backward pass written
    out (`_written`): the CPU's path where the C++ kernels do not run (not float32, no compiler)."""
    delta, B, C, u = _time_first(delta, B, C, u)
    y, h = _written(*discretized(delta, A, B, u), C, h0)
    return jnp.moveaxis(y, 0, -2), h


@jax.custom_vjp
def _written(a, b, c, h0):
    """The scan over time-first a, b (T, ..., I, N), c (T, ..., N). Its backward pass is the
    reverse recurrence of the state's gradient,

        g_t = c_t ⊗ ∂y_t + a_{t+1} ⊗ g_{t+1},   ∂b_t = g_t,  ∂a_t = g_t ⊗ h_{t−1},  ∂c_t = Σ_i h_t ∂y_t,

    instead of autodiff's stacking of per-step residuals, which ran 4× slower on XLA:CPU."""
    return _written_forward(a, b, c, h0)[0]


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


_written.defvjp(_written_forward, _written_backward)


# -- the C++ kernels -------------------------------------------------------------------------

def _rows(x):
    """(..., P, Q) → (rows, P, Q): the batch axes as one (a single example is one row)."""
    return x.reshape((-1,) + x.shape[-2:])


@jax.custom_vjp
def kernel_selective(delta, A, B, C, u, h0):
    """`selective_scan` by the C++ kernels of ssm.cc (CPU, float32; `dp.kernels.available()`)."""
    return _kernel_forward(delta, A, B, C, u, h0)[0]


def _kernel_forward(delta, A, B, C, u, h0):
    require("selective_scan")
    y, h = _selective_forward_call(_rows(delta), A, _rows(B), _rows(C), _rows(u), _rows(h0))
    return (y.reshape(delta.shape), h.reshape(h0.shape)), (delta, A, B, C, u, h0)


def _kernel_backward(args, cotangents):
    delta, A, B, C, u, h0 = args
    dy, dh = cotangents
    delta_, B_, C_, u_, h0_, dy, dh = map(_rows, (delta, B, C, u, h0, dy, dh))
    d_delta, d_A, d_B, d_C, d_u, d_h0 = _selective_backward_call(delta_, A, B_, C_, u_, h0_, dy, dh)
    return (d_delta.reshape(delta.shape), batch_sum(d_A), d_B.reshape(B.shape), d_C.reshape(C.shape),
            d_u.reshape(u.shape), d_h0.reshape(h0.shape))


kernel_selective.defvjp(_kernel_forward, _kernel_backward)

_like = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)


@batch_partitioned("b t i, i n, b t n, b t n, b t i, b i n -> b t i, b i n", batch="b")
def _selective_forward_call(delta, A, B, C, u, h0):
    return tuple(jax.ffi.ffi_call("diffprog_selective_forward", (_like(delta), _like(h0)))(delta, A, B, C, u, h0))


@batch_partitioned("b t i, i n, b t n, b t n, b t i, b i n, b t i, b i n -> b t i, b i n, b t n, b t n, b t i, b i n",
                   batch="b")
def _selective_backward_call(delta, A, B, C, u, h0, dy, dh):
    return tuple(jax.ffi.ffi_call("diffprog_selective_backward", tuple(map(_like, (delta, h0, B, C, u, h0))))(
        delta, A, B, C, u, h0, dy, dh))
