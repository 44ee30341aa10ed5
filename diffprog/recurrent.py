"""Recurrent sequence models: a pure cell per layer, one `jax.lax.scan` loop for all of them.

SequenceModel : (T, d) → (T, hidden). A layer defines its weights, all gates side by side
(G = gates · hidden), as `Weights(w_x (d, G), w_h (hidden, G), b_x (G,), b_h (G,))`, and its
activation:

    gx_t = x_t W_x + b_x,   gh_t = h_{t-1} W_h + b_h
    activate(gx_t, gh_t, carry) -> (carry, out_t)         carry: {"h"} (LSTM: {"h", "c"})

`cell(params, carry, x_t)` is one step; `scan` is the loop, the definition: x W_x for every step
in one matrix product, then a scan over time of h_{t-1} W_h, the biases and `activate`. One
example runs `scan` itself; a batch (`apply_batch`, `dp.batched`) runs the same loop over (B,
hidden) states through `dp.kernels.recurrence`, which chooses its backend (a written-out backward
pass; on the CPU, the LSTM's C++ kernels). Right after a token embedding, `dp.batched` makes the
input projection a lookup in the projected table (`dp.fusion`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .basic import lecun_normal
from .core import Combinator, Layer, LayerError, example_spec, layerclass
from .sequence import check_lengths, check_sequence, valid_steps


def orthogonal(key, shape, dtype=jnp.float32):
    """`jax.nn.initializers.orthogonal()(key, shape, dtype)` (a QR, LAPACK's on the CPU), one QR
    after another under `vmap` (`lax.map` over the batch of keys). A vmap-batched QR shares its
    batch among XLA's CPU threads, and two of them in one compiled program can wait for each
    other forever (jaxlib 0.10.2 on 2 cores: `jax.jit(jax.vmap(init))` of eight 256×256
    orthogonal matrices hung in 3 of 3 runs), so that `jax.vmap(model.init)` (an ensemble) and
    `f ** n`'s stacked inits would hang."""
    return _orthogonal(tuple(shape), jnp.dtype(dtype))(key)


@functools.cache
def _orthogonal(shape, dtype):
    @jax.custom_batching.custom_vmap
    def one(key):
        return jax.nn.initializers.orthogonal()(key, shape, dtype)

    @one.def_vmap
    def one_at_a_time(axis_size, in_batched, key):
        return (jax.lax.map(one, key), True) if in_batched[0] else (one(key), False)
    return one


class Weights(NamedTuple):
    """A recurrent layer's weights, every gate side by side (G = gates · hidden). With w_x None,
    the loop's inputs are the projections x W_x already."""
    w_x: Optional[jax.Array]  # (d, G)
    w_h: jax.Array            # (hidden, G)
    b_x: jax.Array            # (G,)
    b_h: jax.Array            # (G,)


def _gate_params(key, d, hidden, bias=0.0):
    """Weights of one gate: w_x (d, hidden), w_h (hidden, hidden), bias (hidden,)."""
    kx, kh = jax.random.split(key)
    return {"w_x": lecun_normal(kx, (d, hidden), jnp.float32),
            "w_h": orthogonal(kh, (hidden, hidden), jnp.float32),
            "bias": jnp.full((hidden,), bias, jnp.float32)}


def _fused(params, gates) -> Weights:
    """The gates' weights side by side, b_h = 0."""
    w_x, w_h, b_x = (jnp.concatenate([params[g][k] for g in gates], -1) for k in ("w_x", "w_h", "bias"))
    return Weights(w_x, w_h, b_x, jnp.zeros_like(b_x))


def _sigmoid(z):
    """σ(z) = (1 + tanh(z/2)) / 2: on XLA:CPU a tanh pass is ~2× faster than the logistic."""
    return (1 + jnp.tanh(z / 2)) / 2


class Recurrent(Layer):
    """The loop shared by SimpleRNN, LSTM and GRU. A subclass defines `cell_params(key, d)`,
    `weights(params) -> Weights` and `activate(gx, gh, carry) -> (carry, out)` (elementwise over
    leading axes; out["h"] is y_t).

    Side inputs: `lengths=` (valid steps of this example: outputs past it are 0 and the final
    state is the state after step `lengths`), `initial_state=` (a carry dict, or h0 / (h0, c0) as in PyTorch and Flax; default zeros).
    Returns ys (T, hidden); with `return_state=True`, (ys, final_carry).
    `unroll` is passed to `jax.lax.scan`.
    """

    side_inputs = frozenset({"lengths", "initial_state"})
    kernel = None
    """The name of this layer's C++ kernel in `dp.kernels.recurrence`, or None."""

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

    def decode(self, params, xs, cache, position):
        """The loop over the chunk xs (P, d), from the carry in the cache."""
        weights = self.weights(params)
        carry, outs = self.scan(weights, xs @ weights.w_x, cache, None)
        return outs["h"], carry

    def forward(self, params, xs, *, key=None, lengths=None, initial_state=None):
        weights = self.weights(params)
        steps = check_sequence(self, xs, weights.w_x.shape[0])
        lengths = check_lengths(self, lengths, steps)
        carry = self._initial(initial_state, jnp.result_type(xs.dtype, weights.w_h.dtype), ())
        valid = None if lengths is None else valid_steps(steps, lengths)
        carry, outs = self.scan(weights, xs @ weights.w_x, carry, valid)
        return self._result(outs, carry)

    def forward_batch(self, params, xs, *, key=None, lengths=None, initial_state=None):
        """(B, T, d) → (B, T, hidden): the time-major loop over (B, hidden) states."""
        weights = self.weights(params)
        check_sequence(self, example_spec(xs), weights.w_x.shape[0])
        return self.run_batch(weights, jnp.swapaxes(xs, 0, 1), xs.dtype, lengths, initial_state)

    def run_batch(self, weights: Weights, inputs, dtype, lengths=None, initial_state=None):
        """The loop over inputs (T, B, d) by `dp.kernels.recurrence` (or over their projections
        x W_x (T, B, G) when weights.w_x is None); outputs batch-major as `forward_batch`'s."""
        steps, batch = inputs.shape[:2]
        lengths = check_lengths(self, lengths, steps, batch=batch)
        carry = self._initial(initial_state, jnp.result_type(dtype, weights.w_h.dtype), (batch,))
        valid = None if lengths is None else jnp.arange(steps)[:, None] < lengths
        carry, outs = kernels.recurrence(self, weights, inputs, carry, valid)
        return self._result(jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), outs), carry)

    def scan(self, weights: Weights, xws, carry, valid, residuals=False):
        """The loop, over axis 0 of xws = x W_x (the bias b_x is added inside it, where it fuses
        with the activation); returns (final carry, outs), and with `residuals` also every step's
        gh_t and incoming carry (for the written-out backward pass of `dp.kernels`)."""
        def step(carry, inputs):
            xw, v = inputs
            gx, gh = xw + weights.b_x, kernels.step_product(carry["h"], weights.w_h) + weights.b_h
            new, out = self.update(gx, gh, carry, v)
            return new, ((out, gh, carry) if residuals else out)
        return jax.lax.scan(step, carry, (xws, valid), unroll=self.unroll)

    def update(self, gx, gh, carry, valid):
        """`activate`; where `valid` is False (padding) the carry is kept and the output is 0."""
        new, out = self.activate(gx, gh, carry)
        if valid is None:
            return new, out
        keep = jnp.expand_dims(valid, -1)
        return (jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, carry),
                jax.tree.map(lambda v: jnp.where(keep, v, 0), out))

    def _initial(self, initial_state, dtype, batch):
        """The carry to start from, in the loop's dtype (that of x W_x + h W_h, so that bf16
        inputs with float32 weights keep one carry dtype). `initial_state` is a carry dict,
        or as PyTorch and Flax users pass it: h0 (SimpleRNN, GRU) or (h0, c0) (LSTM)."""
        expected = self.initial_carry(dtype, batch)
        if initial_state is None:
            return expected
        if not isinstance(initial_state, dict):
            parts = tuple(initial_state) if isinstance(initial_state, (tuple, list)) else (initial_state,)
            if len(parts) != len(expected):
                forms = "h0" if len(expected) == 1 else "(h0, c0)"
                raise LayerError(f"{self!r}: expected initial_state {forms} or a dict with keys {sorted(expected)}, "
                                 f"got {len(parts)} array(s)")
            initial_state = dict(zip(expected, parts))
        if jax.tree.map(jnp.shape, initial_state) != jax.tree.map(jnp.shape, expected):
            raise LayerError(f"{self!r}: expected initial_state shaped {jax.tree.map(jnp.shape, expected)}, "
                             f"got {jax.tree.map(jnp.shape, initial_state)}")
        return jax.tree.map(lambda a: jnp.asarray(a, dtype), initial_state)

    def _result(self, outs, carry):
        ys = outs.pop("h")
        result = (ys,) + ((outs,) if outs else ()) + ((carry,) if self.return_state else ())
        return result[0] if len(result) == 1 else result


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
        return Weights(params["w_x"], params["w_h"], params["bias"], jnp.zeros_like(params["bias"]))

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

    @property
    def kernel(self):
        """On the CPU, for float32, the C++ kernels run the batch loop unless the gates are asked for."""
        return None if self.return_gates else "lstm"

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
        weights = _fused(params, ("reset", "update", "candidate"))
        return weights._replace(b_h=weights.b_h.at[2 * self.hidden:].set(params["candidate"]["bias_h"]))

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
class Bidirectional(Combinator):
    """Run `layer` forwards and a copy backwards; concatenate: (T, d) → (T, 2·hidden).

    With `lengths=`, the backward pass reads only the valid prefix, reversed, so padding never
    reaches a valid step. Params: {"forward": ..., "backward": ...}.
    """

    layer: Layer
    side_inputs = frozenset({"lengths"})

    def __post_init__(self):
        super().__post_init__()
        if getattr(self.layer, "return_state", False) or getattr(self.layer, "return_gates", False):
            raise LayerError(f"Bidirectional({self.layer!r}): the wrapped layer must return only ys")

    def init_params(self, key, spec, **side):
        kf, kb = jax.random.split(key)
        return {"forward": self.layer.init(kf, spec), "backward": self.layer.init(kb, spec)}

    def route(self, run, params, xs, *, key=None, lengths=None):
        spec = run.example(xs)
        check_sequence(self, spec)
        lengths = check_lengths(self, lengths, spec.shape[0], batch=xs.shape[0] if run.batched else None)
        flip = lambda x: run.each(reverse_valid_prefix)(x, lengths)
        side = {} if lengths is None else {"lengths": lengths}
        forward = run(self.layer, params["forward"], xs, **side)
        backward = run(self.layer, params["backward"], flip(xs), **side)
        return jnp.concatenate([forward, flip(backward)], -1)
