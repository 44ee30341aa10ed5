"""SequenceToSequence: an encoder reads the source, a decoder writes the target while attending
to the encoder's states (the notes' "RNN with attention", and the encoder/decoder Transformer).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .attention import Attention
from .basic import Dense
from .core import Layer, LayerError, layerclass, unstacked
from .embed import EmbedToken
from .recurrent import LSTM, Bidirectional
from .transformer import AddNorm, LearnedPositions, TransformerBlock


@layerclass
class SequenceToSequence(Layer):
    """(source int[S], target_in int[T]) → logits (T, vocab) under teacher forcing:

        context = encoder(source)                 (S, d)
        logits  = W decoder(target_in; context)   (T, vocab)

    target_in is the target shifted right behind a start token. The decoder reads the
    context through its cross-attention layers (`context=` / `context_lengths=` side inputs).
    Side input: source_lengths= (valid source steps). Params: {"encoder", "decoder", "head"}.
    """

    encoder: Layer
    decoder: Layer
    vocab: int
    side_inputs = frozenset({"source_lengths"})

    def init_params(self, key, spec, **side):
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise LayerError(f"{self!r}: expected a pair (source int[S], target_in int[T])")
        source, target = spec
        ke, kd, kh = jax.random.split(key, 3)
        encoder = self.encoder.init(ke, source)
        context = jax.eval_shape(self.encoder.apply, encoder, source)
        decoder = self.decoder.init(kd, target, context=context)
        hidden = jax.eval_shape(lambda p, t, c: self.decoder.apply(p, t, context=c), decoder, target, context)
        return {"encoder": encoder, "decoder": decoder, "head": Dense(self.vocab).init(kh, hidden)}

    def encode(self, params, source, source_lengths=None):
        side = {} if source_lengths is None or "lengths" not in self.encoder.side_inputs else {"lengths": source_lengths}
        return self.encoder.apply(params["encoder"], source, **side)

    def context_side(self, context, source_lengths):
        return {"context": context, **({} if source_lengths is None else {"context_lengths": source_lengths})}

    def forward(self, params, pair, *, key=None, source_lengths=None):
        source, target_in = pair
        context = self.encode(params, source, source_lengths)
        hidden = self.decoder.apply(params["decoder"], target_in, key=key, **self.context_side(context, source_lengths))
        return Dense(self.vocab).apply(params["head"], hidden)

    def __repr__(self):
        return f"SequenceToSequence({self.encoder!r} ⇒ {self.decoder!r})"


def rnn_seq2seq(source_vocab: int, target_vocab: int, dim: int = 64, layers: int = 1,
                score: str = "concat") -> SequenceToSequence:
    """Bidirectional LSTM encoder (states (S, 2·dim): each knows its distance from both ends,
    as in Bahdanau et al.); LSTM decoder followed by additive ("concat") attention over them,
    as a residual AddNorm: h_t + Σ_s α_{t,s} W v_s, α = softmax_s vᵀ tanh(W[h_t; k_s])."""
    return SequenceToSequence(
        Bidirectional(LSTM(dim)) ** layers @ EmbedToken(source_vocab, dim),
        AddNorm(Attention(1, cross=True, score=score)) @ LSTM(dim) ** layers @ EmbedToken(target_vocab, dim),
        target_vocab)


def transformer_seq2seq(source_vocab: int, target_vocab: int, dim: int = 64, heads: int = 4,
                        ff: int = 128, layers: int = 2, max_len: int = 64) -> SequenceToSequence:
    """Transformer encoder (TransformerBlock^layers) and decoder (causal blocks with
    cross-attention), learned positions on both sides."""
    return SequenceToSequence(
        TransformerBlock(dim, heads, ff) ** layers @ LearnedPositions(max_len) @ EmbedToken(source_vocab, dim),
        TransformerBlock(dim, heads, ff, causal=True, cross=True) ** layers
        @ LearnedPositions(max_len) @ EmbedToken(target_vocab, dim),
        target_vocab)


def translate(model: SequenceToSequence, params, sources, steps: int, start: int, *,
              source_lengths=None, use_cache: bool = True):
    """Greedy autoregressive decoding: sources int (B, S) → int (B, steps), starting from the
    token `start`. A jit-compiled lax.scan; the decoder carries its KV cache / LSTM state and
    reads the encoder context kept in its cache (`use_cache=False`: recompute every step)."""
    sources = jnp.asarray(sources)
    if sources.ndim != 2 or sources.shape[1] == 0:
        raise LayerError(f"translate: expected sources (B, S) with S ≥ 1, got {sources.shape}")
    lengths = jnp.full(sources.shape[:1], sources.shape[1]) if source_lengths is None else jnp.asarray(source_lengths)

    def one(source, length):
        context = model.encode(params, source, length)
        side = model.context_side(context, length)
        if use_cache:
            decoder = unstacked(model.decoder, params["decoder"])  # sliced once, not at every step
            cache = model.decoder.init_cache(decoder, steps, **side)

            def step(carry, position):
                token, cache = carry
                hidden, cache = model.decoder.decode(decoder, token[None], cache, position)
                token = jnp.argmax(Dense(model.vocab).apply(params["head"], hidden[0])).astype(jnp.int32)
                return (token, cache), token
            return jax.lax.scan(step, (jnp.int32(start), cache), jnp.arange(steps))[1]

        def step(buffer, position):
            logits = model.apply(params, (source, buffer), source_lengths=length)[position]
            token = jnp.argmax(logits).astype(jnp.int32)
            return buffer.at[position + 1].set(token, mode="drop"), token
        return jax.lax.scan(step, jnp.zeros(steps, jnp.int32).at[0].set(start), jnp.arange(steps))[1]
    return jax.jit(jax.vmap(one))(sources, lengths)
