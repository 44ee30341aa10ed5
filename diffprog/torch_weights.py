"""dp.load_torch(layer, state_dict): PyTorch weights (names → numpy arrays) as diffprog params.

No torch import: pass `{k: v.numpy() for k, v in module.state_dict().items()}`.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from .attention import Attention
from .basic import Dense, LayerNorm
from .conv import Conv
from .core import Layer, LayerError
from .embed import EmbedToken
from .recurrent import GRU, LSTM, SimpleRNN
from .transformer import TransformerBlock


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


def _recurrent(layer, sd, n_gates):
    """Split nn.RNN/LSTM/GRU layer-0 weights into per-gate (w_x, w_h, b_x, b_h), PyTorch order."""
    w_ih, w_hh, b_ih, b_hh = _take(layer, sd, "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    if w_ih.shape[0] != n_gates * layer.hidden:
        raise LayerError(f"load_torch({layer!r}): expected weight_ih_l0 with "
                         f"{n_gates * layer.hidden} rows, got {tuple(w_ih.shape)}")
    split = lambda a: jnp.split(a, n_gates)
    return list(zip(*(split(w_ih), split(w_hh), split(b_ih), split(b_hh))))


@load_torch.register
def _(layer: SimpleRNN, sd):  # nn.RNN(nonlinearity="tanh", batch_first=True)
    ((w_x, w_h, b_x, b_h),) = _recurrent(layer, sd, 1)
    return {"w_x": w_x.T, "w_h": w_h.T, "bias": b_x + b_h}


@load_torch.register
def _(layer: LSTM, sd):  # nn.LSTM: gates stacked in the order i, f, g, o
    gates = dict(zip(("save", "remember", "candidate", "focus"), _recurrent(layer, sd, 4)))
    return {g: {"w_x": w_x.T, "w_h": w_h.T, "bias": b_x + b_h} for g, (w_x, w_h, b_x, b_h) in gates.items()}


@load_torch.register
def _(layer: GRU, sd):  # nn.GRU: gates stacked in the order r, z, n
    gates = dict(zip(("reset", "update", "candidate"), _recurrent(layer, sd, 3)))
    params = {g: {"w_x": w_x.T, "w_h": w_h.T, "bias": b_x + b_h} for g, (w_x, w_h, b_x, b_h) in gates.items()}
    _, _, b_x, b_h = gates["candidate"]
    params["candidate"].update(bias=b_x, bias_h=b_h)
    return params


@load_torch.register
def _(layer: Attention, sd):  # nn.MultiheadAttention(batch_first=True)
    w, b, w_out, b_out = _take(layer, sd, "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    (wq, wk, wv), (bq, bk, bv) = jnp.split(w, 3), jnp.split(b, 3)
    return {"query": {"weight": wq.T, "bias": bq}, "key": {"weight": wk.T, "bias": bk},
            "value": {"weight": wv.T, "bias": bv}, "output": {"weight": w_out.T, "bias": b_out}}


@load_torch.register
def _(layer: TransformerBlock, sd):  # nn.TransformerEncoderLayer(batch_first=True, relu)
    sub = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    attention = load_torch(Attention(layer.heads), sub("self_attn."))
    return {"attention": {"f": {"0_Attention": attention, "1_Dropout": {}},
                          "norm": load_torch(LayerNorm(), sub("norm1."))},
            "feedforward": {"f": {"0_FeedForward": load_torch(Dense(layer.ff), sub("linear1.")),
                                  "1_Dense": load_torch(Dense(layer.d), sub("linear2.")),
                                  "2_Dropout": {}},
                            "norm": load_torch(LayerNorm(), sub("norm2."))}}
