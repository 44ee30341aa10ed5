"""Soft programming: differentiable `if`, `switch`, dictionary lookup and gates (the notes'
"neural programming").

Every construct blends its choices with weights in [0, 1] so that gradients flow to all of them:

    soft_if(g, T, F)          = g ⊗ T + (1 − g) ⊗ F                 g ∈ [0, 1]^n
    soft_switch(g, C)         = Σ_i g_i C_i                          g a mask over cases (sums to 1)
    soft_lookup(q, K, V)      = Σ_j α(q, k_j) v_j,  α = softmax_j score(q, k_j)
    gate(x, y, r)             = x σ(r) + y (1 − σ(r))

Temperature τ sharpens or softens a choice on the logit scale: a gate g = σ(z) becomes σ(z/τ), a
mask g = softmax(z) becomes softmax(z/τ); τ → 0 approaches the hard choice. `hard=True` makes the
forward pass a true one-hot choice (g > ½, or argmax) while the backward pass uses the soft
gradient (straight-through).
"""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from .basic import lecun_normal
from .core import Layer, LayerError, layerclass

_EPS = 1e-7


def straight_through(soft, hard):
    """`hard` in the forward pass, the gradient of `soft` in the backward pass."""
    return soft + jax.lax.stop_gradient(hard - soft)


def _is_one(temperature):
    """True for a Python number equal to 1 (a traced τ is always applied)."""
    return isinstance(temperature, (int, float)) and temperature == 1.0


def check_temperature(function: str, temperature) -> None:
    """τ must be > 0: τ = 0 would divide by zero (NaN) and τ < 0 invert the choice. Hard choices
    are `hard=True`. A traced τ (under jit) is not known here and is used as it is."""
    if isinstance(temperature, jax.core.Tracer):
        return
    if not np.all(np.asarray(temperature) > 0):
        raise LayerError(f"{function}: temperature must be > 0 (for hard choices pass hard=True), "
                         f"got {temperature!r}")


def sharpen_gate(g, temperature=1.0, hard=False):
    """σ(logit(g)/τ) — for g = σ(z) this is σ(z/τ); `hard`: [g > ½] straight-through."""
    check_temperature("sharpen_gate", temperature)
    if not _is_one(temperature):
        g = jnp.clip(g, _EPS, 1 - _EPS)
        g = jax.nn.sigmoid((jnp.log(g) - jnp.log1p(-g)) / temperature)
    return straight_through(g, (g > 0.5).astype(g.dtype)) if hard else g


def sharpen_mask(g, temperature=1.0, hard=False, axis=-1):
    """softmax(log(g)/τ) — for g = softmax(z) this is softmax(z/τ); `hard`: one-hot argmax."""
    check_temperature("sharpen_mask", temperature)
    if not _is_one(temperature):
        g = jax.nn.softmax(jnp.log(jnp.clip(g, _EPS, 1.0)) / temperature, axis=axis)
    if hard:
        one_hot = jax.nn.one_hot(jnp.argmax(g, axis=axis), g.shape[axis], dtype=g.dtype, axis=axis)
        return straight_through(g, one_hot)
    return g


def soft_if(g, T, F, *, temperature=1.0, hard=False):
    """y = g ⊗ T + (1 − g) ⊗ F, element-wise: an `if` for each component of y independently.
    T and F of one shape; g of that shape, or one that broadcasts to it (a scalar: one choice
    for every component)."""
    try:
        fits = jnp.shape(T) == jnp.shape(F) and jnp.broadcast_shapes(jnp.shape(g), jnp.shape(T)) == jnp.shape(T)
    except ValueError:
        fits = False
    if not fits:
        raise LayerError(f"soft_if: expected T and F of one shape and g of a shape that broadcasts to it, got "
                         f"g {jnp.shape(g)}, T {jnp.shape(T)}, F {jnp.shape(F)}")
    g = sharpen_gate(g, temperature, hard)
    return g * T + (1 - g) * F


