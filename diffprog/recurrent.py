"""Recurrent sequence models: a pure cell per layer, one `jax.lax.scan` loop for all of them.

SequenceModel : (T, d) → (T, hidden). A layer defines its weights and its activation,

    gx_t = x_t W_x + b_x,   gh_t = h_{t-1} W_h + b_h      (all gates at once: G = gates · hidden)
    activate(gx_t, gh_t, carry) -> (carry, out_t)         carry: {"h"} (LSTM: {"h", "c"})

and `cell(params, carry, x_t)` is one step. The loop computes x W_x for every step in one matrix
product, then scans over time (h_{t-1} W_h, the biases and `activate` per step). On a batch (`apply_batch`, `dp.batched`) the
loop runs on (B, hidden) states, and its backward pass is written out (`_recurrence`): the
reverse scan only carries the state gradients, and the weight gradient Σ_t h_{t-1}ᵀ ∂gh_t is one
matrix product over all examples and steps after it, instead of T small ones inside the loop.
Right after a token embedding (`LSTM(h) @ EmbedToken(vocab, d)` on a batch) the input projection
is a lookup in the projected table, x_t W_x = (E W_x)[id_t] (`apply_batch_embedded`).
On the CPU the LSTM's batch loop, forward and backward, is a C++ kernel (`dp.kernels`), the
products over all steps around it staying XLA's (`_lstm_kernel`).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .basic import glorot
from .core import Layer, LayerError, example_spec, layerclass
from .sequence import check_lengths, check_sequence, valid_steps

orthogonal = jax.nn.initializers.orthogonal()


def _gate_params(key, d, hidden, bias=0.0):
    """Weights of one gate: w_x (d, hidden), w_h (hidden, hidden), bias (hidden,)."""
    kx, kh = jax.random.split(key)
    return {"w_x": glorot(kx, (d, hidden), jnp.float32),
            "w_h": orthogonal(kh, (hidden, hidden), jnp.float32),
            "bias": jnp.full((hidden,), bias, jnp.float32)}


def _fused(params, gates):
    """The gates' weights side by side: w_x (d, G), w_h (hidden, G), b_x (G,), b_h = 0."""
    w_x, w_h, b_x = (jnp.concatenate([params[g][k] for g in gates], -1) for k in ("w_x", "w_h", "bias"))
    return w_x, w_h, b_x, jnp.zeros_like(b_x)


def _sigmoid(z):
    """σ(z) = (1 + tanh(z/2)) / 2: on XLA:CPU a tanh pass is ~2× faster than the logistic."""
    return (1 + jnp.tanh(z / 2)) / 2


