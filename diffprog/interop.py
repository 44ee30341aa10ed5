"""Flax interop: lift a `flax.linen` Module into a diffprog layer, and the reverse."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from .core import ArgumentError, Layer, layerclass


@layerclass
class FromFlax(Layer):
    """A `flax.linen` Module as a diffprog layer; params are the module's variables dict.

    `key=` becomes the module's "dropout" RNG. The module sees one example, like any layer.
    """

    module: Any

    def init_params(self, key, spec, **side):
        return self.module.init(key, jax.numpy.zeros(spec.shape, spec.dtype))

    def forward(self, params, x, *, key=None, **side):
        return self.module.apply(params, x, rngs=None if key is None else {"dropout": key})

    @property
    def name(self):
        return "from_flax"

    def __repr__(self):
        return f"from_flax({type(self.module).__name__})"


def from_flax(module: nn.Module) -> FromFlax:
    """Lift a linen Module into a diffprog layer (`init`/`apply` on one example)."""
    if not isinstance(module, nn.Module):
        raise ArgumentError(f"from_flax: expected a flax.linen Module instance (e.g. nn.Dense(4)), got "
                            f"{type(module).__name__}: {module!r}"[:300])
    return FromFlax(module)


class ToFlax(nn.Module):
    """A diffprog layer as a linen Module; its params sit under the variable "diffprog"."""

    layer: Layer

    @nn.compact
    def __call__(self, x, **side):
        params = self.param("diffprog", lambda key: self.layer.init(key, x))
        return self.layer.apply(params, x, **side)


def to_flax(layer: Layer) -> ToFlax:
    """Wrap a diffprog layer as a linen Module (`module.init(key, x)`, `module.apply(v, x)`)."""
    return ToFlax(layer)
