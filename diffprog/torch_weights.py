"""dp.load_torch(layer, state_dict): PyTorch weights (names → numpy arrays) as diffprog params.

No torch import: pass `{k: v.numpy() for k, v in module.state_dict().items()}`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .attention import Attention
from .basic import Dense, FeedForward, LayerNorm, RMSNorm
from .conv import Conv
from .core import Layer, LayerError, find
from .embed import EmbedToken
from .recurrent import GRU, LSTM, SimpleRNN
from .transformer import TransformerBlock


class _StateDict(dict):
    """A state dict (or the part of one under `prefix`) that records which names were read."""

    def __init__(self, items, read=None, prefix=""):
        super().__init__(items)
        self.read, self.prefix = (set() if read is None else read), prefix

    def sub(self, prefix):
        return _StateDict({k[len(prefix):]: v for k, v in self.items() if k.startswith(prefix)}, self.read,
                          self.prefix + prefix)


def numpy_array(value) -> np.ndarray:
    """A numpy array of a state dict's value; a torch tensor in bfloat16 or float16 (which
    numpy cannot hold or torch will not convert) becomes float32."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def _take(layer, state_dict, *names):
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise LayerError(f"load_torch({layer!r}): state dict lacks {missing}; "
                         f"it has {sorted(state_dict)}")
    state_dict.read.update(state_dict.prefix + n for n in names)
    return [jnp.asarray(numpy_array(state_dict[n]), jnp.float32) for n in names]


def _expect(layer, name, got, want):
    if tuple(got) != tuple(want):
        raise LayerError(f"load_torch({layer!r}): expected {name} shaped {tuple(want)}, got {tuple(got)}")


def load_torch(layer: Layer, state_dict: dict) -> dict:
    """Convert the state dict of `layer`'s PyTorch counterpart into `layer`'s params. Every
    array must fit the layer and every name must be used: a state dict of another size, or one
    that holds more than the layer (a 2-layer nn.LSTM for one LSTM), is a LayerError naming it,
    never a partial load."""
    sd = _StateDict(state_dict)
    params = _convert(layer, sd)
    unused = sorted(set(state_dict) - sd.read)
    if unused:
        raise LayerError(f"load_torch({layer!r}): the state dict holds {unused}, which {layer!r} has no "
                         f"place for (a multi-layer PyTorch module loads layer by layer: convert each "
                         f"layer's part into its own diffprog layer)")
    return params


@functools.singledispatch
def _convert(layer: Layer, state_dict) -> dict:
    raise LayerError(f"load_torch: no PyTorch counterpart is known for {layer!r}")


@_convert.register
def _(layer: Dense, sd):  # nn.Linear: weight (out, in)
    if not layer.use_bias:
        (w,) = _take(layer, sd, "weight")
        _expect(layer, "weight (out, in)", w.shape[:1], (layer.out,))
        return {"weight": w.T}
    w, b = _take(layer, sd, "weight", "bias")
    _expect(layer, "weight (out, in)", w.shape[:1], (layer.out,))
    return {"weight": w.T, "bias": b}


@_convert.register
def _(layer: Conv, sd):  # nn.Conv1d/2d: weight (O, I, *kernel)
    w, b = _take(layer, sd, "weight", "bias")
    _expect(layer, "weight (out_channels, ...)", w.shape[:1], (layer.features,))
    return {"kernel": jnp.moveaxis(w, (0, 1), (-1, -2)), "bias": b}


@_convert.register
def _(layer: LayerNorm, sd):
    w, b = _take(layer, sd, "weight", "bias")
    return {"scale": w, "bias": b}


@_convert.register
def _(layer: RMSNorm, sd):  # nn.RMSNorm(d, eps=layer.eps)
    (w,) = _take(layer, sd, "weight")
    return {"scale": w}


@_convert.register
def _(layer: EmbedToken, sd):
    (w,) = _take(layer, sd, "weight")
    _expect(layer, "weight (vocab, dim)", w.shape, (layer.vocab, layer.dim))
    return {"table": w}