class Recurrent(Layer):
    """The loop shared by SimpleRNN, LSTM and GRU. A subclass defines `cell_params(key, d)`,
    `weights(params) -> (w_x (d, G), w_h (hidden, G), b_x (G,), b_h (G,))` and
    `activate(gx, gh, carry) -> (carry, out)` (elementwise over leading axes; out["h"] is y_t).

    Side inputs: `lengths=` (valid steps of this example: outputs past it are 0 and the final
    state is the state after step `lengths`), `initial_state=` (a carry dict; default zeros).
    Returns ys (T, hidden); with `return_state=True`, (ys, final_carry).
    `unroll` is passed to `jax.lax.scan`.
    """

    side_inputs = frozenset({"lengths", "initial_state"})

    def init_params(self, key, spec, **side):
        check_sequence(self, spec)
        return self.cell_params(key, spec.shape[-1])

    def initial_carry(self, dtype, batch=()):
        return {"h": jnp.zeros(batch + (self.hidden,), dtype)}

    def cell(self, params, carry, x_t):
        """One step: (params, carry, x_t (d,)) -> (carry, out_t); out_t["h"] is y_t."""
        w_x, w_h, b_x, b_h = self.weights(params)
        return self.activate(x_t @ w_x + b_x, carry["h"] @ w_h + b_h, carry)

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return self.initial_carry(dtype)

    def decode(self, params, x_t, cache, position):
        carry, out = self.cell(params, cache, x_t)
        return out["h"], carry

    def forward(self, params, xs, *, key=None, lengths=None, initial_state=None):
        w_x, w_h, b_x, b_h = self.weights(params)
        steps = check_sequence(self, xs, w_x.shape[0])
        lengths = check_lengths(self, lengths, steps)
        carry = self._initial(initial_state, xs.dtype, ())
        valid = None if lengths is None else valid_steps(steps, lengths)
        carry, outs = self._loop(b_x, w_h, b_h, xs @ w_x, carry, valid)
        return self._result(outs, carry)

    def forward_batch(self, params, xs, *, key=None, lengths=None, initial_state=None):
        """(B, T, d) → (B, T, hidden): the time-major loop of `_recurrence` over (B, hidden)."""
        weights = self.weights(params)
        steps = check_sequence(self, example_spec(xs), weights[0].shape[0])
        return self._batch(weights, steps, jnp.swapaxes(xs, 0, 1), lengths, initial_state)

    def apply_batch_embedded(self, params, embed, embed_params, ids, *, key=None, lengths=None,
                             initial_state=None):
        """On token ids (B, T) embedded by `embed` (table E, vocab × d): the input projection is
        x_t W_x = (E W_x)[id_t], one (vocab × d)·(d × G) product instead of (B·T × d)·(d × G),
        and its gradient a scatter-add over the ids. Used when vocab ≤ B·T; otherwise the
        vectors are looked up and projected as usual."""
        table = embed_params["table"]
        if jnp.ndim(ids) != 2 or table.shape[0] > np.size(ids):
            return super().apply_batch_embedded(params, embed, embed_params, ids, lengths=lengths,
                                                initial_state=initial_state)
        weights = self.weights(params)
        w_x = weights[0]
        steps = check_sequence(self, jax.ShapeDtypeStruct(ids.shape[1:] + table.shape[1:], table.dtype),
                               w_x.shape[0])
        projected = dataclasses.replace(embed, dim=w_x.shape[1]).apply_batch({"table": table @ w_x}, ids.T)
        return self._batch(weights, steps, projected, lengths, initial_state, projected=True)

    def _batch(self, weights, steps, inputs, lengths, initial_state, projected=False):
        """The batch loop on time-major `inputs` (T, B, d), or on their projections x W_x
        (T, B, G) when `projected`; the caller has checked one example's input (T, d)."""
        w_x, w_h, b_x, b_h = weights
        batch = inputs.shape[1]
        lengths = check_lengths(self, lengths, steps, batch=batch)
        carry = self._initial(initial_state, inputs.dtype, (batch,))
        valid = None if lengths is None else jnp.arange(steps)[:, None] < lengths
        carry, outs = self._recurrence(None if projected else w_x, b_x, w_h, b_h, inputs, carry, valid)
        return self._result(jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), outs), carry)

    def _recurrence(self, *args):
        """The batch loop with its written-out backward pass (`_recurrence`)."""
        return _recurrence(self, *args)

    def _initial(self, initial_state, dtype, batch):
        expected = self.initial_carry(dtype, batch)
        if initial_state is None:
            return expected
        if jax.tree.map(jnp.shape, initial_state) != jax.tree.map(jnp.shape, expected):
            raise LayerError(f"{self!r}: expected initial_state shaped {jax.tree.map(jnp.shape, expected)}, "
                             f"got {jax.tree.map(jnp.shape, initial_state)}")
        return initial_state

    def _result(self, outs, carry):
        ys = outs.pop("h")
        result = (ys,) + ((outs,) if outs else ()) + ((carry,) if self.return_state else ())
        return result[0] if len(result) == 1 else result

    def _update(self, gx, gh, carry, valid):
        """`activate`; where `valid` is False (padding) the carry is kept and the output is 0."""
        new, out = self.activate(gx, gh, carry)
        if valid is None:
            return new, out
        keep = jnp.expand_dims(valid, -1)
        return (jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, carry),
                jax.tree.map(lambda v: jnp.where(keep, v, 0), out))

    def _loop(self, b_x, w_h, b_h, xws, carry, valid, residuals=False):
        """Scan over axis 0 of xws = x W_x (the bias b_x is added inside the loop, where it
        fuses with the activation); returns (final carry, outs), and with `residuals` also
        every step's gh_t and incoming carry (for `_recurrence`'s backward pass)."""
        def step(carry, inputs):
            xw, v = inputs
            gx, gh = xw + b_x, carry["h"] @ w_h + b_h
            new, out = self._update(gx, gh, carry, v)
            return new, ((out, gh, carry) if residuals else out)
        return jax.lax.scan(step, carry, (xws, valid), unroll=self.unroll)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(layer, w_x, b_x, w_h, b_h, xs, carry, valid):
    """layer._loop on time-major xs (T, B, d), input projection included, with the backward
    pass below; with w_x None, xs are the projections x W_x (T, B, G) already."""
    return layer._loop(b_x, w_h, b_h, _projected(w_x, xs), carry, valid)


