"""AddNorm, positional encodings and the TransformerBlock — the notes' one-liner

    TransformerBlock(x) = AddNorm(FeedForward, AddNorm(Attention, x))
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .attention import Attention
from .basic import Dense, Dropout, FeedForward, GatedFeedForward, activation_fn, norm_field, norm_repr, set_norm
from .core import Combinator, Layer, LayerError, Pipeline, built_field, example_spec, layerclass, set_built
from .embed import EmbedToken
from .sequence import check_sequence


@layerclass
class AddNorm(Combinator):
    """AddNorm(f, x) = Norm(x + f(x)) (post-LN, the notes); with pre_norm=True,
    x + f(Norm(x)) (pre-LN). Type: (T, d) → (T, d) when f is. Params: {"f", "norm"}.
    `norm` is LayerNorm(eps) unless given (e.g. dp.RMSNorm()). Side inputs go to f.
    """

    f: Layer
    pre_norm: bool = False
    eps: float = 1e-5
    norm: Layer = norm_field()

    def __post_init__(self):
        super().__post_init__()
        set_norm(self)

    @property
    def side_inputs(self):
        return self.f.side_inputs

    def children(self):
        return [("f", self.f), ("norm", self.norm)]

    def init_params(self, key, spec, **side):
        return {"f": self.f.init(key, spec, **side), "norm": self.norm.init(key, spec)}

    def route(self, run, params, x, **side):
        norm = lambda v: run(self.norm, params["norm"], v)
        if self.pre_norm:
            return x + run(self.f, params["f"], norm(x), **side)
        return norm(x + run(self.f, params["f"], x, **side))

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return self.f.init_cache(params["f"], max_len, dtype, **side)

    def decode(self, params, xs, cache, position):
        """x + f(norm(x)) (pre-LN) or norm(x + f(x)) on the chunk, f decoding with its cache."""
        norm = lambda v: self.norm.apply(params["norm"], v)
        if self.pre_norm:
            y, cache = self.f.decode(params["f"], norm(xs), cache, position)
            return xs + y, cache
        y, cache = self.f.decode(params["f"], xs, cache, position)
        return norm(xs + y), cache

    def __repr__(self):
        options = (", pre_norm=True" if self.pre_norm else "") + (f", eps={self.eps}" if self.eps != 1e-5 else "")
        return f"AddNorm({self.f!r}{options}{norm_repr(self)})"


@layerclass
class LearnedPositions(Layer):
    """x_t + P_t with a learned table P (max_len, d). Type: (T, d) → (T, d), T ≤ max_len."""

    max_len: int

    def init_params(self, key, spec, **side):
        check_sequence(self, spec)
        return {"table": 0.02 * jax.random.normal(key, (self.max_len, spec.shape[-1]), jnp.float32)}

    def check(self, params, x):
        check_sequence(self, x, params["table"].shape[1])
        if x.shape[0] > self.max_len:
            raise LayerError(f"{self!r}: sequence of {x.shape[0]} steps is longer than the "
                             f"positional table ({self.max_len})")

    def forward(self, params, x, **side):
        self.check(params, x)
        return x + params["table"][: x.shape[0]]

    def forward_batch(self, params, xs, *, key=None, **side):
        self.check(params, example_spec(xs))
        return kernels.add_to_each(xs, params["table"][: xs.shape[1]])

    def decode(self, params, xs, cache, position):
        steps = position + jnp.arange(xs.shape[0])
        if not isinstance(position, jax.core.Tracer) and position + xs.shape[0] > self.max_len:
            raise LayerError(f"{self!r}: steps {position}..{position + xs.shape[0] - 1} are past the positional "
                             f"table ({self.max_len})")
        rows = params["table"][jnp.minimum(steps, self.max_len - 1)]
        # under jit a position past the table is not known while tracing: NaN, never a clamped row
        return xs + jnp.where((steps < self.max_len)[:, None], rows, jnp.nan), cache


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

    def decode(self, params, xs, cache, position):
        return xs + sinusoid(position + jnp.arange(xs.shape[0]), xs.shape[-1]).astype(xs.dtype), cache

    @property
    def name(self):
        return "SinusoidalPositions"

    def __repr__(self):
        return "SinusoidalPositions"


SinusoidalPositions = SinusoidalPositionsLayer()


@layerclass
class TransformerBlock(Pipeline):
    """TransformerBlock(x) = AddNorm(FeedForward, AddNorm(Attention, x)). Type: (T, d) → (T, d).

    FeedForward here is the Transformer's two-matrix version, Dense(d) ∘ FeedForward(ff,
    activation) ("relu"; BERT's is "gelu", GPT-2's "gelu_tanh"). `causal` masks the future;
    `pre_norm` switches the AddNorms to pre-LN (GPT-2); `norm` is their norm, LayerNorm(eps)
    unless given (e.g. dp.RMSNorm()); `gated=True` makes the feed-forward Dense(d) ∘
    GatedFeedForward(ff, activation) (SwiGLU with "silu"); `kv_heads` and `rotary` are the
    attention's (grouped-query attention, rotary positions). The Llama block ("Transformer++") is
    TransformerBlock(d, heads, ff, causal=True, pre_norm=True, activation="silu", gated=True,
    use_bias=False, kv_heads=..., rotary=10000.0, norm=dp.RMSNorm(eps));
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
    norm: Layer = norm_field()
    gated: bool = False
    kv_heads: Optional[int] = None
    rotary: Optional[float] = None
    parts: tuple = built_field()
    """The (name, AddNorm) stages the fields build (`build`), or what `dp.rewrite` made of them."""

    def __post_init__(self):
        super().__post_init__()
        set_norm(self)
        if self.d % self.heads:
            raise LayerError(f"TransformerBlock({self.d}, {self.heads}, {self.ff}): width d={self.d} is not divisible by heads={self.heads}")
        activation_fn(self.activation, "TransformerBlock")
        set_built(self, "parts", self.build())

    def build(self) -> tuple:
        """The block's (name, AddNorm) stages in running order, from its fields."""
        wrap = lambda f: AddNorm(Dropout(self.dropout) @ f, self.pre_norm, self.eps, self.norm)
        attention = lambda **kind: Attention(self.heads, **kind, dropout=self.attention_dropout, use_bias=self.use_bias)
        parts = {"attention": wrap(attention(causal=self.causal, kv_heads=self.kv_heads, rotary=self.rotary))}
        if self.cross:
            parts["cross_attention"] = wrap(attention(cross=True))
        hidden = (GatedFeedForward if self.gated else FeedForward)(self.ff, self.activation, self.use_bias)
        parts["feedforward"] = wrap(Dense(self.d, self.use_bias) @ hidden)
        return tuple(parts.items())

    def named_stages(self):
        return list(self.parts)

    def init_params(self, key, spec, **side):
        check_sequence(self, spec, self.d)
        return super().init_params(key, spec, **side)

    def route(self, run, params, x, **side):
        check_sequence(self, run.example(x), self.d)
        return super().route(run, params, x, **side)

    def __repr__(self):
        text = super().__repr__()[:-1] + norm_repr(self) + ")"
        if self.parts == self.build():
            return text
        return text + "[" + ", ".join(f"{name}: {part!r}" for name, part in self.parts) + "]"  # edited by dp.rewrite
