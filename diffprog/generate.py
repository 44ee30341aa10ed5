"""Generating tokens: GenerateToken, LanguageModel, sampling rules and the decoding loop.

    LanguageModel(x) = GenerateToken(Collapse(SequenceModel(EmbedToken(x))))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .basic import Dropout, LayerNorm, PositionWise, affine, norm_field, set_norm
from .core import ArgumentError, Layer, LayerError, Pipeline, layerclass, unstacked
from .embed import EmbedToken
from .fusion import fuse_stages
from .sequence import Collapse, check_lengths


@layerclass
class GenerateToken(PositionWise):
    """score(y) = x · EmbedToken(y) (+ b_y) for every token y: logits (vocab,) from x (d,) (or
    (T, d) → (T, vocab)). Params: {"table": (vocab, d)} — inside LanguageModel, the embedding's
    own table unless the head is untied — and {"bias": (vocab,)} with use_bias=True. Softmax of
    the logits is the distribution over the next token.
    """

    vocab: int
    use_bias: bool = False

    def init_params(self, key, spec, **side):
        self.expect(spec, ("d",), ("T", "d"))
        params = EmbedToken(self.vocab, spec.shape[-1]).init(key, jax.ShapeDtypeStruct((), jnp.int32))
        return {**params, "bias": jnp.zeros((self.vocab,), jnp.float32)} if self.use_bias else params

    def width(self, params):
        return params["table"].shape[1]

    def map(self, params, x):
        return affine({"weight": params["table"].astype(x.dtype), **({"bias": params["bias"]} if self.use_bias else {})}, x,
                      transposed=True)


@layerclass
class LanguageModel(Pipeline):
    """LanguageModel = GenerateToken ∘ Collapse('last') ∘ body ∘ EmbedToken.

    int[T] → (vocab,): logits of the token after the last valid one (`lengths=`).
    With `per_position=True`: int[T] → (T, vocab), the logits after every prefix — the form used
    to train causal models (the body must then be causal: a recurrent body, or a Transformer
    with causal=True). `positions` (e.g. LearnedPositions(max_len)) is added after the
    embedding, and `dropout` (active with `key=`) applies to their sum (GPT-2's embedding
    dropout); `final_norm` applies `norm` (LayerNorm(eps) unless given) before GenerateToken
    (needed by pre-LN bodies). `fuse` (default) applies `dp.fusion` to a recurrent body. The head reads the embedding's table (`tied=True`, weight tying) or a
    table of its own, and adds a bias per token with `head_bias=True`.
    Params: {"embed": {"table"}, "positions"?, "dropout"?, "body", "norm"?, "head"?}; "head" holds
    {"table"} when untied and {"bias"} with head_bias.
    """

    vocab: int
    dim: int
    body: Layer
    positions: Optional[Layer] = None
    final_norm: bool = False
    per_position: bool = False
    fuse: bool = True
    tied: bool = True
    head_bias: bool = False
    eps: float = 1e-5
    dropout: float = 0.0
    norm: Layer = norm_field()
    side_inputs = frozenset({"lengths"})

    def __post_init__(self):
        super().__post_init__()
        if not self.final_norm and self.norm is not None and self.norm != LayerNorm(self.eps):
            raise LayerError(f"LanguageModel: norm={self.norm!r} is applied only with final_norm=True "
                             f"(given without it, it would be left out)")
        set_norm(self)

    def named_stages(self):
        """(name, layer) pairs from the embedding to the last hidden state."""
        stages = [("embed", EmbedToken(self.vocab, self.dim))]
        stages += [("positions", self.positions)] if self.positions is not None else []
        stages += [("dropout", Dropout(self.dropout))] if self.dropout else []
        stages += [("body", self.body)]
        stages += [("norm", self.norm)] if self.final_norm else []
        return fuse_stages(stages) if self.fuse else stages

    def children(self):
        return self.named_stages() + ([("head", self.head)] if not self.tied or self.head_bias else [])

    @property
    def head(self) -> GenerateToken:
        return GenerateToken(self.vocab, self.head_bias)

    def init_params(self, key, spec, **side):
        params = super().init_params(key, spec, **side)
        if not self.tied or self.head_bias:
            head = self.head.init(jax.random.fold_in(key, len(self.named_stages())), jax.ShapeDtypeStruct((self.dim,), jnp.float32))
            params["head"] = {k: v for k, v in head.items() if k != "table" or not self.tied}
        return params

    def head_params(self, params):
        """The head's {"table", "bias"?}: the embedding's table when tied."""
        return {**({"table": params["embed"]["table"]} if self.tied else {}), **params.get("head", {})}

    def route(self, run, params, ids, *, key=None, **side):
        """The stages, then the head."""
        h = super().route(run, params, ids, key=key, **side)
        if not self.per_position:
            h = run(Collapse("last"), {}, h, **side)
        return run(self.head, self.head_params(params), h)

    def decode(self, params, tokens, cache, position):
        """Logits (P, vocab) after each token of the chunk tokens (P,) read at steps
        position..position+P-1 (a prompt, or one new token); carries the cache."""
        h, cache = super().decode(params, tokens, cache, position)
        return self.head.apply(self.head_params(params), h), cache

    def __repr__(self):
        names = [repr(l) for _, l in self.named_stages()]
        head = "GenerateToken" if self.per_position else "GenerateToken ∘ Collapse('last')"
        return f"LanguageModel({head} ∘ {' ∘ '.join(reversed(names))})"


# -- sampling ---------------------------------------------------------------------------------

def check_sampling(*, temperature=1.0, top_k=None, top_p=None, greedy=False, function="sample"):
    """The sampling settings, checked before any work: a negative temperature would sample the
    least likely token, top_p = 0 always token 0."""
    if not isinstance(temperature, (int, float, np.integer, np.floating)) or temperature < 0:
        raise ArgumentError(f"{function}: temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
        raise ArgumentError(f"{function}: top_k must be an int >= 1 (or None), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.floating)) and 0 < top_p <= 1):
        raise ArgumentError(f"{function}: top_p must be in (0, 1] (or None), got {top_p!r}")


def sample(key, logits, *, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, greedy: bool = False):
    """Draw a token from softmax(logits / temperature), optionally keeping only the top_k
    logits or the smallest set whose probability reaches top_p. `greedy` (or temperature 0):
    argmax. temperature ≥ 0, top_k ≥ 1 and 0 < top_p ≤ 1, or `dp.ArgumentError`."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if greedy or temperature == 0:
        return jnp.argmax(logits, -1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:  # keep the most likely tokens until their mass reaches top_p
        sorted_logits = jnp.sort(logits, -1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, -1)
        mass_before = jnp.cumsum(probs, -1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1)


def generate(model: LanguageModel, params, prompts, steps: int, *, lengths=None, eos=None, pad_id: int = 0,
             key=None, use_cache: bool = True, **sampling):
    """Continue each prompt by `steps` tokens: prompts int (B, P) → int (B, steps).

    Prompts of different lengths: a list of lists of ids, or a right-padded (B, P) array with
    `lengths=` (B,) (the kit's convention for padding everywhere; `transformers` pads on the
    left and passes an attention mask instead). Each row continues its own prompt exactly as if
    it were generated alone: its tokens after its length are never read.
    `eos` (an id or a list of ids): a row stops after emitting one; its later tokens are
    `pad_id`, and the call returns `(tokens, lengths)`, lengths (B,) the tokens up to and
    including the stop token (`steps` where none came). The loop still runs all `steps` (one
    compiled program, no host sync per token).

    A jit-compiled `lax.scan`. With `use_cache=True` the model reads the part of the prompts
    that every row has as one chunk of `decode` (a Transformer's KV cache written in one pass),
    then one token per step (the rest of a longer prompt is fed, not sampled), carrying its KV
    cache (Transformer) or state (RNN); with `use_cache=False` it recomputes the whole prefix
    every step (the reference the cache must agree with). Sampling keywords go to `sample`
    (greedy, temperature, top_k, top_p); without `key=` decoding is greedy. `key` is split into
    one key per row, or is already (B,) keys: row i then samples as it would alone with key[i:i+1].
    """
    if not isinstance(model, LanguageModel):
        raise ArgumentError(f"generate: expected a dp.LanguageModel (a causal model that reads its own output, e.g. "
                            f"dp.gpt2), got {type(model).__name__}: {model!r}"[:400])
    prompts, lengths = _prompts_and_lengths(prompts, lengths)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ArgumentError(f"generate: steps must be an int >= 0, got {steps!r}")
    check_sampling(function="generate", **sampling)
    if sampling.get("top_k") is not None and sampling["top_k"] > model.vocab:
        raise ArgumentError(f"generate: top_k={sampling['top_k']} is larger than the vocabulary ({model.vocab})")
    if not isinstance(prompts, jax.core.Tracer):
        ids = np.asarray(prompts)
        bad = (ids < 0) | (ids >= model.vocab)
        if not isinstance(lengths, jax.core.Tracer):  # the padding after a row's length may hold anything
            bad &= np.arange(ids.shape[1]) < np.asarray(lengths)[:, None]
        bad = ids[bad]
        if bad.size:
            raise LayerError(f"generate: expected prompt ids in [0, {model.vocab}), got {bad.tolist()[:5]}")
    stops = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos))
    if any(not 0 <= e < model.vocab for e in stops + (pad_id,)):
        raise ArgumentError(f"generate: eos and pad_id must be ids in [0, {model.vocab}), got eos={eos!r}, pad_id={pad_id!r}")
    if key is None:
        sampling = {**sampling, "greedy": True}
        key = jax.random.key(0)
    total = prompts.shape[1] + steps
    max_len = getattr(model.positions, "max_len", None)
    if max_len is not None and total > max_len:
        raise LayerError(f"generate: prompt ({prompts.shape[1]}) + steps ({steps}) = {total} is "
                         f"longer than the model's positional table ({max_len})")
    keys = _row_keys(key, prompts.shape[0])
    # the prefix every row has is read as one chunk; unknown under jit: the first token only
    shortest = 1 if isinstance(lengths, jax.core.Tracer) else int(np.min(lengths, initial=prompts.shape[1]))
    tokens = _generate(model, params, prompts, lengths, steps, keys, tuple(sorted(sampling.items())), use_cache, shortest)
    if not stops:
        return tokens
    stopped = jnp.isin(tokens, jnp.asarray(stops))
    produced = jnp.where(stopped.any(-1), jnp.argmax(stopped, -1) + 1, steps)
    return jnp.where(jnp.arange(steps) < produced[:, None], tokens, pad_id), produced


