"""Low-rank adapters (LoRA; Hu et al., 2021): a pretrained weight W stays frozen and a trained
update of rank r is added to it,

    W' = W + (α / r) A B,    A (d_in, r) ~ N(0, 1/d_in),   B (r, d_out) = 0 at the start,

so that an adapted model starts out computing the pretrained one exactly. `low_rank(model,
params, key, rank, alpha, select)` wraps every layer `select` picks (default: the attention
layers) and returns the adapted model with its params; `merge_low_rank` folds the updates back
into the dense weights.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .attention import Attention
from .checks import LayerError
from .core import Layer, Wrapper, layerclass, rewrite, walk

ADAPTERS = "low_rank"
"""The params entry of a `LowRank` layer that holds its adapters: {target: {"A", "B"}}."""


@layerclass
class LowRank(Wrapper):
    """`layer` with each target's weight W replaced by W + (α/r) A B (see the module).

    targets: the entries of `layer`'s params that hold a {"weight" (d_in, d_out)} (for
    Attention: "query", "key", "value", "output"). Params: `layer`'s own plus
    {"low_rank": {target: {"A" (d_in, rank), "B" (rank, d_out)}}}. Type, side inputs, name and
    decoding are `layer`'s.
    """

    layer: Layer
    rank: int
    alpha: float = 1.0
    targets: tuple = ("query", "key", "value", "output")

    def init_params(self, key, spec, **side):
        params = self.layer.init(key, spec, **side)
        return {**params, ADAPTERS: self.adapters(key, params)}

    def adapters(self, key, params) -> dict:
        """Fresh adapters for `layer`'s params: A ~ N(0, 1/d_in), B = 0."""
        missing = [t for t in self.targets if "weight" not in params.get(t, {})]
        if missing:
            raise LayerError(f"{self!r}: {self.layer!r} has no weight at {missing} (its params: {sorted(params)})")
        out = {}
        for i, target in enumerate(self.targets):
            d_in, d_out = params[target]["weight"].shape[-2:]
            lead = params[target]["weight"].shape[:-2]  # a stack of f ** n
            a = jax.random.normal(jax.random.fold_in(key, i), lead + (d_in, self.rank), jnp.float32) / jnp.sqrt(d_in)
            out[target] = {"A": a, "B": jnp.zeros(lead + (self.rank, d_out), jnp.float32)}
        return out

    def merged(self, params) -> dict:
        """`layer`'s params with every target's weight W + (α/r) A B."""
        base = {k: v for k, v in params.items() if k != ADAPTERS}
        for target, ab in params[ADAPTERS].items():
            w = base[target]["weight"]
            base[target] = {**base[target], "weight": w + (self.alpha / self.rank) * (ab["A"] @ ab["B"]).astype(w.dtype)}
        return base

    def forward(self, params, x, **side):
        return self.layer.apply(self.merged(params), x, **side)

    def forward_batch(self, params, xs, **side):
        return self.layer.apply_batch(self.merged(params), xs, **side)

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return self.layer.init_cache(self.merged(params), max_len, dtype, **side)

    def decode(self, params, xs, cache, position):
        return self.layer.decode(self.merged(params), xs, cache, position)

    def __repr__(self):
        return f"LowRank({self.layer!r}, {self.rank}, alpha={self.alpha})"


def _update(tree, path, fn):
    """`tree` with the subtree at `path` replaced by fn(subtree)."""
    if not path:
        return fn(tree)
    return {**tree, path[0]: _update(tree[path[0]], path[1:], fn)}


def low_rank(model: Layer, params, key, rank: int, alpha: float = 1.0,
             select: Callable[[Layer], bool] = lambda layer: isinstance(layer, Attention), **options):
    """(adapted model, its params): every layer `select` picks wrapped in `LowRank(layer, rank,
    alpha, **options)`, its params those of `params` plus fresh adapters (B = 0: the adapted
    model computes what `model` computes until the adapters are trained)."""
    adapted = rewrite(model, select, lambda layer: LowRank(layer, rank, alpha, **options))
    for i, (path, layer, _) in enumerate([w for w in walk(adapted, params) if isinstance(w[1], LowRank)]):
        params = _update(params, path, lambda p: {**p, ADAPTERS: layer.adapters(jax.random.fold_in(key, i), p)})
    return adapted, params


def merge_low_rank(model: Layer, params):
    """(model without its LowRank wrappers, params with each adapter folded into its weight):
    the same function as the adapted model, as dense weights."""
    for path, layer, _ in [w for w in walk(model, params) if isinstance(w[1], LowRank)]:
        params = _update(params, path, layer.merged)
    return rewrite(model, lambda l: isinstance(l, LowRank), lambda l: l.layer), params