def soft_switch(g, C, *, temperature=1.0, hard=False):
    """y = Σ_i g_i C_i: choose among the rows of C (n_cases, ...) with the mask g (n_cases,).

    `soft_if(g, T, F)` is the two-case switch with mask [g, 1 − g] over C = [T; F].
    """
    g = sharpen_mask(g, temperature, hard)
    if g.shape[0] != C.shape[0]:
        raise LayerError(f"soft_switch: expected a mask of {C.shape[0]} cases, got {g.shape}")
    return jnp.tensordot(g, C, axes=1)


def gate(x, y, r, *, temperature=1.0, hard=False):
    """f(x, y, r) = x σ(r/τ) + y (1 − σ(r/τ)).

    Gradients (τ = 1): ∂f/∂x = σ(r), ∂f/∂y = 1 − σ(r), ∂f/∂r = (x − y) σ'(r).
    """
    check_temperature("gate", temperature)
    return soft_if(jax.nn.sigmoid(r / temperature), x, y, hard=hard)


# -- scores for soft lookup (and attention) --------------------------------------------------

@layerclass
class DotScore(Layer):
    """score(q, k) = qᵀ k. Input: (q (d,), keys (n, d)) → scores (n,). No parameters."""

    def forward(self, params, qk, **side):
        q, keys = _check_query_keys(self, qk)
        return keys @ q


@layerclass
class GeneralScore(Layer):
    """score(q, k) = qᵀ W_α k. Input: (q (d_q,), keys (n, d_k)) → (n,). Params: W (d_q, d_k)."""

    def init_params(self, key, spec, **side):
        q, keys = _check_query_keys(self, spec)
        return {"W": lecun_normal(key, (q.shape[-1], keys.shape[-1]), jnp.float32)}

    def forward(self, params, qk, **side):
        q, keys = _check_query_keys(self, qk)
        return keys @ (q @ params["W"])


@layerclass
class ConcatScore(Layer):
    """score(q, k) = v_αᵀ tanh(W_α [q; k]) — additive (Bahdanau) attention.

    Input: (q (d_q,), keys (n, d_k)) → (n,). Params: W_q (d_q, hidden), W_k (d_k, hidden)
    (the two halves of W_α), v (hidden,).
    """

    hidden: int = 32

    def init_params(self, key, spec, **side):
        q, keys = _check_query_keys(self, spec)
        kq, kk, kv = jax.random.split(key, 3)
        return {"W_q": lecun_normal(kq, (q.shape[-1], self.hidden), jnp.float32),
                "W_k": lecun_normal(kk, (keys.shape[-1], self.hidden), jnp.float32),
                "v": lecun_normal(kv, (self.hidden, 1), jnp.float32)[:, 0]}

    def forward(self, params, qk, **side):
        q, keys = _check_query_keys(self, qk)
        return jnp.tanh(q @ params["W_q"] + keys @ params["W_k"]) @ params["v"]


SCORES = {"dot": DotScore, "general": GeneralScore, "concat": ConcatScore}


def score_layer(score: Union[str, Layer]) -> Layer:
    """A score layer from its name ("dot", "general", "concat") or the layer itself."""
    if isinstance(score, Layer):
        return score
    if score not in SCORES:
        raise LayerError(f"unknown score {score!r}; choose one of {sorted(SCORES)}")
    return SCORES[score]()


def _check_query_keys(layer, qk):
    if not (isinstance(qk, (tuple, list)) and len(qk) == 2):
        raise LayerError(f"{layer!r}: expected a pair (query (d,), keys (n, d))")
    q, keys = qk
    if len(q.shape) != 1 or len(keys.shape) != 2 or keys.shape[0] == 0:
        raise LayerError(f"{layer!r}: expected query (d,) and keys (n, d) with n ≥ 1, "
                         f"got {tuple(q.shape)} and {tuple(keys.shape)}")
    if isinstance(layer, DotScore) and q.shape[-1] != keys.shape[-1]:
        raise LayerError(f"{layer!r}: expected keys (n, {q.shape[-1]}), got {tuple(keys.shape)}")
    return q, keys


