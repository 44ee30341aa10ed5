"""The embedding-table fusion: a recurrent layer right after a token embedding projects the
table instead of every looked-up vector,

    (x W_x)_t = E[id_t] W_x = (E W_x)[id_t],

one (vocab × d)·(d × G) product instead of (B·T × d)·(d × G), its gradient a scatter-add over
the ids. It is a choice of the embedding: `EmbedToken(vocab, dim, fuse=True)` (the default
inside `LanguageModel`; `fuse=False` switches it off) hands a batch on as `TokenVectors`, the
(table, ids) the vectors would be looked up from. A layer that can use them says so
(`reads_deferred`: the recurrent layers, and the combinators that pass a batch on to their first
part); every other layer receives the looked-up vectors (`Layer.apply_batch` materializes them).
The values are the same either way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .core import Deferred


@jax.tree_util.register_pytree_node_class
class TokenVectors(Deferred):
    """The batch E[ids] (B, T, dim) kept as `embed` (an EmbedToken), its table E (vocab, dim)
    and the ids (B, T)."""

    def __init__(self, embed, table, ids):
        self.embed, self.table, self.ids = embed, table, ids

    def tree_flatten(self):
        return (self.table, self.ids), self.embed

    @classmethod
    def tree_unflatten(cls, embed, children):
        return cls(embed, *children)

    @property
    def vocab(self) -> int:
        return self.table.shape[0]

    @property
    def shape(self):
        return self.ids.shape + self.table.shape[1:]

    def example_spec(self):
        return jax.ShapeDtypeStruct(self.shape[1:], self.table.dtype)

    def materialize(self):
        """E[ids] (B, T, dim), exactly as the embedding computes it."""
        return jax.vmap(lambda ids: self.embed.lookup(self.table, ids))(self.ids)

    def project(self, w, time_major=False):
        """E[ids] w = (E w)[ids]: (B, T, out), or (T, B, out) with `time_major`."""
        ids = self.ids.T if time_major else self.ids
        return self.embed.lookup(self.table @ w, ids)
