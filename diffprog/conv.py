"""Convolution and pooling over one channels-last example: (W, C) for 1-D, (H, W, C) for 2-D."""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

from .basic import lecun_normal
from .core import Layer, LayerError, layerclass

Padding = Union[str, tuple]


def _spatial_patterns(n_channels="C"):
    return ("W", n_channels), ("H", "W", n_channels)


def _tuple(v, n, layer=None, name=""):
    """v as a tuple of n entries (an int is repeated); a tuple of another length is a LayerError:
    its rank must be the input's spatial rank."""
    if not isinstance(v, (tuple, list)):
        return (v,) * n
    if len(v) != n:
        raise LayerError(f"{layer!r}: {name} {tuple(v)} has {len(v)} entries, but the input has {n} spatial "
                         f"{'axes' if n > 1 else 'axis'}")
    return tuple(v)


@layerclass
class Conv(Layer):
    """Sweep `features` filters of size `kernel` over the input volume (cross-correlation).

    y[p, o] = b[o] + Σ_{Δ, c} K[Δ, c, o] · x[stride·p + Δ, c]
    Type: (W, C) → (W', features) or (H, W, C) → (H', W', features); the input rank picks
    1-D or 2-D. `padding` is 'SAME', 'VALID' or explicit ((lo, hi), ...) per spatial axis.
    Params: kernel (*kernel, C, features) (HWIO), bias (features,). On bfloat16 or float16
    inputs the sums accumulate in float32 and the bias is added before the one rounding to the
    input's dtype (as cuDNN's and the TPU's convolutions do): a CPU without bfloat16 hardware
    runs a float32 convolution instead of emulating bfloat16, and the bias gradient, a sum over
    every position, is summed in float32.
    """

    features: int
    kernel: Union[int, tuple] = 3
    stride: Union[int, tuple] = 1
    padding: Padding = "SAME"

    def init_params(self, key, spec, **side):
        self.expect(spec, *_spatial_patterns())
        n = len(spec.shape) - 1
        shape = _tuple(self.kernel, n, self, "kernel") + (spec.shape[-1], self.features)
        return {"kernel": lecun_normal(key, shape, jnp.float32),
                "bias": jnp.zeros((self.features,), jnp.float32)}

    def forward(self, params, x, **side):
        kernel = params["kernel"]
        n = kernel.ndim - 2
        self.expect(x, _spatial_patterns(kernel.shape[-2])[n - 1])
        dims = ("WC", "WIO", "WC") if n == 1 else ("HWC", "HWIO", "HWC")
        padding = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))
        narrow = x.dtype in (jnp.bfloat16, jnp.float16)
        y = jax.lax.conv_general_dilated(
            x[None], kernel.astype(x.dtype), _tuple(self.stride, n, self, "stride"), padding,
            dimension_numbers=("N" + dims[0], dims[1], "N" + dims[2]),
            preferred_element_type=jnp.float32 if narrow else None)[0]
        if 0 in y.shape:
            raise LayerError(f"{self!r}: kernel {tuple(kernel.shape[:n])} with padding {self.padding!r} leaves no "
                             f"output on input {tuple(x.shape)} (got {tuple(y.shape)}); use padding='SAME' or a smaller kernel")
        return (y + params["bias"]).astype(jnp.promote_types(x.dtype, params["bias"].dtype))


@layerclass
class _Pool(Layer):
    """Reduce each window of `window` positions per channel. Type: (W, C) → (W', C),
    (H, W, C) → (H', W', C). When stride == window, padding is 'VALID' and the window divides
    the input, the volume is folded with a reshape and reduced along the new axes, as the
    notes describe; otherwise `lax.reduce_window` is used. No parameters."""

    window: Union[int, tuple]
    stride: Union[int, tuple, None] = None
    padding: Padding = "VALID"

    def forward(self, params, x, **side):
        self.expect(x, *_spatial_patterns())
        n = x.ndim - 1
        window = _tuple(self.window, n, self, "window")
        stride = window if self.stride is None else _tuple(self.stride, n, self, "stride")
        if any(w > s for w, s in zip(window, x.shape)) and self.padding == "VALID":
            raise LayerError(f"{self!r}: window {window} is larger than the input {x.shape}")
        if self.folds(x.shape, window, stride):
            return self.fold(x, window)
        return self.sliding(x, window, stride)

    def folds(self, shape, window, stride):
        return (window == stride and self.padding == "VALID"
                and all(s % w == 0 for s, w in zip(shape, window)))

    @staticmethod
    def folded(x, window):
        """View (H, W, C) as (H/wh, wh, W/ww, ww, C); returns it and the window axes."""
        shape, axes = [], []
        for size, w in zip(x.shape[:-1], window):
            shape += [size // w, w]
            axes.append(len(shape) - 1)
        return x.reshape(shape + [x.shape[-1]]), tuple(axes)

    def fold(self, x, window):
        folded, axes = self.folded(x, window)
        return self.reduce(folded, axis=axes)

    def window_reduce(self, x, window, stride, init, op):
        return jax.lax.reduce_window(x, init, op, window + (1,), stride + (1,), self.padding)


@layerclass
class MaxPool(_Pool):
    __doc__ = "Max over each window (the notes' max pooling). " + _Pool.__doc__
    reduce = staticmethod(jnp.max)

    def sliding(self, x, window, stride):
        return self.window_reduce(x, window, stride, -jnp.inf, jax.lax.max)


@layerclass
class AvgPool(_Pool):
    __doc__ = "Mean over each window. " + _Pool.__doc__
    reduce = staticmethod(jnp.mean)

    def sliding(self, x, window, stride):
        total = self.window_reduce(x, window, stride, 0.0, jax.lax.add)
        return total / self.window_reduce(jnp.ones_like(x), window, stride, 0.0, jax.lax.add)