def _prompts_and_lengths(prompts, lengths):
    """(B, P) int prompts and (B,) lengths in [1, P] from an array (+ lengths) or a list of lists."""
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, (list, tuple, np.ndarray)) for p in prompts):
        if lengths is not None:
            raise ArgumentError("generate: lengths= is for a padded array; a list of prompts gives its own lengths")
        lengths = np.array([len(p) for p in prompts])
        padded = np.zeros((len(prompts), max(lengths, default=0)), np.int32)
        for row, p in zip(padded, prompts):
            row[:len(p)] = p
        prompts = padded
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[1] == 0 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise LayerError(f"generate: expected prompts (B, P) int with P ≥ 1 (or a list of lists of ids), "
                         f"got {prompts.shape} {prompts.dtype}")
    if lengths is None:
        return prompts, np.full(prompts.shape[0], prompts.shape[1])
    if not isinstance(lengths, jax.core.Tracer):
        lengths = np.asarray(lengths)
        if lengths.shape != prompts.shape[:1] or not np.issubdtype(lengths.dtype, np.integer) \
                or ((lengths < 1) | (lengths > prompts.shape[1])).any():
            raise ArgumentError(f"generate: lengths= must be {prompts.shape[0]} ints in [1, {prompts.shape[1]}] "
                                f"(one per prompt), got {lengths.tolist()}")
    return prompts, lengths