def _projected(w_x, xs):
    return xs if w_x is None else xs @ w_x


def _recurrence_fwd(layer, w_x, b_x, w_h, b_h, xs, carry, valid):
    xws = _projected(w_x, xs)
    final, (outs, ghs, carries) = layer._loop(b_x, w_h, b_h, xws, carry, valid, residuals=True)
    return (final, outs), (w_x, b_x, w_h, xs, xws, ghs, carries, valid)


def _recurrence_bwd(layer, residuals, cotangents):
    """Reverse scan: ∂carry_{t-1} = ∂activate/∂carry · ∂carry_t + (∂gh_t) W_hᵀ; then the products
    of `_projection_gradients`."""
    w_x, b_x, w_h, xs, xws, ghs, carries, valid = residuals
    d_final, d_outs = cotangents
    w_h_t = w_h.T

    def step(d_carry, inputs):
        xw, gh, carry, v, d_out = inputs
        _, vjp = jax.vjp(lambda gx, gh, carry: layer._update(gx, gh, carry, v), xw + b_x, gh, carry)
        d_gx, d_gh, d_prev = vjp((d_carry, d_out))
        # where gx and gh only meet as gx + gh, autodiff hands back one object for both: stack it once
        return {**d_prev, "h": d_prev["h"] + d_gh @ w_h_t}, (d_gh if d_gx is d_gh else (d_gx, d_gh))

    d_carry, d_gs = jax.lax.scan(step, d_final, (xws, ghs, carries, valid, d_outs),
                                 reverse=True, unroll=layer.unroll)
    d_gxs, d_ghs = d_gs if isinstance(d_gs, tuple) else (d_gs, d_gs)
    return _projection_gradients(w_x, xs, carries["h"], d_gxs, d_ghs) + (d_carry, None)


def _projection_gradients(w_x, xs, h_prev, d_gxs, d_ghs):
    """The gradients of gx_t = x_t W_x + b_x and gh_t = h_{t-1} W_h + b_h given ∂gx, ∂gh (T, B, G),
    each one product over all T·B rows: ∂W_x = Σ x_tᵀ ∂gx_t, ∂b_x, ∂W_h = Σ h_{t-1}ᵀ ∂gh_t, ∂b_h,
    and ∂x_t = ∂gx_t W_xᵀ. (Written out rather than left to autodiff of `xs @ w_x`, whose
    transpose XLA:CPU ran as a slower dot on a transposed copy of ∂gx.)"""
    over = ((0, 1), (0, 1))
    d_w_x, d_xs = (None, d_gxs) if w_x is None else (jnp.tensordot(xs, d_gxs, over), d_gxs @ w_x.T)
    return d_w_x, d_gxs.sum((0, 1)), jnp.tensordot(h_prev, d_ghs, over), d_ghs.sum((0, 1)), d_xs


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm_kernel(layer, w_x, b_x, w_h, b_h, xs, carry, valid):
    """`_recurrence` for the LSTM on the CPU: its steps forward and backward are the C++ kernels
    `dp.kernels.lstm_forward` / `lstm_backward`; the products over all steps stay XLA's."""
    return _lstm_kernel_fwd(layer, w_x, b_x, w_h, b_h, xs, carry, valid)[0]


def _lstm_kernel_fwd(layer, w_x, b_x, w_h, b_h, xs, carry, valid):
    steps, batch = xs.shape[:2]
    lengths = jnp.full((batch,), steps, jnp.int32) if valid is None else valid.sum(0, dtype=jnp.int32)
    hs, h, c, gates, cs = kernels.lstm_forward(_projected(w_x, xs), b_x + b_h, w_h, carry["h"], carry["c"], lengths)
    return ({"h": h, "c": c}, {"h": hs}), (w_x, w_h, xs, carry, lengths, hs, gates, cs)


