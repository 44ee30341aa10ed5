"""AddNorm, positional encodings and the TransformerBlock — the notes' one-liner

    TransformerBlock(x) = AddNorm(FeedForward, AddNorm(Attention, x))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .attention import Attention
from .basic import Dense, Dropout, FeedForward, LayerNorm, activation_fn
from .core import Combinator, Layer, LayerError, Pipeline, layerclass
from .embed import EmbedToken
from .sequence import check_sequence


@layerclass
class AddNorm(Combinator):
    """AddNorm(f, x) = LayerNorm(x + f(x)) (post-LN, the notes); with pre_norm=True,
    x + f(LayerNorm(x)) (pre-LN). Type: (T, d) → (T, d) when f is. Params: {"f", "norm"}.
    `eps` is the LayerNorm's. Side inputs go to f.
    """

    f: Layer
    pre_norm: bool = False
    eps: float = 1e-5

    @property
    def side_inputs(self):
        return self.f.side_inputs

    def init_params(self, key, spec, **side):
        return {"f": self.f.init(key, spec, **side), "norm": LayerNorm(self.eps).init(key, spec)}

    def route(self, run, params, x, **side):
        norm = lambda v: run(LayerNorm(self.eps), params["norm"], v)
        if self.pre_norm:
            return x + run(self.f, params["f"], norm(x), **side)
        return norm(x + run(self.f, params["f"], x, **side))

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return self.f.init_cache(params["f"], max_len, dtype, **side)

    def decode(self, params, x_t, cache, position):
        return self._residual(lambda x, c: self.f.decode(params["f"], x, c, position), params, x_t, cache)

    def prefill(self, params, xs, cache):
        return self._residual(lambda x, c: self.f.prefill(params["f"], x, c), params, xs, cache)

    def _residual(self, f, params, x, cache):
        """x + f(norm(x)) (pre-LN) or norm(x + f(x)), f(x, cache) -> (y, cache) one step or P."""
        norm = lambda v: LayerNorm(self.eps).apply(params["norm"], v)
        if self.pre_norm:
            y, cache = f(norm(x), cache)
            return x + y, cache
        y, cache = f(x, cache)
        return norm(x + y), cache

    def __repr__(self):
        options = (", pre_norm=True" if self.pre_norm else "") + (f", eps={self.eps}" if self.eps != 1e-5 else "")
        return f"AddNorm({self.f!r}{options})"


@layerclass
class LearnedPositions(Layer):
    """x_t + P_t with a learned table P (max_len, d). Type: (T, d) → (T, d), T ≤ max_len."""

    max_len: int

    def init_params(self, key, spec, **side):
        check_sequence(self, spec)
        return {"table": 0.02 * jax.random.normal(key, (self.max_len, spec.shape[-1]), jnp.float32)}

    def forward(self, params, x, **side):
        check_sequence(self, x, params["table"].shape[1])
        if x.shape[0] > self.max_len:
            raise LayerError(f"{self!r}: sequence of {x.shape[0]} steps is longer than the "
                             f"positional table ({self.max_len})")
        return x + params["table"][: x.shape[0]]

    def decode(self, params, x_t, cache, position):
        if not isinstance(position, jax.core.Tracer) and position >= self.max_len:
            raise LayerError(f"{self!r}: position {position} is past the positional table ({self.max_len})")
        row = jax.lax.dynamic_index_in_dim(params["table"], position, keepdims=False)
        # under jit a position past the table is not known while tracing: NaN, never a clamped row
        return x_t + jnp.where(position < self.max_len, row, jnp.nan), cache

    def prefill(self, params, xs, cache):
        return self.apply(params, xs), cache


@layerclass
class EmbedSegment(Layer):
    """x_t + S[segment_t]: which segment (sentence A or B, question or paragraph) step t belongs
    to, as BERT's token-type embedding. Type: (T, d) → (T, d), side input `segments=` int[T] in
    [0, types) (absent: every step is segment 0). Params: table S (types, d)."""

    types: int
    side_inputs = frozenset({"segments"})

    def init_params(self, key, spec, **side):
        check_sequence(self, spec)
        return {"table": 0.02 * jax.random.normal(key, (self.types, spec.shape[-1]), jnp.float32)}

    def forward(self, params, x, *, segments=None, **side):
        check_sequence(self, x, params["table"].shape[1])
        if segments is None:
            return x + params["table"][0]
        self.expect(segments, (x.shape[0],), dtype="int")
        return x + EmbedToken(self.types, x.shape[-1]).lookup(params["table"], segments)


def sinusoid(positions, d):
    """The Transformer's fixed encoding: sin/cos of position / 10000^(2i/d)."""
    rates = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    angles = positions[..., None] * rates
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)[..., :d]


