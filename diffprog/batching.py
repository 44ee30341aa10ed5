"""`dp.batched`: a layer over a leading batch axis."""
from __future__ import annotations

import jax

from .checks import LayerError, _describe, example_spec
from .core import Layer, Wrapper, layerclass
from .fusion import fuse


@layerclass
class Batched(Wrapper):
    """`layer` over a leading batch axis: (B, *example) → (B, *out), by `layer.apply_batch`.

    Built by `dp.batched(layer)`. `init` takes a batch and initialises `layer` from one
    example of it; params are `layer`'s own. `key=` is split into B keys, one per example
    (so dropout masks differ across examples); every other side input is batched along axis 0.
    Without `key=` the result equals `jax.vmap(layer.apply)`; recurrent layers run faster this way.
    With `fuse` (the default) the batch runs `dp.fusion.fuse(layer)`: the same values, params and
    gradients, a recurrent layer after a token embedding projecting the table.
    """

    layer: Layer
    fuse: bool = True

    def init_params(self, key, spec, **side):
        if any(len(s.shape) < 1 for s in jax.tree.leaves(spec)):
            raise LayerError(f"{self!r}: expected a batch (B, ...), got {_describe(spec)}")
        return self.layer.init(key, example_spec(spec), **example_spec(side))

    def forward(self, params, x, **side):
        return (fuse(self.layer) if self.fuse else self.layer).apply_batch(params, x, **side)

    def __repr__(self):
        return f"batched({self.layer!r}{'' if self.fuse else ', fuse=False'})"


def batched(layer: Layer, fuse: bool = True) -> Batched:
    """vmap `layer` over a leading batch axis, splitting `key=` per example. See `Batched`."""
    return Batched(layer, fuse)