def _lstm_kernel_bwd(layer, residuals, cotangents):
    w_x, w_h, xs, carry, lengths, hs, gates, cs = residuals
    d_final, d_outs = cotangents
    d_z, d_h0, d_c0 = kernels.lstm_backward(w_h, gates, cs, carry["c"], lengths, d_outs["h"], d_final["h"],
                                            d_final["c"])
    h_prev = jnp.concatenate([carry["h"][None], hs[:-1]])  # past a length h_prev is 0, but so is ∂z there
    return _projection_gradients(w_x, xs, h_prev, d_z, d_z) + ({"h": d_h0, "c": d_c0}, None)


_lstm_kernel.defvjp(_lstm_kernel_fwd, _lstm_kernel_bwd)


@layerclass
class SimpleRNN(Recurrent):
    """h_t = tanh(W_x x_t + W_h h_{t-1} + b). Type: (T, d) → (T, hidden).

    Params: w_x (d, hidden), w_h (hidden, hidden), bias (hidden,).
    """

    hidden: int
    return_state: bool = False
    unroll: int = 1

    def cell_params(self, key, d):
        return _gate_params(key, d, self.hidden)

    def weights(self, params):
        return params["w_x"], params["w_h"], params["bias"], jnp.zeros_like(params["bias"])

    def activate(self, gx, gh, carry):
        h = jnp.tanh(gx + gh)
        return {"h": h}, {"h": h}


LSTM_GATES = ("remember", "save", "focus", "candidate")
"""LSTM gate names of the notes; the classical aliases are f (remember), i (save), o (focus)."""


@layerclass
class LSTM(Recurrent):
    """The LSTM of the notes, as gates. Type: (T, d) → (T, hidden).

        remember_t = σ(W_{x,f} x_t + W_{h,f} h_{t-1} + b_f)      (f, "forget")
        save_t     = σ(W_{x,i} x_t + W_{h,i} h_{t-1} + b_i)      (i, "input")
        focus_t    = σ(W_{x,o} x_t + W_{h,o} h_{t-1} + b_o)      (o, "output")
        c'_t       = tanh(W_{x,c} x_t + W_{h,c} h_{t-1} + b_c)   (candidate)
        c_t = remember_t ⊗ c_{t-1} + save_t ⊗ c'_t,     h_t = focus_t ⊗ tanh(c_t)

    Params: {"remember", "save", "focus", "candidate"}, each {w_x (d, hidden), w_h (hidden,
    hidden), bias (hidden,)}; the remember bias starts at `remember_bias` (default 1.0: "do not
    forget" at first). The four gates' projections are fused: x·W_x for all steps is one matrix
    product, and each step computes h_{t-1}·W_h for all four gates as one product. On the CPU,
    a float32 batch runs its steps in the C++ kernels `dp.kernels.lstm_forward`/`lstm_backward`
    (`unroll` then does not apply: it is the `lax.scan` loop's, used elsewhere).
    Carry: {"h", "c"}. With `return_gates=True` the output is (ys, trace) where trace holds every
    step's remember/save/focus/candidate activations and cell state c, each (T, hidden).
    """

    hidden: int
    remember_bias: float = 1.0
    return_state: bool = False
    return_gates: bool = False
    unroll: int = 1

    def cell_params(self, key, d):
        keys = jax.random.split(key, 4)
        return {g: _gate_params(k, d, self.hidden, self.remember_bias if g == "remember" else 0.0)
                for g, k in zip(LSTM_GATES, keys)}

    def initial_carry(self, dtype, batch=()):
        return {g: jnp.zeros(batch + (self.hidden,), dtype) for g in ("h", "c")}

    def weights(self, params):
        return _fused(params, LSTM_GATES)

    def _recurrence(self, w_x, b_x, w_h, b_h, xs, carry, valid):
        """On the CPU, for float32, the C++ kernels (`_lstm_kernel`) unless the gates are asked for."""
        args = (w_x, b_x, w_h, b_h, xs, carry, valid)
        if self.return_gates:
            return _recurrence(self, *args)
        return kernels.on_cpu(partial(_lstm_kernel, self), partial(_recurrence, self), *args)

    def activate(self, gx, gh, carry):
        # one tanh pass over all four gates, σ(z) = (1 + tanh(z/2)) / 2: ~2× faster on XLA:CPU
        # than three logistic passes and a tanh
        scale = np.repeat(np.array([0.5, 0.5, 0.5, 1.0], np.float32), self.hidden).astype(gx.dtype)
        remember, save, focus, candidate = jnp.split(jnp.tanh((gx + gh) * scale), 4, -1)
        remember, save, focus = (1 + remember) / 2, (1 + save) / 2, (1 + focus) / 2
        c = remember * carry["c"] + save * candidate
        h = focus * jnp.tanh(c)
        out = {"h": h}
        if self.return_gates:
            out.update(remember=remember, save=save, focus=focus, candidate=candidate, cell=c)
        return {"h": h, "c": c}, out


