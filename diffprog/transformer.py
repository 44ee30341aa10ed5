"""AddNorm, positional encodings and the TransformerBlock — the notes' one-liner

    TransformerBlock(x) = AddNorm(FeedForward, AddNorm(Attention, x))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .attention import Attention
from .basic import Dense, Dropout, FeedForward, LayerNorm
from .core import Layer, LayerError, layerclass
from .embed import EmbedToken
from .sequence import check_sequence


@layerclass
class AddNorm(Layer):
    """AddNorm(f, x) = LayerNorm(x + f(x)) (post-LN, the notes); with pre_norm=True,
    x + f(LayerNorm(x)) (pre-LN). Type: (T, d) → (T, d) when f is. Params: {"f", "norm"}.
    Side inputs go to f.
    """

    f: Layer
    pre_norm: bool = False

    @property
    def side_inputs(self):
        return self.f.side_inputs

    def init_params(self, key, spec):
        return {"f": self.f.init(key, spec), "norm": LayerNorm().init(key, spec)}

    def forward(self, params, x, **side):
        norm = lambda v: LayerNorm().apply(params["norm"], v)
        if self.pre_norm:
            return x + self.f.apply(params["f"], norm(x), **side)
        return norm(x + self.f.apply(params["f"], x, **side))

    def init_cache(self, params, max_len, dtype=jnp.float32):
        return self.f.init_cache(params["f"], max_len, dtype)

    def decode(self, params, x_t, cache, position):
        norm = lambda v: LayerNorm().apply(params["norm"], v)
        if self.pre_norm:
            y, cache = self.f.decode(params["f"], norm(x_t), cache, position)
            return x_t + y, cache
        y, cache = self.f.decode(params["f"], x_t, cache, position)
        return norm(x_t + y), cache

    def __repr__(self):
        return f"AddNorm({self.f!r}{', pre_norm=True' if self.pre_norm else ''})"


@layerclass
class LearnedPositions(Layer):
    """x_t + P_t with a learned table P (max_len, d). Type: (T, d) → (T, d), T ≤ max_len."""

    max_len: int

    def init_params(self, key, spec):
        check_sequence(self, spec)
        return {"table": 0.02 * jax.random.normal(key, (self.max_len, spec.shape[-1]), jnp.float32)}

    def forward(self, params, x, **side):
        check_sequence(self, x, params["table"].shape[1])
        if x.shape[0] > self.max_len:
            raise LayerError(f"{self!r}: sequence of {x.shape[0]} steps is longer than the "
                             f"positional table ({self.max_len})")
        return x + params["table"][: x.shape[0]]

    def decode(self, params, x_t, cache, position):
        return x_t + jax.lax.dynamic_index_in_dim(params["table"], position, keepdims=False), cache


def sinusoid(positions, d):
    """The Transformer's fixed encoding: sin/cos of position / 10000^(2i/d)."""
    rates = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    angles = positions[..., None] * rates
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)[..., :d]


@layerclass
class SinusoidalPositions(Layer):
    """x_t + [sin(t ω_i); cos(t ω_i)], ω_i = 10000^(−2i/d). Type: (T, d) → (T, d). No params."""

    def forward(self, params, x, **side):
        check_sequence(self, x)
        return x + sinusoid(jnp.arange(x.shape[0]), x.shape[-1]).astype(x.dtype)

    def decode(self, params, x_t, cache, position):
        return x_t + sinusoid(jnp.asarray(position), x_t.shape[-1]).astype(x_t.dtype), cache

    def __repr__(self):
        return "SinusoidalPositions"


@layerclass
class TransformerBlock(Layer):
    """TransformerBlock(x) = AddNorm(FeedForward, AddNorm(Attention, x)). Type: (T, d) → (T, d).

    FeedForward here is the Transformer's two-matrix version, Dense(d) ∘ FeedForward(ff).
    `causal` masks the future; `pre_norm` switches both AddNorms to pre-LN; `dropout` applies
    after attention and after the feed-forward (when `key=` is given).
    Params: {"attention": AddNorm params, "feedforward": AddNorm params}.
    Side inputs: lengths=, mask= (to the attention).
    """

    d: int
    heads: int
    ff: int
    causal: bool = False
    pre_norm: bool = False
    dropout: float = 0.0
    side_inputs = frozenset({"lengths", "mask"})

    @property
    def attention(self):
        return AddNorm(Dropout(self.dropout) @ Attention(self.heads, causal=self.causal), self.pre_norm)

    @property
    def feedforward(self):
        return AddNorm(Dropout(self.dropout) @ Dense(self.d) @ FeedForward(self.ff), self.pre_norm)

    def init_params(self, key, spec):
        check_sequence(self, spec, self.d)
        ka, kf = jax.random.split(key)
        return {"attention": self.attention.init(ka, spec), "feedforward": self.feedforward.init(kf, spec)}

    def forward(self, params, x, *, key=None, **side):
        check_sequence(self, x, self.d)
        ka, kf = (None, None) if key is None else jax.random.split(key)
        x = self.attention.apply(params["attention"], x, key=ka, **side)
        return self.feedforward.apply(params["feedforward"], x, key=kf)

    def init_cache(self, params, max_len, dtype=jnp.float32):
        return {name: part.init_cache(params[name], max_len, dtype)
                for name, part in (("attention", self.attention), ("feedforward", self.feedforward))}

    def decode(self, params, x_t, cache, position):
        x_t, attention = self.attention.decode(params["attention"], x_t, cache["attention"], position)
        y, feedforward = self.feedforward.decode(params["feedforward"], x_t, cache["feedforward"], position)
        return y, {"attention": attention, "feedforward": feedforward}


def bert(vocab: int, d: int = 1024, heads: int = 16, ff: int = 4096, depth: int = 24,
         max_len: int = 512, **block) -> Layer:
    """BERT(x) = TransformerBlock^depth(EmbedToken(x)) (+ learned positions, as BERT has).

    The depth blocks' params are stacked and run by one lax.scan. int[T] → (T, d).
    """
    return TransformerBlock(d, heads, ff, **block) ** depth @ LearnedPositions(max_len) @ EmbedToken(vocab, d)