def _recurrent(layer, sd, n_gates):
    """Split nn.RNN/LSTM/GRU layer-0 weights into per-gate (w_x, w_h, b_x, b_h), PyTorch order."""
    w_ih, w_hh, b_ih, b_hh = _take(layer, sd, "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    _expect(layer, "weight_ih_l0 (gates·hidden, in)", w_ih.shape[:1], (n_gates * layer.hidden,))
    _expect(layer, "weight_hh_l0 (gates·hidden, hidden)", w_hh.shape, (n_gates * layer.hidden, layer.hidden))
    split = lambda a: jnp.split(a, n_gates)
    return list(zip(*(split(w_ih), split(w_hh), split(b_ih), split(b_hh))))


@_convert.register
def _(layer: SimpleRNN, sd):  # nn.RNN(nonlinearity="tanh", batch_first=True)
    ((w_x, w_h, b_x, b_h),) = _recurrent(layer, sd, 1)
    return {"w_x": w_x.T, "w_h": w_h.T, "bias": b_x + b_h}


@_convert.register
def _(layer: LSTM, sd):  # nn.LSTM: gates stacked in the order i, f, g, o
    gates = dict(zip(("save", "remember", "candidate", "focus"), _recurrent(layer, sd, 4)))
    return {g: {"w_x": w_x.T, "w_h": w_h.T, "bias": b_x + b_h} for g, (w_x, w_h, b_x, b_h) in gates.items()}


@_convert.register
def _(layer: GRU, sd):  # nn.GRU: gates stacked in the order r, z, n
    gates = dict(zip(("reset", "update", "candidate"), _recurrent(layer, sd, 3)))
    params = {g: {"w_x": w_x.T, "w_h": w_h.T, "bias": b_x + b_h} for g, (w_x, w_h, b_x, b_h) in gates.items()}
    _, _, b_x, b_h = gates["candidate"]
    params["candidate"].update(bias=b_x, bias_h=b_h)
    return params


@_convert.register
def _(layer: Attention, sd):  # nn.MultiheadAttention(batch_first=True)
    w, b, w_out, b_out = _take(layer, sd, "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    _expect(layer, "in_proj_weight (3·d, d)", w.shape, (3 * w.shape[1], w.shape[1]))
    if w.shape[1] % layer.heads:
        raise LayerError(f"load_torch({layer!r}): width {w.shape[1]} is not divisible by {layer.heads} heads")
    (wq, wk, wv), (bq, bk, bv) = jnp.split(w, 3), jnp.split(b, 3)
    return {"query": {"weight": wq.T, "bias": bq}, "key": {"weight": wk.T, "bias": bk},
            "value": {"weight": wv.T, "bias": bv}, "output": {"weight": w_out.T, "bias": b_out}}


@_convert.register
def _(layer: TransformerBlock, sd):  # nn.TransformerEncoderLayer(batch_first=True, relu)
    sub = sd.sub
    (attention,), (first_norm, second_norm) = find(layer, Attention), find(layer, type(layer.norm))
    (hidden,), (output,) = find(layer, FeedForward), find(layer, Dense)
    return placed(layer, jax.ShapeDtypeStruct((1, layer.d), jnp.float32), {
        attention: _convert(Attention(layer.heads), sub("self_attn.")), first_norm: _convert(layer.norm, sub("norm1.")),
        hidden: _convert(Dense(layer.ff), sub("linear1.")), output: _convert(Dense(layer.d), sub("linear2.")),
        second_norm: _convert(layer.norm, sub("norm2."))})


def placed(layer: Layer, spec, parts: dict) -> dict:
    """`layer`'s params tree (as `init` makes it for `spec`) holding the params `parts` gives at
    each of its paths; every other entry must be empty (a dropout's {})."""
    def build(tree, path):
        if path in parts:
            return parts[path]
        if not isinstance(tree, dict):
            raise LayerError(f"load_torch({layer!r}): nothing converts params{''.join(f'[{k!r}]' for k in path)}")
        return {k: build(v, path + (k,)) for k, v in tree.items()}
    return build(jax.eval_shape(lambda key: layer.init(key, spec), jax.random.key(0)), ())
