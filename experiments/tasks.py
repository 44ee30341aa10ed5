"""Generated tasks that probe long-range dependence. Each returns a batch dict:
"inputs" (B, T, ...), "targets", and "mask" for per-position targets.

| task     | inputs                         | target                        | trivial baseline        |
|----------|--------------------------------|-------------------------------|-------------------------|
| adding   | (T, 2): value, marker          | sum of the 2 marked values    | predict 1: MSE 1/6      |
| copy     | k symbols, `delay` blanks, go  | the k symbols after the go    | guess: 1/alphabet       |
| parens   | a prefix of a balanced string  | nesting depth after each char | the most frequent depth |
| recall   | (k₁,v₁) … (kₙ,vₙ), query q     | the value paired with q       | guess: 1/n_values       |
| selective_copy | k symbols scattered in noise, k go markers | the k symbols in order | guess: 1/alphabet |
| mqar     | k₁ v₁ … kₙ vₙ, then every kᵢ again | the value of each queried key | guess: 1/n_values       |
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def adding(key, batch: int, steps: int):
    """The adding problem: values ~ U[0, 1]; one marked position in each half of the sequence."""
    kv, k1, k2 = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (batch, steps))
    first = jax.random.randint(k1, (batch,), 0, steps // 2)
    second = jax.random.randint(k2, (batch,), steps // 2, steps)
    marks = jax.nn.one_hot(first, steps) + jax.nn.one_hot(second, steps)
    return {"inputs": jnp.stack([values, marks], -1),
            "targets": (values * marks).sum(-1, keepdims=True)}


COPY_BLANK, COPY_GO = 0, 1


def copy(key, batch: int, delay: int, symbols: int = 4, alphabet: int = 8):
    """Copy / memory: `symbols` tokens from 2..alphabet+1, `delay` blanks, a go marker, then
    `symbols` − 1 blanks; the model must output the symbols from the go marker on.
    Length 2·symbols + delay; vocab alphabet + 2."""
    tokens = jax.random.randint(key, (batch, symbols), 2, alphabet + 2)
    blanks = lambda n: jnp.full((batch, n), COPY_BLANK)
    inputs = jnp.concatenate([tokens, blanks(delay), jnp.full((batch, 1), COPY_GO), blanks(symbols - 1)], 1)
    targets = jnp.concatenate([jnp.zeros((batch, symbols + delay), jnp.int32), tokens], 1)
    mask = jnp.arange(inputs.shape[1]) >= symbols + delay
    return {"inputs": inputs, "targets": targets, "mask": jnp.broadcast_to(mask, inputs.shape)}


def parens(key, batch: int, steps: int, max_depth: int = 8):
    """Nesting depth: a random prefix of a balanced string over "(" (0) and ")" (1); the target
    at t is the depth after reading character t (0..max_depth)."""
    def walk(key):
        def step(depth, k):
            opens = jnp.where(depth == 0, True, jnp.where(depth == max_depth, False, jax.random.bernoulli(k)))
            depth = depth + jnp.where(opens, 1, -1)
            return depth, (jnp.where(opens, 0, 1), depth)
        return jax.lax.scan(step, 0, jax.random.split(key, steps))[1]
    chars, depth = jax.vmap(walk)(jax.random.split(key, batch))
    return {"inputs": chars, "targets": depth, "mask": jnp.ones_like(chars, bool)}


def recall(key, batch: int, pairs: int, n_keys: int = 16, n_values: int = 16):
    """Associative recall — the notes' soft lookup. The memory M = {(k_j, v_j)} comes first, one
    pair per step, then a query step holding one of the keys; the target is its value.
    Each step is a float vector [one-hot key (n_keys); one-hot value (n_values); query flag],
    so inputs are (pairs + 1, n_keys + n_values + 1) and targets ints in 0..n_values−1."""
    kk, kv, kq = jax.random.split(key, 3)
    keys = jax.vmap(lambda k: jax.random.permutation(k, n_keys)[:pairs])(jax.random.split(kk, batch))
    values = jax.random.randint(kv, (batch, pairs), 0, n_values)
    which = jax.random.randint(kq, (batch,), 0, pairs)
    rows = jnp.arange(batch)
    memory = jnp.concatenate([jax.nn.one_hot(keys, n_keys), jax.nn.one_hot(values, n_values),
                              jnp.zeros((batch, pairs, 1))], -1)
    query = jnp.concatenate([jax.nn.one_hot(keys[rows, which], n_keys), jnp.zeros((batch, n_values)),
                             jnp.ones((batch, 1))], -1)
    return {"inputs": jnp.concatenate([memory, query[:, None]], 1), "targets": values[rows, which]}


SELECT_NOISE, SELECT_GO = 0, 1


def selective_copy(key, batch: int, steps: int, symbols: int = 4, alphabet: int = 8):
    """Selective copying (Mamba's synthetic task): `symbols` tokens from 2..alphabet+1 scattered
    at random positions of `steps` noise tokens (0), then `symbols` go markers (1); from the
    first marker on the model must output the tokens in their order. Unlike `copy`, where the
    tokens sit at fixed positions, the model must select them by content. Length steps + symbols;
    vocab alphabet + 2."""
    kt, kp = jax.random.split(key)
    tokens = jax.random.randint(kt, (batch, symbols), 2, alphabet + 2)
    where = jax.vmap(lambda k: jnp.sort(jax.random.permutation(k, steps)[:symbols]))(jax.random.split(kp, batch))
    rows = jnp.arange(batch)[:, None]
    scattered = jnp.full((batch, steps), SELECT_NOISE).at[rows, where].set(tokens)
    inputs = jnp.concatenate([scattered, jnp.full((batch, symbols), SELECT_GO)], 1)
    targets = jnp.concatenate([jnp.zeros((batch, steps), jnp.int32), tokens], 1)
    mask = jnp.arange(steps + symbols) >= steps
    return {"inputs": inputs, "targets": targets, "mask": jnp.broadcast_to(mask, inputs.shape)}


def mqar(key, batch: int, pairs: int, n_keys: int = 16, n_values: int = 16):
    """Multi-query associative recall (Zoology): `pairs` key-value pairs as tokens k₁ v₁ … kₙ vₙ
    (keys 0..n_keys−1, distinct; values n_keys..n_keys+n_values−1), then every key once more as a
    query, in another order; at each query the target is its value (an id in 0..n_values−1).
    A fixed-size recurrent state must hold all pairs at once. Length 3·pairs; vocab n_keys + n_values."""
    kk, kv, kq = jax.random.split(key, 3)
    keys = jax.vmap(lambda k: jax.random.permutation(k, n_keys)[:pairs])(jax.random.split(kk, batch))
    values = jax.random.randint(kv, (batch, pairs), 0, n_values)
    order = jax.vmap(lambda k: jax.random.permutation(k, pairs))(jax.random.split(kq, batch))
    rows = jnp.arange(batch)[:, None]
    context = jnp.stack([keys, values + n_keys], -1).reshape(batch, 2 * pairs)
    inputs = jnp.concatenate([context, keys[rows, order]], 1)
    targets = jnp.concatenate([jnp.zeros((batch, 2 * pairs), jnp.int32), values[rows, order]], 1)
    mask = jnp.arange(3 * pairs) >= 2 * pairs
    return {"inputs": inputs, "targets": targets, "mask": jnp.broadcast_to(mask, inputs.shape)}
