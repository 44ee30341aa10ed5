"""Sequence helpers shared by recurrent and attention layers, and Collapse: (T, d) → (d,)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .core import Layer, LayerError, layerclass


def check_sequence(layer: Layer, x, features=None, dtype="float") -> int:
    """Check that `x` is a non-empty (T, features) sequence; return T."""
    layer.expect(x, ("T", "d" if features is None else features), dtype=dtype)
    if x.shape[0] == 0:
        raise LayerError(f"{layer!r}: expected a non-empty sequence, got {tuple(x.shape)}")
    return x.shape[0]


def check_lengths(layer: Layer, lengths, steps: int, batch: int | None = None):
    """Validate a `lengths=` side input: the number of valid steps of one example (a scalar),
    or of each of `batch` examples (shape (batch,)).

    Values lie in [0, T]; 0 is an empty sequence (a recurrent layer keeps its initial state and
    outputs zeros, attention reads no key and outputs 0, Collapse gives the zero vector).
    Concrete values outside [0, T] are an error; traced ones (under jit) are clipped into it.
    """
    if lengths is None:
        return None
    shape = () if batch is None else (batch,)
    if np.shape(lengths) != shape or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise LayerError(f"{layer!r}: expected lengths= to be one int per example (shape {shape}), "
                         f"got shape {np.shape(lengths)} {jnp.result_type(lengths)}")
    if not isinstance(lengths, jax.core.Tracer):
        bad = [int(n) for n in np.ravel(lengths) if not 0 <= n <= steps]
        if bad:
            raise LayerError(f"{layer!r}: expected lengths in [0, {steps}], got {bad[0]}")
    return jnp.clip(lengths, 0, steps)


def valid_steps(steps: int, lengths) -> jax.Array:
    """Boolean (T,): True for the first `lengths` steps (all True when lengths is None)."""
    t = jnp.arange(steps)
    return t >= 0 if lengths is None else t < lengths


@layerclass
class Collapse(Layer):
    """Summarise a sequence with one vector: Collapse : (T, d) → (d,).

    mode "first": x_1;  "last": x_L;  "mean": (1/L) Σ_{t ≤ L} x_t, where L = `lengths=` (the
    number of valid steps, default T), so padding never leaks into the summary. An empty
    sequence (L = 0) collapses to the zero vector in every mode.
    """

    mode: str = "mean"
    side_inputs = frozenset({"lengths"})

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("first", "last", "mean"):
            raise LayerError(f"Collapse({self.mode!r}): mode must be 'first', 'last' or 'mean'")

    def forward(self, params, x, *, key=None, lengths=None):
        steps = check_sequence(self, x)
        lengths = check_lengths(self, lengths, steps)
        if lengths is None:
            return x[0] if self.mode == "first" else x[-1] if self.mode == "last" else x.mean(0)
        if self.mode == "first":
            summary = x[0]
        elif self.mode == "last":
            summary = x[jnp.maximum(lengths - 1, 0)]
        else:
            mask = valid_steps(steps, lengths)[:, None]
            summary = jnp.where(mask, x, 0).sum(0) / jnp.maximum(mask.sum(), 1)
        return jnp.where(lengths > 0, summary, jnp.zeros_like(summary))

    def __repr__(self):
        return f"Collapse({self.mode!r})"
