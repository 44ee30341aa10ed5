"""Recurrent sequence models: a pure cell per layer, one `jax.lax.scan` loop for all of them.

SequenceModel : (T, d) → (T, hidden). Each layer defines its cell

    cell(params, carry, x_t) -> (carry, out_t)     carry: {"h": ...} (LSTM: {"h", "c"})

and `Recurrent.forward` runs it over the sequence with `jax.lax.scan`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .basic import glorot
from .core import Layer, LayerError, layerclass
from .sequence import check_lengths, check_sequence, valid_steps

orthogonal = jax.nn.initializers.orthogonal()


def _gate_params(key, d, hidden, bias=0.0):
    """Weights of one gate: w_x (d, hidden), w_h (hidden, hidden), bias (hidden,)."""
    kx, kh = jax.random.split(key)
    return {"w_x": glorot(kx, (d, hidden), jnp.float32),
            "w_h": orthogonal(kh, (hidden, hidden), jnp.float32),
            "bias": jnp.full((hidden,), bias, jnp.float32)}


def _fused(params, gates):
    """Stack the gates' [w_x; w_h] into one (d + hidden, n·hidden) matrix and their biases."""
    w = jnp.concatenate([jnp.concatenate([params[g]["w_x"], params[g]["w_h"]]) for g in gates], 1)
    return w, jnp.concatenate([params[g]["bias"] for g in gates])


class Recurrent(Layer):
    """The loop shared by SimpleRNN, LSTM and GRU.

    Side inputs: `lengths=` (valid steps of this example: outputs past it are 0 and the final
    state is the state after step `lengths`), `initial_state=` (a carry dict; default zeros).
    Returns ys (T, hidden); with `return_state=True`, (ys, final_carry).
    `unroll` is passed to `jax.lax.scan`.
    """

    side_inputs = frozenset({"lengths", "initial_state"})

    def input_size(self, params) -> int:
        raise NotImplementedError

    def init_params(self, key, spec, **side):
        check_sequence(self, spec)
        return self.cell_params(key, spec.shape[-1])

    def initial_carry(self, dtype):
        return {"h": jnp.zeros((self.hidden,), dtype)}

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return self.initial_carry(dtype)

    def decode(self, params, x_t, cache, position):
        carry, out = self.cell(self.prepare(params), cache, x_t)
        return out["h"], carry

    def prepare(self, params):
        """Work done once per sequence, outside the loop (e.g. fusing gate weights)."""
        return params

    def forward(self, params, xs, *, key=None, lengths=None, initial_state=None):
        steps = check_sequence(self, xs, self.input_size(params))
        lengths = check_lengths(self, lengths, steps)
        carry = self.initial_carry(xs.dtype) if initial_state is None else initial_state
        expected = jax.tree.map(jnp.shape, self.initial_carry(xs.dtype))
        if jax.tree.map(jnp.shape, carry) != expected:
            raise LayerError(f"{self!r}: expected initial_state shaped {expected}, "
                             f"got {jax.tree.map(jnp.shape, carry)}")
        prepared = self.prepare(params)
        valid = valid_steps(steps, lengths)

        def step(carry, inputs):
            x_t, valid_t = inputs
            new, out = self.cell(prepared, carry, x_t)
            if lengths is not None:
                new = jax.tree.map(lambda n, o: jnp.where(valid_t, n, o), new, carry)
                out = jax.tree.map(lambda v: jnp.where(valid_t, v, 0), out)
            return new, out

        carry, outs = jax.lax.scan(step, carry, (xs, valid), unroll=self.unroll)
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

    def input_size(self, params):
        return params["w_x"].shape[0]

    def prepare(self, params):
        return jnp.concatenate([params["w_x"], params["w_h"]]), params["bias"]

    def cell(self, prepared, carry, x_t):
        w, b = prepared
        h = jnp.tanh(jnp.concatenate([x_t, carry["h"]]) @ w + b)
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
    forget" at first). Each step computes all four projections as ONE product [x_t; h_{t-1}] · W.
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

    def input_size(self, params):
        return params["remember"]["w_x"].shape[0]

    def initial_carry(self, dtype):
        return {"h": jnp.zeros((self.hidden,), dtype), "c": jnp.zeros((self.hidden,), dtype)}

    def prepare(self, params):
        return _fused(params, LSTM_GATES)

    def cell(self, prepared, carry, x_t):
        w, b = prepared
        z = jnp.concatenate([x_t, carry["h"]]) @ w + b
        remember, save, focus, candidate = jnp.split(z, 4)
        remember, save, focus = jax.nn.sigmoid(remember), jax.nn.sigmoid(save), jax.nn.sigmoid(focus)
        candidate = jnp.tanh(candidate)
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

    def input_size(self, params):
        return params["reset"]["w_x"].shape[0]

    def prepare(self, params):
        gates = ("reset", "update", "candidate")
        w_x = jnp.concatenate([params[g]["w_x"] for g in gates], 1)
        w_h = jnp.concatenate([params[g]["w_h"] for g in gates], 1)
        b_x = jnp.concatenate([params[g]["bias"] for g in gates])
        b_h = jnp.concatenate([jnp.zeros(2 * self.hidden, b_x.dtype), params["candidate"]["bias_h"]])
        return w_x, w_h, b_x, b_h

    def cell(self, prepared, carry, x_t):
        w_x, w_h, b_x, b_h = prepared
        h = carry["h"]
        gx, gh = jnp.split(x_t @ w_x + b_x, 3), jnp.split(h @ w_h + b_h, 3)
        reset = jax.nn.sigmoid(gx[0] + gh[0])
        update = jax.nn.sigmoid(gx[1] + gh[1])
        n = jnp.tanh(gx[2] + reset * gh[2])
        h = (1 - update) * n + update * h
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
        side = {} if lengths is None else {"lengths": lengths}
        forward = self.layer.apply(params["forward"], xs, **side)
        backward = self.layer.apply(params["backward"], reverse_valid_prefix(xs, lengths), **side)
        return jnp.concatenate([forward, reverse_valid_prefix(backward, lengths)], -1)
