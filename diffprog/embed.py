"""EmbedToken: look up the vector of each token id."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .core import Layer, LayerError, layerclass


@layerclass
class EmbedToken(Layer):
    """EmbedToken(x)_t = E[x_t]. Type: int[T] → (T, dim) (or int[] → (dim,)).

    Params: table (vocab, dim), initialised N(0, 1/dim) so x · E[y] starts at unit scale.
    Out-of-range ids raise LayerError when the ids are concrete (eager mode). Under jit the
    ids are not known while tracing, so an out-of-range id yields a row of NaN instead of a
    silently clamped vector; the NaN reaches the loss, where `dp.train` reports it.
    """

    vocab: int
    dim: int

    def init_params(self, key, spec, **side):
        self.expect(spec, (), ("T",), dtype="int")
        table = jax.random.normal(key, (self.vocab, self.dim), jnp.float32) / np.sqrt(self.dim)
        return {"table": table}

    def check(self, params, ids):
        self.expect(ids, (), ("T",), dtype="int")
        if params["table"].shape != (self.vocab, self.dim):
            raise LayerError(f"{self!r}: expected table ({self.vocab}, {self.dim}), "
                             f"got {params['table'].shape}")

    def forward(self, params, ids, **side):
        self.check(params, ids)
        return self.lookup(params["table"], ids)

    def check_ids(self, ids, vocab):
        """Concrete ids outside [0, vocab) are a LayerError; traced ones are not known here."""
        if not isinstance(ids, jax.core.Tracer):
            bad = np.asarray(ids)[(np.asarray(ids) < 0) | (np.asarray(ids) >= vocab)]
            if bad.size:
                raise LayerError(f"{self!r}: expected token ids in [0, {vocab}), got {bad.tolist()[:5]}")

    def lookup(self, table, ids):
        """table[ids] for a table of any width; out-of-range ids are an error (concrete ids) or
        rows of NaN (traced ids)."""
        vocab = table.shape[0]
        self.check_ids(ids, vocab)
        valid = (ids >= 0) & (ids < vocab)
        vectors = table[jnp.clip(ids, 0, vocab - 1)]
        return jnp.where(valid[..., None], vectors, jnp.nan)
