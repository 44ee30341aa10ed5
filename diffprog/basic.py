"""Core vector layers: Dense, FeedForward, activations, Flatten, Dropout, LayerNorm, RMSNorm."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from . import kernels
from .core import Layer, LayerError, example_spec, layerclass

lecun_normal = jax.nn.initializers.lecun_normal()
"""The weight initialiser of Dense, Conv and the recurrent input weights: N(0, 1/fan_in), truncated."""


def step(x):
    """step(x) = [x > 0] = argmax{0, x}; its derivative is 0 everywhere (the notes' ReLU')."""
    return (x > 0).astype(x.dtype)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "gelu": lambda x: x * (1 + erf(x * 0.5 ** 0.5)) / 2,  # x Φ(x), as PyTorch's GELU and BERT
    # (via erf: XLA:CPU runs jax.nn.gelu(approximate=False), which uses erfc, ~2x slower)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # the tanh approximation (GPT-2)
    "silu": jax.nn.silu,  # x σ(x) (Llama's and Mamba's)
    "step": step,
    "softmax": jax.nn.softmax,
    "identity": lambda x: x,
}


def activation_fn(name: str, layer: str = "activation"):
    if name not in ACTIVATIONS:
        raise LayerError(f"{layer}: unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def affine(params, x, transposed=False):
    """x W (+ b) over the last axis of x (..., d), as one (N, d)·(d, out) product over all N
    leading positions; `transposed`: W stored as (out, d) (a tied embedding table), read in place.
    (Autodiff of the product on (B, T, d) gave a weight-gradient contraction over two axes that
    XLA:CPU ran ~20% slower than this one 2-D product.) On the CPU in float32 on bfloat16 args, the
    product in bfloat16 where the CPU has the hardware (`kernels.in_float32_on_cpu`): b's gradient is
    a sum over all positions."""
    return kernels.in_float32_on_cpu(functools.partial(_affine, transposed=transposed), params, x)


def _affine(params, x, transposed):
    w = params["weight"]
    d, out = w.shape[::-1] if transposed else w.shape
    y = kernels.product(x.reshape(-1, d), w, transpose_b=transposed).reshape(x.shape[:-1] + (out,))
    return y + params["bias"] if "bias" in params else y


class PositionWise(Layer):
    """A layer on (d,) or (T, d) that acts on the last axis alone: `check(params, x)` validates
    one example (d = `width(params)`) and `map(params, x)` computes on any leading axes, so a
    batch (B, T, d) runs as one array (`forward_batch`) instead of a vmap over examples; on
    bfloat16 values on the CPU, in float32 (`kernels.in_float32_on_cpu`)."""

    def width(self, params) -> int:
        """The size d of the last input axis these params take."""
        return params["weight"].shape[0]

    def check(self, params, x):
        self.expect(x, (self.width(params),), ("T", self.width(params)))

    def forward(self, params, x, **side):
        self.check(params, x)
        return kernels.in_float32_on_cpu(self.map, params, x)

    def forward_batch(self, params, xs, **side):
        self.check(params, example_spec(xs))
        return kernels.in_float32_on_cpu(self.map, params, xs)


@layerclass
class Dense(PositionWise):
    """y = W x + b.  Type: (..., d) → (..., out).  Params: weight (d, out), bias (out,)."""

    out: int
    use_bias: bool = True

    def init_params(self, key, spec, **side):
        self.expect(spec, ("d",), ("T", "d"))
        params = {"weight": lecun_normal(key, (spec.shape[-1], self.out), jnp.float32)}
        if self.use_bias:
            params["bias"] = jnp.zeros((self.out,), jnp.float32)
        return params

    def map(self, params, x):
        return affine(params, x)


@layerclass
class FeedForward(PositionWise):
    """FeedForward(x) = activation(W x + b) — one step of processing in the notes.

    Type: (d,) → (out,) (also (T, d) → (T, out), position-wise). Params: weight (d, out),
    bias (out,) unless use_bias=False. Activations: `dp.ACTIVATIONS` ("gelu" is exact,
    x Φ(x); "gelu_tanh" its tanh approximation).
    """

    out: int
    activation: str = "relu"
    use_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        activation_fn(self.activation, "FeedForward")

    def init_params(self, key, spec, **side):
        self.expect(spec, ("d",), ("T", "d"))
        return Dense(self.out, self.use_bias).init_params(key, spec)

    def map(self, params, x):
        if self.activation == "relu" and "bias" in params:
            return kernels.relu_affine(x, params["weight"], params["bias"])
        return activation_fn(self.activation)(affine(params, x))


@layerclass
class GatedFeedForward(PositionWise):
    """GatedFeedForward(x) = activation(W_gate x + b_gate) ⊗ (W_up x + b_up): a FeedForward whose
    output is gated by a second projection (GLU; with activation "silu", SwiGLU, Llama's).

    Type: (d,) → (out,) (also (T, d) → (T, out)). Params: gate, up, each {weight (d, out),
    bias (out,) unless use_bias=False}. The two products run as one.
    """

    out: int
    activation: str = "silu"
    use_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        activation_fn(self.activation, "GatedFeedForward")

    def init_params(self, key, spec, **side):
        self.expect(spec, ("d",), ("T", "d"))
        kg, ku = jax.random.split(key)
        return {"gate": Dense(self.out, self.use_bias).init_params(kg, spec),
                "up": Dense(self.out, self.use_bias).init_params(ku, spec)}

    def width(self, params):
        return params["gate"]["weight"].shape[0]

    def map(self, params, x):
        both = {k: jnp.concatenate([params["gate"][k], params["up"][k]], -1) for k in params["gate"]}
        gate, up = jnp.split(affine(both, x), 2, -1)
        return activation_fn(self.activation)(gate) * up


@layerclass
class Activation(Layer):
    """y = activation(x), element-wise (softmax: over the last axis). Type: shape → shape."""

    fn: str

    def __post_init__(self):
        activation_fn(self.fn, "Activation")

    def forward(self, params, x, **side):
        self.expect(x, *[("d",) * r for r in range(8)])
        return activation_fn(self.fn)(x)

    @property
    def name(self):
        return self.fn.capitalize()

    def __repr__(self):
        return self.fn.capitalize()


Relu, Sigmoid, Tanh, Gelu, Step, Softmax = (
    Activation(n) for n in ("relu", "sigmoid", "tanh", "gelu", "step", "softmax"))


@layerclass
class FlattenLayer(Layer):
    """Concatenate all axes of one example: (d1, ..., dk) → (d1·...·dk,)."""

    def forward(self, params, x, **side):
        return jnp.reshape(x, (-1,))

    @property
    def name(self):
        return "Flatten"

    def __repr__(self):
        return "Flatten"


Flatten = FlattenLayer()


@layerclass
class Dropout(Layer):
    """Zero each element with probability `rate` and scale the rest by 1/(1 - rate).

    Active only when `key=` is given (training); without a key it is the identity.
    Type: shape → shape.
    """

    rate: float


    def forward(self, params, x, *, key=None, **side):
        if key is None or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(key, 1.0 - self.rate, jnp.shape(x))
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


@layerclass
class LayerNorm(PositionWise):
    """y = scale ⊗ (x − mean(x)) / sqrt(var(x) + eps) + bias over the last axis.

    Type: (..., d) → (..., d). Params: scale (d,) = 1, bias (d,) = 0.
    """

    eps: float = 1e-5

    def init_params(self, key, spec, **side):
        self.expect(spec, ("d",), ("T", "d"))
        d = spec.shape[-1]
        return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}

    def width(self, params):
        return params["scale"].shape[0]

    def map(self, params, x):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * params["scale"] + params["bias"]

    def __repr__(self):
        return "LayerNorm" if self.eps == 1e-5 else f"LayerNorm(eps={self.eps})"


@layerclass
class RMSNorm(PositionWise):
    """y = scale ⊗ x / sqrt(mean(x²) + eps) over the last axis: LayerNorm without centring and
    without a bias (Llama's norm; `torch.nn.RMSNorm`). Type: (..., d) → (..., d).
    Params: scale (d,) = 1.
    """

    eps: float = 1e-6

    def init_params(self, key, spec, **side):
        self.expect(spec, ("d",), ("T", "d"))
        return {"scale": jnp.ones((spec.shape[-1],), jnp.float32)}

    def width(self, params):
        return params["scale"].shape[0]

    def map(self, params, x):
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * params["scale"]


def norm_field():
    """The `norm` field of a block that normalises (AddNorm, TransformerBlock, LanguageModel,
    Bert): a layer (..., d) → (..., d); left out, `LayerNorm(eps)` (see `set_norm`)."""
    return dataclasses.field(default=None, repr=False)


def set_norm(layer) -> None:
    """In `__post_init__`: a `norm` left out becomes `LayerNorm(layer.eps)`, a field value that
    `dp.walk` and `dp.rewrite` see (replace it to change every norm of the block)."""
    if layer.norm is None:
        object.__setattr__(layer, "norm", LayerNorm(layer.eps))
    elif not isinstance(layer.norm, Layer):
        raise LayerError(f"{type(layer).__name__}: norm must be a layer (e.g. dp.RMSNorm()), got {layer.norm!r}")


def norm_repr(layer) -> str:
    """", norm=..." when the norm is not the default LayerNorm(eps), else ""."""
    return "" if layer.norm == LayerNorm(layer.eps) else f", norm={layer.norm!r}"
