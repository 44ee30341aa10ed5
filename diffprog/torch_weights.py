"""dp.load_torch(layer, state_dict): PyTorch weights (names → numpy arrays) as diffprog params.

No torch import: pass `{k: v.numpy() for k, v in module.state_dict().items()}`.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from .basic import Dense, LayerNorm
from .conv import Conv
from .core import Layer, LayerError
from .embed import EmbedToken


def _take(layer, state_dict, *names):
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise LayerError(f"load_torch({layer!r}): state dict lacks {missing}; "
                         f"it has {sorted(state_dict)}")
    return [jnp.asarray(np.asarray(state_dict[n]), jnp.float32) for n in names]


@functools.singledispatch
def load_torch(layer: Layer, state_dict: dict) -> dict:
    """Convert the state dict of `layer`'s PyTorch counterpart into `layer`'s params."""
    raise LayerError(f"load_torch: no PyTorch counterpart is known for {layer!r}")


@load_torch.register
def _(layer: Dense, sd):  # nn.Linear: weight (out, in)
    if not layer.use_bias:
        (w,) = _take(layer, sd, "weight")
        return {"weight": w.T}
    w, b = _take(layer, sd, "weight", "bias")
    return {"weight": w.T, "bias": b}


@load_torch.register
def _(layer: Conv, sd):  # nn.Conv1d/2d: weight (O, I, *kernel)
    w, b = _take(layer, sd, "weight", "bias")
    return {"kernel": jnp.moveaxis(w, (0, 1), (-1, -2)), "bias": b}


@load_torch.register
def _(layer: LayerNorm, sd):
    w, b = _take(layer, sd, "weight", "bias")
    return {"scale": w, "bias": b}


@load_torch.register
def _(layer: EmbedToken, sd):
    (w,) = _take(layer, sd, "weight")
    return {"table": w}
