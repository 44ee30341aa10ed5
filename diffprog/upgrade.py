"""Params saved by diffprog 0.1, in today's layout: `dp.upgrade_params(model, params, x)`.

diffprog 0.1 keyed a composition's stage by its repr, so the key of `f ** n` held the depth
("1_LSTM^2"), and `f ** 1` was f itself, its params not stacked. Today the key is "1_LSTM^n" and
`f ** 1` is a stack of one, so that the params tree does not depend on the depth. Loading 0.1
params into a model is refused (the params check names the first path that differs); this
converts them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .checks import LayerError, spec_of
from .core import Compose, Layer, Repeat


def _old_name(layer: Layer) -> str:
    """The 0.1 name in a composition's key: the depth in `f ** n`, f's own name for n = 1."""
    if isinstance(layer, Repeat):
        return _old_name(layer.layer) + (f"^{layer.n}" if layer.n > 1 else "")
    return layer.name


def _convert(layer: Layer, old, expected):
    if isinstance(layer, Repeat):
        if layer.n == 1:  # 0.1: f's own params
            if "first" in expected:
                return {"first": _convert(layer.layer, old, expected["first"]),
                        "stack": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), expected["stack"])}
            one = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), expected["stack"])
            return {"stack": jax.tree.map(lambda a: a[None], _convert(layer.layer, old, one))}
        new = dict(old)
        if "first" in old:
            new["first"] = _convert(layer.layer, old["first"], expected["first"])
        new["stack"] = jax.vmap(lambda p: _convert(layer.layer, p, jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), expected["stack"])))(old["stack"])
        return new
    if not isinstance(old, dict):
        return old
    new = dict(old)
    if isinstance(layer, Compose):
        new = {name: old.get(f"{i}_{_old_name(stage)}", old.get(name)) for i, (name, stage) in enumerate(layer.named_stages())}
    for key, child in layer.children():
        if key is None:
            new = _convert(child, new, expected)
        elif key in expected and new.get(key) is not None:
            new[key] = _convert(child, new[key], expected[key])
    return new


def upgrade_params(model: Layer, params, x, **side):
    """`params` saved by diffprog 0.1 for `model`, in today's layout (x: one example, as for
    `init`). Raises LayerError if the result is still not `model`'s params."""
    expected = jax.eval_shape(lambda key: model.init(key, spec_of(x), **spec_of(side)), jax.random.key(0))
    new = _convert(model, params, expected)
    if jax.tree.structure(new) != jax.tree.structure(expected) or any(
            jnp.shape(a) != s.shape for a, s in zip(jax.tree.leaves(new), jax.tree.leaves(expected))):
        raise LayerError(f"upgrade_params({model!r}): these params are not diffprog 0.1 params of this model")
    return new