@layerclass
class SinusoidalPositionsLayer(Layer):
    """x_t + [sin(t ω_i); cos(t ω_i)], ω_i = 10000^(−2i/d). Type: (T, d) → (T, d). No params.
    Used as the constant `dp.SinusoidalPositions` (like `dp.Flatten`; calling it with no
    arguments returns it, so `dp.SinusoidalPositions()` is the same value)."""

    def forward(self, params, x, **side):
        check_sequence(self, x)
        return x + sinusoid(jnp.arange(x.shape[0]), x.shape[-1]).astype(x.dtype)

    def decode(self, params, x_t, cache, position):
        return x_t + sinusoid(jnp.asarray(position), x_t.shape[-1]).astype(x_t.dtype), cache

    def prefill(self, params, xs, cache):
        return self.apply(params, xs), cache

    def __repr__(self):
        return "SinusoidalPositions"


SinusoidalPositions = SinusoidalPositionsLayer()


@layerclass
class TransformerBlock(Pipeline):
    """TransformerBlock(x) = AddNorm(FeedForward, AddNorm(Attention, x)). Type: (T, d) → (T, d).

    FeedForward here is the Transformer's two-matrix version, Dense(d) ∘ FeedForward(ff,
    activation) ("relu"; BERT's is "gelu", GPT-2's "gelu_tanh"). `causal` masks the future;
    `pre_norm` switches the AddNorms to pre-LN (GPT-2), `eps` is their LayerNorms' epsilon;
    `use_bias=False` drops the biases of every projection. With `key=` given, `dropout` applies
    to the output of each attention and of the feed-forward (the residual path) and
    `attention_dropout` to the attention weights α. `cross=True` makes
    the decoder block of an encoder/decoder Transformer: a cross-attention AddNorm over the
    `context=` side input (S, d) sits between self-attention and the feed-forward.
    Params: {"attention", ["cross_attention",] "feedforward"}, each AddNorm params.
    Side inputs: lengths=, mask= (self-attention); context=, context_lengths= (cross).
    """

    d: int
    heads: int
    ff: int
    causal: bool = False
    pre_norm: bool = False
    dropout: float = 0.0
    cross: bool = False
    activation: str = "relu"
    eps: float = 1e-5
    use_bias: bool = True
    attention_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.d % self.heads:
            raise LayerError(f"{self!r}: width d={self.d} is not divisible by heads={self.heads}")
        activation_fn(self.activation, "TransformerBlock")

    @property
    def parts(self):
        """The block's AddNorm stages in running order."""
        wrap = lambda f: AddNorm(Dropout(self.dropout) @ f, self.pre_norm, self.eps)
        attention = lambda **kind: Attention(self.heads, **kind, dropout=self.attention_dropout, use_bias=self.use_bias)
        parts = {"attention": wrap(attention(causal=self.causal))}
        if self.cross:
            parts["cross_attention"] = wrap(attention(cross=True))
        parts["feedforward"] = wrap(Dense(self.d, self.use_bias) @ FeedForward(self.ff, self.activation, self.use_bias))
        return parts

    def named_stages(self):
        return list(self.parts.items())

    def init_params(self, key, spec, **side):
        check_sequence(self, spec, self.d)
        return super().init_params(key, spec, **side)

    def route(self, run, params, x, **side):
        check_sequence(self, run.example(x), self.d)
        return super().route(run, params, x, **side)
