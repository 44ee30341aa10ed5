"""The embedding-table fusion, a rewrite of the layer tree: a recurrent layer right after a token
embedding projects the table instead of every looked-up vector,

    (x W_x)_t = E[id_t] W_x = (E W_x)[id_t],

one (vocab × d)·(d × G) product instead of (B·T × d)·(d × G), its gradient a scatter-add over
the ids. `fuse(layer)` finds every composition whose stage `EmbedToken` is followed by a stage
that hands its input to a recurrent layer (`Recurrent`, `R ** n`, `Remat(R)`, through
`Layer.entry`) and rewrites the pair: the embedding hands a batch on as `TokenVectors` (the
table and the ids), the recurrent layer projects the table and hands its loop the rows as
`TableRows` (the LSTM's kernel reads each step's row from the projected table; the other loops
look them up). The params tree, the values and the gradients are those of the model as
written. `dp.batched` (and so `dp.train`) applies it; `dp.batched(model, fuse=False)` and
`LanguageModel(..., fuse=False)` switch it off.
"""
from __future__ import annotations

import functools

import jax

from .checks import example_spec
from .core import Compose, Layer, Wrapper, layerclass, rewrite
from .embed import EmbedToken
from .kernels.recurrence import TableRows
from .recurrent import Recurrent
from .sequence import check_sequence


@jax.tree_util.register_pytree_node_class
class TokenVectors:
    """The batch E[ids] (B, T, dim) kept as `embed` (an EmbedToken), the ids (B, T) and the
    table E (vocab, dim): the ids are the first leaf, so the batch axis is that of every batch."""

    def __init__(self, embed, ids, table):
        self.embed, self.ids, self.table = embed, ids, table

    def tree_flatten(self):
        return (self.ids, self.table), self.embed

    @classmethod
    def tree_unflatten(cls, embed, children):
        return cls(embed, *children)

    @property
    def vocab(self) -> int:
        return self.table.shape[0]

    def example_spec(self):
        return jax.ShapeDtypeStruct(self.ids.shape[1:] + self.table.shape[1:], self.table.dtype)

    def materialize(self):
        """E[ids] (B, T, dim), exactly as the embedding computes it."""
        return self.embed.lookup(self.table, self.ids)

    def project(self, w):
        """E[ids] w = (E w)[ids], time-major (T, B, out), as `TableRows`: the LSTM's kernel reads
        each row from the projected table as it needs it, every other path looks them up."""
        self.embed.check_ids(self.ids, self.vocab)
        return TableRows(self.table @ w, self.ids.T, self.embed.lookup)


@layerclass
class TableEmbedding(Wrapper):
    """`layer` (an EmbedToken), whose batch path hands on `TokenVectors` instead of the looked-up
    vectors. Params, name and one-example path are the embedding's."""

    layer: EmbedToken

    def forward_batch(self, params, ids, **side):
        self.layer.check(params, example_spec(ids))
        return TokenVectors(self.layer, ids, params["table"])

    def __repr__(self):
        return repr(self.layer)


@layerclass
class TableProjection(Wrapper):
    """`layer` (recurrent), reading `TokenVectors` by projecting the table when vocab ≤ B·T (else
    the looked-up vectors). Params, name, side inputs, decoding and one-example path are the
    layer's."""

    layer: Recurrent

    def forward_batch(self, params, xs, *, key=None, lengths=None, initial_state=None):
        if not isinstance(xs, TokenVectors):
            return self.layer.forward_batch(params, xs, lengths=lengths, initial_state=initial_state)
        if xs.vocab > xs.ids.size:
            return self.layer.forward_batch(params, xs.materialize(), lengths=lengths, initial_state=initial_state)
        weights = self.layer.weights(params)
        spec = xs.example_spec()
        check_sequence(self.layer, spec, weights.w_x.shape[0])
        return self.layer.run_batch(weights._replace(w_x=None), xs.project(weights.w_x), spec.dtype, lengths,
                                    initial_state)

    def __repr__(self):
        return repr(self.layer)


def _reads_input(layer: Layer) -> bool:
    """Whether `layer` hands its input unchanged (through `entry`) to a recurrent layer."""
    while layer is not None and not isinstance(layer, Recurrent):
        layer = layer.entry()
    return layer is not None


def fuse_stages(stages: list) -> list:
    """(name, layer) stages with every `EmbedToken` that a recurrent stage reads rewritten (see
    the module); names, and so params keys, unchanged."""
    stages = list(stages)
    for i in range(len(stages) - 1):
        (name, embed), (next_name, reader) = stages[i], stages[i + 1]
        if isinstance(embed, EmbedToken) and _reads_input(reader):
            stages[i] = (name, TableEmbedding(embed))
            stages[i + 1] = (next_name, rewrite(reader, lambda l: isinstance(l, Recurrent), TableProjection))
    return stages


def fuse(layer: Layer) -> Layer:
    """`layer` with the embedding-table fusion applied to every composition in it (see the module)."""
    try:
        return _fuse(layer)
    except TypeError:  # a layer with an unhashable field: not cached
        return _fuse.__wrapped__(layer)


@functools.lru_cache(maxsize=256)
def _fuse(layer):
    def fused(compose):
        return Compose(tuple(stage for _, stage in fuse_stages(compose.named_stages())))
    return rewrite(layer, lambda l: isinstance(l, Compose), fused)
