"""The recurrent layers' batch loop and its backends.

`recurrence(layer, weights, xs, carry, valid)` runs `layer.scan` — the definition, one
`jax.lax.scan` over time of `layer.step` — on a time-major batch, xs (T, B, d), with one of two
backends, chosen here:

- the LSTM on the CPU in float32 (`lstm_recurrence`): the steps forward and backward are the
  C++ kernels of lstm.cc, the products over all steps around them XLA's, but for the weight
  gradients (MKL's, `summed_products`, on the CPU wherever MKL is installed); inside
  `autocast(bfloat16)` the kernels' per-step products h W_h and ∂z W_hᵀ and the products over
  all steps run in bfloat16 into float32 where the CPU has AMX or AVX512-BF16, as PyTorch's
  autocast LSTM: the steps' by MKL where it runs at the CPU's width (`library.mkl_at_full_width`),
  else by cpu.h's micro-kernel on AVX512-BF16's pairs (AMD's AVX-512 CPUs: 1.75× its float32
  rate, MKL's bfloat16 there half of its float32's); the others by `gemm`;
- everywhere else (`scan_recurrence`): the scan, with its backward pass written out — the
  reverse scan carries only the state gradients, and the weight gradient Σ_t h_{t-1}ᵀ ∂gh_t is
  one matrix product over all examples and steps after it, instead of T small ones inside it.

In bfloat16 on the CPU both run in float32, their results rounded to bfloat16 (`on_cpu`), with
bfloat16 hardware or without.

Both take and return the same things: `weights` is the layer's `Weights(w_x, w_h, b_x, b_h)`
(with w_x None, xs are the input projections x W_x (T, B, G) already), `carry` the initial
state dict of (B, hidden) arrays, `valid` (T, B) bool or None (False: padding, where the state is
kept and the output is 0). They return (final carry, outs (T, B, ...)).
"""
from __future__ import annotations

from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from .library import in_float32_on_cpu, on_cpu, require
from .products import bfloat16_products, gemm, step_product, summed_products
from .partition import batch_partitioned


@jax.tree_util.register_pytree_node_class
class TableRows:
    """Time-major inputs xws (T, B, G) given as rows of a table: xws[t, b] = table[ids[t, b]],
    by `lookup(table, ids)` (the embedding's: a row of NaN for an id outside the table) — the
    projections of a token embedding's vectors, (E W_x)[ids] (`dp.fusion`). The LSTM's kernel
    reads each row from the table as a step needs it; every other path `materialize`s them."""

    def __init__(self, table, ids, lookup):
        self.table, self.ids, self.lookup = table, ids, lookup

    def tree_flatten(self):
        return (self.table, self.ids), self.lookup

    @classmethod
    def tree_unflatten(cls, lookup, children):
        return cls(*children, lookup)

    @property
    def shape(self):
        return self.ids.shape + self.table.shape[1:]

    def materialize(self):
        return self.lookup(self.table, self.ids)

    def cotangent(self, d_xws):
        """The cotangent of these rows' leaves given that of xws: the lookup's gradient for the
        table (a sum over the ids), zero (float0) for the ids."""
        _, vjp = jax.vjp(lambda table: self.lookup(table, self.ids), self.table)
        return TableRows(*vjp(d_xws), np.zeros(self.ids.shape, jax.dtypes.float0), self.lookup)


def recurrence(layer, weights, xs, carry, valid):
    """The batch loop of `layer`; the backend is chosen here (see the module docstring). xs may
    be `TableRows` when weights.w_x is None."""
    args = (weights, xs, carry, valid)
    scan = lambda weights, xs, *rest: scan_recurrence(layer, weights, _materialized(xs), *rest)
    if getattr(layer, "kernel", None) == "lstm":
        # bfloat16_products() read when the kernel is traced: inside on_cpu's autocast on bfloat16 args
        return on_cpu(lambda *args: lstm_recurrence(layer, bfloat16_products(), *args), scan, *args)
    return in_float32_on_cpu(scan, *args)


def _materialized(xs):
    return xs.materialize() if isinstance(xs, TableRows) else xs


def _projected(w_x, xs, bfloat16=False):
    """x W_x (T, B, G) for time-major xs; with `bfloat16`, by `gemm`'s bfloat16 product on batch-major
    rows (see `_rows`)."""
    if w_x is None:
        return xs
    return _by_rows(xs, w_x) if bfloat16 else xs @ w_x