@layerclass
class GRU(Recurrent):
    """GRU in PyTorch's formulation (so nn.GRU weights load exactly). Type: (T, d) → (T, hidden).

        reset_t  = σ(W_{x,r} x_t + W_{h,r} h_{t-1} + b_r)
        update_t = σ(W_{x,z} x_t + W_{h,z} h_{t-1} + b_z)
        n_t      = tanh(W_{x,n} x_t + b_{x,n} + reset_t ⊗ (W_{h,n} h_{t-1} + b_{h,n}))
        h_t      = (1 − update_t) ⊗ n_t + update_t ⊗ h_{t-1}

    Params: {"reset", "update", "candidate"}, each {w_x, w_h, bias}; candidate also has
    bias_h (the hidden-side bias inside reset ⊗ (...)).
    """

    hidden: int
    return_state: bool = False
    unroll: int = 1

    def cell_params(self, key, d):
        keys = jax.random.split(key, 3)
        params = {g: _gate_params(k, d, self.hidden)
                  for g, k in zip(("reset", "update", "candidate"), keys)}
        params["candidate"]["bias_h"] = jnp.zeros((self.hidden,), jnp.float32)
        return params

    def weights(self, params):
        w_x, w_h, b_x, b_h = _fused(params, ("reset", "update", "candidate"))
        return w_x, w_h, b_x, b_h.at[2 * self.hidden:].set(params["candidate"]["bias_h"])

    def activate(self, gx, gh, carry):
        reset, update = jnp.split(_sigmoid(gx[..., :2 * self.hidden] + gh[..., :2 * self.hidden]), 2, -1)
        n = jnp.tanh(gx[..., 2 * self.hidden:] + reset * gh[..., 2 * self.hidden:])
        h = (1 - update) * n + update * carry["h"]
        return {"h": h}, {"h": h}


def reverse_valid_prefix(xs, lengths):
    """Reverse the first `lengths` steps of xs and leave the rest in place (an involution)."""
    steps = xs.shape[0]
    if lengths is None:
        return xs[::-1]
    t = jnp.arange(steps)
    return xs[jnp.where(t < lengths, lengths - 1 - t, t)]


@layerclass
class Bidirectional(Layer):
    """Run `layer` forwards and a copy backwards; concatenate: (T, d) → (T, 2·hidden).

    With `lengths=`, the backward pass reads only the valid prefix, reversed, so padding never
    reaches a valid step. Params: {"forward": ..., "backward": ...}.
    """

    layer: Layer
    side_inputs = frozenset({"lengths"})

    def __post_init__(self):
        if getattr(self.layer, "return_state", False) or getattr(self.layer, "return_gates", False):
            raise LayerError(f"Bidirectional({self.layer!r}): the wrapped layer must return only ys")

    def init_params(self, key, spec, **side):
        kf, kb = jax.random.split(key)
        return {"forward": self.layer.init(kf, spec), "backward": self.layer.init(kb, spec)}

    def forward(self, params, xs, *, key=None, lengths=None):
        check_sequence(self, xs)
        lengths = check_lengths(self, lengths, xs.shape[0])
        return self._both(Layer.apply, reverse_valid_prefix, params, xs, lengths)

    def forward_batch(self, params, xs, *, key=None, lengths=None):
        check_sequence(self, example_spec(xs))
        lengths = check_lengths(self, lengths, xs.shape[1], batch=xs.shape[0])
        reverse = jax.vmap(reverse_valid_prefix, (0, None if lengths is None else 0))
        return self._both(Layer.apply_batch, reverse, params, xs, lengths)

    def _both(self, run, reverse, params, xs, lengths):
        side = {} if lengths is None else {"lengths": lengths}
        forward = run(self.layer, params["forward"], xs, **side)
        backward = run(self.layer, params["backward"], reverse(xs, lengths), **side)
        return jnp.concatenate([forward, reverse(backward, lengths)], -1)