def soft_lookup(q, keys, values, *, score="dot", params=None, temperature=1.0, hard=False,
                return_weights=False):
    """lookup(q, M) = Σ_j α(q, k_j) v_j with α = softmax_j(score(q, k_j) / τ).

    q (d_q,), keys (n, d_k), values (n, d_v) → (d_v,). `score` is "dot", "general", "concat" or
    a score layer; `params` are that layer's params (from `score_layer(score).init(key, (q, keys))`).
    With `return_weights=True` returns (result, α).
    """
    check_temperature("soft_lookup", temperature)
    layer = score_layer(score)
    if values.shape[0] != keys.shape[0]:
        raise LayerError(f"soft_lookup: expected {keys.shape[0]} values, got {values.shape[0]}")
    scores = layer.apply({} if params is None else params, (q, keys))
    weights = sharpen_mask(jax.nn.softmax(scores / temperature), hard=hard)
    result = weights @ values
    return (result, weights) if return_weights else result


# -- combinators -----------------------------------------------------------------------------

def _named(layers):
    return [f"{i}_{l.name}" for i, l in enumerate(layers)]


@layerclass
class Gated(Layer):
    """The notes' neural-network gate: r = condition(x), a = if_true(x), b = if_false(x),

        Gated(x) = a σ(r/τ) + b (1 − σ(r/τ))       (hard=True: straight-through choice)

    Type: x → shape of if_true(x) (condition's output must broadcast to it).
    Params: {"if_true", "if_false", "condition"}.
    """

    if_true: Layer
    if_false: Layer
    condition: Layer
    temperature: float = 1.0
    hard: bool = False

    def init_params(self, key, spec, **side):
        kt, kf, kc = jax.random.split(key, 3)
        return {"if_true": self.if_true.init(kt, spec), "if_false": self.if_false.init(kf, spec),
                "condition": self.condition.init(kc, spec)}

    def forward(self, params, x, *, key=None, **side):
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        run = lambda name, layer, k: layer.apply(params[name], x, **({} if k is None else {"key": k}))
        a = run("if_true", self.if_true, keys[0])
        b = run("if_false", self.if_false, keys[1])
        r = run("condition", self.condition, keys[2])
        return gate(a, b, r, temperature=self.temperature, hard=self.hard)

    def __repr__(self):
        return f"Gated({self.if_true!r}, {self.if_false!r}, {self.condition!r})"


@layerclass
class Switch(Layer):
    """A soft `switch`: g = softmax(selector(x)/τ) over the cases, Switch(x) = Σ_i g_i case_i(x).

    Type: x → the common output shape of the cases; selector(x) must be (n_cases,).
    Params: {"cases": {"0_Dense": ..., ...}, "selector": ...}. hard=True: straight-through argmax.
    """

    cases: tuple
    selector: Layer
    temperature: float = 1.0
    hard: bool = False

    def init_params(self, key, spec, **side):
        keys = jax.random.split(key, len(self.cases) + 1)
        return {"cases": {n: c.init(k, spec) for n, c, k in zip(_named(self.cases), self.cases, keys)},
                "selector": self.selector.init(keys[-1], spec)}

    def forward(self, params, x, *, key=None, **side):
        outs = jnp.stack([c.apply(params["cases"][n], x) for n, c in zip(_named(self.cases), self.cases)])
        logits = self.selector.apply(params["selector"], x)
        if logits.shape != (len(self.cases),):
            raise LayerError(f"{self!r}: expected the selector to give ({len(self.cases)},) "
                             f"logits, got {tuple(logits.shape)}")
        return soft_switch(jax.nn.softmax(logits / self.temperature), outs, hard=self.hard)

    def __repr__(self):
        return f"Switch({list(self.cases)!r}, {self.selector!r})"


@layerclass
class SoftLookup(Layer):
    """soft_lookup as a layer: (q (d,), keys (n, d), values (n, d_v)) → (d_v,).

    Params: those of the score layer ({} for "dot").
    """

    score: Union[str, Layer] = "dot"
    temperature: float = 1.0
    hard: bool = False

    def init_params(self, key, spec, **side):
        q, keys, _ = spec
        return score_layer(self.score).init(key, (q, keys))

    def forward(self, params, qkv, **side):
        q, keys, values = qkv
        return soft_lookup(q, keys, values, score=self.score, params=params,
                           temperature=self.temperature, hard=self.hard)