def _rows(x):
    """(T, B, n) → (B·T, n), batch-major: under a batch-sharded mesh the rows stay sharded (a
    time-major merge would gather the batch), and the transpose fuses with the rounding to
    bfloat16 in front of MKL's product."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, x.shape[-1])


def _by_rows(xs, w, transpose_w=False):
    """xs (T, B, k) times w (k, n), or wᵀ with `transpose_w`, → (T, B, n): `gemm`'s bfloat16 product on
    `_rows(xs)`."""
    steps, batch = xs.shape[:2]
    product = gemm(_rows(xs), w, transpose_b=transpose_w, precision=jnp.bfloat16)
    return jnp.swapaxes(product.reshape(batch, steps, -1), 0, 1)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan_recurrence(layer, weights, xs, carry, valid):
    """`layer.scan` on time-major xs, input projection included, with the backward pass below."""
    return layer.scan(weights, _projected(weights.w_x, xs), carry, valid)


def _scan_fwd(layer, weights, xs, carry, valid):
    xws = _projected(weights.w_x, xs)
    final, (outs, ghs, carries) = layer.scan(weights, xws, carry, valid, residuals=True)
    return (final, outs), (weights, xs, xws, ghs, carries, valid)


def _scan_bwd(layer, residuals, cotangents):
    """Reverse scan: ∂carry_{t-1} = ∂activate/∂carry · ∂carry_t + (∂gh_t) W_hᵀ; then the products
    of `_projection_gradients`."""
    weights, xs, xws, ghs, carries, valid = residuals
    d_final, d_outs = cotangents
    w_h_t = weights.w_h.T

    def step(d_carry, inputs):
        xw, gh, carry, v, d_out = inputs
        _, vjp = jax.vjp(lambda gx, gh, carry: layer.update(gx, gh, carry, v), xw + weights.b_x, gh, carry)
        d_gx, d_gh, d_prev = vjp((d_carry, d_out))
        # where gx and gh only meet as gx + gh, autodiff hands back one object for both: stack it once
        return {**d_prev, "h": d_prev["h"] + step_product(d_gh, w_h_t)}, (d_gh if d_gx is d_gh else (d_gx, d_gh))

    d_carry, d_gs = jax.lax.scan(step, d_final, (xws, ghs, carries, valid, d_outs),
                                 reverse=True, unroll=layer.unroll)
    d_gxs, d_ghs = d_gs if isinstance(d_gs, tuple) else (d_gs, d_gs)
    d_weights, d_xs = _projection_gradients(weights, xs, carries["h"], d_gxs, d_ghs)
    return d_weights, d_xs, d_carry, None


def _projection_gradients(weights, xs, h_prev, d_gxs, d_ghs, bfloat16=False):
    """The gradients of gx_t = x_t W_x + b_x and gh_t = h_{t-1} W_h + b_h given ∂gx, ∂gh (T, B, G),
    each one product over all T·B rows: ∂W_x = Σ x_tᵀ ∂gx_t, ∂b_x, ∂W_h = Σ h_{t-1}ᵀ ∂gh_t, ∂b_h,
    and ∂x_t = ∂gx_t W_xᵀ — the sums by `summed_products` on the time-major rows as they are, with
    `bfloat16` all by `gemm`'s bfloat16 products on batch-major rows. (Written out rather than left to
    autodiff of `xs @ w_x`, whose transpose XLA:CPU ran as a slower dot on a transposed copy of
    ∂gx.) Returns (∂weights, ∂xs)."""
    w_x = weights.w_x
    if bfloat16:
        summed = lambda a, b: gemm(_rows(a), _rows(b), transpose_a=True, precision=jnp.bfloat16)
        d_w_x, d_xs = (None, d_gxs) if w_x is None else (summed(xs, d_gxs), _by_rows(d_gxs, w_x, transpose_w=True))
        d_w_h = summed(h_prev, d_ghs)
    else:
        d_w_x, d_xs = (None, d_gxs) if w_x is None else (summed_products(xs, d_gxs), d_gxs @ w_x.T)
        d_w_h = summed_products(h_prev, d_ghs)
    return type(weights)(d_w_x, d_w_h, d_gxs.sum((0, 1)), d_ghs.sum((0, 1))), d_xs


scan_recurrence.defvjp(_scan_fwd, _scan_bwd)


# -- the LSTM's C++ kernels ------------------------------------------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def lstm_recurrence(layer, bfloat16, weights, xs, carry, valid):
    """`scan_recurrence` for the LSTM by the C++ kernels (CPU, float32; `dp.kernels.available()`):
    its steps forward and backward are `lstm_forward` / `lstm_backward`, the products over all
    steps those of `_projection_gradients` — with `bfloat16`, all of them bfloat16 products into float32."""
    return _lstm_fwd(layer, bfloat16, weights, xs, carry, valid)[0]


def _lstm_fwd(layer, bfloat16, weights, xs, carry, valid):
    steps, batch = xs.shape[:2]
    lengths = jnp.full((batch,), steps, jnp.int32) if valid is None else valid.sum(0, dtype=jnp.int32)
    hs, h, c, gates, cs = lstm_forward(weights, _projected(weights.w_x, xs, bfloat16), carry, lengths, bfloat16)
    return ({"h": h, "c": c}, {"h": hs}), (weights, xs, carry, lengths, hs, gates, cs)


def _lstm_bwd(layer, bfloat16, residuals, cotangents):
    weights, xs, carry, lengths, hs, gates, cs = residuals
    d_final, d_outs = cotangents
    d_z, d_h0, d_c0 = lstm_backward(weights, gates, cs, carry, lengths, d_outs["h"], d_final, bfloat16)
    h_prev = jnp.concatenate([carry["h"][None], hs[:-1]])  # past a length h_prev is 0, but so is ∂z there
    d_weights, d_xs = _projection_gradients(weights, xs, h_prev, d_z, d_z, bfloat16)
    return d_weights, xs.cotangent(d_xs) if isinstance(xs, TableRows) else d_xs, {"h": d_h0, "c": d_c0}, None


lstm_recurrence.defvjp(_lstm_fwd, _lstm_bwd)


def lstm_forward(weights, xw, carry, lengths, bfloat16=False):
    """The LSTM's T steps (see lstm.cc) on time-major float32 inputs: xw = x W_x (T, B, 4H) (or
    `TableRows`, each row read from the table by the kernel), the
    weights' w_h (H, 4H) and b_x + b_h (4H,), the carry's h and c (B, H), lengths (B,) int32
    (steps at and past an example's length keep its state and output 0); with `bfloat16`, each
    step's h W_h rounds h and W_h to bfloat16 (MKL's bfloat16 GEMM where Python handed MKL over,
    else the micro-kernel's AVX512-BF16 pairs; float32 on a CPU without them). Returns
    hs (T, B, H), the final h and c (B, H), and for `lstm_backward` the gate activations
    (T, B, 4H) and cell states cs (T, B, H). Not differentiable by itself: `lstm_recurrence` is."""
    steps, batch, gates = xw.shape
    hidden = gates // 4
    bias = weights.b_x + weights.b_h
    expected = {"bias": (gates,), "w_h": (hidden, gates), "h": (batch, hidden), "c": (batch, hidden),
                "lengths": (batch,)}
    got = {"bias": bias.shape, "w_h": weights.w_h.shape, "h": carry["h"].shape, "c": carry["c"].shape,
           "lengths": lengths.shape}
    if gates % 4 or got != expected:
        raise ValueError(f"lstm_forward: for xw {xw.shape} (T, B, 4H) expected {expected}, got {got}")
    require("lstm_forward")
    state = (bias, weights.w_h, carry["h"], carry["c"], lengths.astype(jnp.int32))
    if isinstance(xw, TableRows):
        return _lstm_forward_from_table_call(bool(bfloat16))(xw.table, xw.ids.astype(jnp.int32), *state)
    return _lstm_forward_call(bool(bfloat16))(xw, *state)


def lstm_backward(weights, gates, cs, carry, lengths, d_hs, d_final, bfloat16=False):
    """The reverse of `lstm_forward`'s steps: from the cotangents of hs (T, B, H) and of the final
    carry, the gradient ∂z of every step's pre-activations (T, B, 4H) and those of h0 and c0
    (each step's ∂z W_hᵀ in bfloat16 with `bfloat16`)."""
    require("lstm_backward")
    return _lstm_backward_call(bool(bfloat16))(weights.w_h, gates, cs, carry["c"], lengths.astype(jnp.int32), d_hs,
                                               d_final["h"], d_final["c"])


@cache
def _lstm_forward_call(bfloat16):
    @batch_partitioned("t b g, g, h g, b h, b h, b -> t b h, b h, b h, t b g, t b h", batch="b")
    def call(xw, bias, w_h, h0, c0, lengths):
        steps, batch, _ = xw.shape
        like = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        state = like(batch, w_h.shape[0])
        return tuple(jax.ffi.ffi_call("diffprog_lstm_forward", (like(steps, batch, w_h.shape[0]), state, state,
                                                                like(*xw.shape), like(steps, batch, w_h.shape[0])))(
            xw, bias, w_h, h0, c0, lengths, bfloat16=bfloat16))
    return call


@cache
def _lstm_forward_from_table_call(bfloat16):
    @batch_partitioned("v g, t b, g, h g, b h, b h, b -> t b h, b h, b h, t b g, t b h", batch="b")
    def call(table, ids, bias, w_h, h0, c0, lengths):
        (steps, batch), hidden = ids.shape, w_h.shape[0]
        like = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        return tuple(jax.ffi.ffi_call("diffprog_lstm_forward_from_table", (
            like(steps, batch, hidden), like(batch, hidden), like(batch, hidden), like(steps, batch, 4 * hidden),
            like(steps, batch, hidden)))(table, ids, bias, w_h, h0, c0, lengths, bfloat16=bfloat16))
    return call


@cache
def _lstm_backward_call(bfloat16):
    @batch_partitioned("h g, t b g, t b h, b h, b, t b h, b h, b h -> t b g, b h, b h", batch="b")
    def call(w_h, gates, cs, c0, lengths, d_hs, d_h, d_c):
        state = jax.ShapeDtypeStruct(c0.shape, jnp.float32)
        return tuple(jax.ffi.ffi_call("diffprog_lstm_backward", (jax.ShapeDtypeStruct(gates.shape, jnp.float32), state, state))(
            w_h, gates, cs, c0, lengths, d_hs, d_h, d_c, bfloat16=bfloat16))
    return call