def _row_keys(key, rows):
    """One sampling key per row: `key` split, or `key` itself when it is (rows,) keys."""
    key = jnp.asarray(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # raw uint32 keys, as jax.random.PRNGKey makes
    if key.shape == (rows,):
        return key
    if key.shape != ():
        raise ArgumentError(f"generate: key= must be one key or {rows} keys (one per prompt), got shape {key.shape}")
    return jax.random.split(key, rows)


@functools.partial(jax.jit, static_argnums=(0, 4, 6, 7, 8))
def _generate(model, params, prompts, lengths, steps, keys, sampling, use_cache, shortest):
    """Every prompt continued, compiled once per (model, shapes, steps, sampling, use_cache, shortest)."""
    if steps == 0:
        return jnp.zeros((prompts.shape[0], 0), jnp.int32)
    one = functools.partial(_cached if use_cache else _uncached, model, steps=steps, sampling=dict(sampling),
                            shortest=shortest)
    return jax.vmap(one, (None, 0, 0, 0))(params, prompts, lengths, keys)


def _cached(model, params, prompt, length, key, *, steps, sampling, shortest):
    """Decode the first `shortest` tokens as one chunk, then one token per position: the
    prompt's own token while the position is inside it (length), a sampled one after."""
    total = prompt.shape[0] + steps
    cache = model.init_cache(params, total)
    logits, cache = model.decode(params, prompt[:shortest], cache, 0)  # a deep f ** n: one scan, compiled once
    params = unstacked(model, params)  # sliced once here, not at every step of the loop
    keys = jax.random.split(key, steps)

    def write(carry, position):
        cache, logits = carry
        sampled = sample(keys[jnp.clip(position - length, 0, steps - 1)], logits, **sampling)
        token = jnp.where(position < length, prompt[jnp.minimum(position, prompt.shape[0] - 1)], sampled)
        logits, cache = model.decode(params, token.astype(prompt.dtype)[None], cache, position)
        return (cache, logits[0]), token
    _, tokens = jax.lax.scan(write, (cache, logits[-1]), jnp.arange(shortest, total))
    return jax.lax.dynamic_slice(tokens, (length - shortest,), (steps,))


def _uncached(model, params, prompt, length, key, *, steps, sampling, shortest):
    buffer = jnp.concatenate([prompt, jnp.zeros(steps, prompt.dtype)])
    per_position = dataclasses.replace(model, per_position=True)

    def write(buffer, k_j):
        k, j = k_j
        position = length + j
        logits = per_position.apply(params, buffer)[position - 1]
        token = sample(k, logits, **sampling)
        return buffer.at[position].set(token.astype(buffer.dtype)), token
    _, tokens = jax.lax.scan(write, buffer, (jax.random.split(key, steps), jnp.arange(steps)))
    return tokens
