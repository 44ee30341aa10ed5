"""Losses and evaluation metrics over a batch: cross-entropy (nats, bits), accuracy, exact match,
perplexity, mean squared error. `mask` (same shape as targets) marks the positions that count.

Shapes must match exactly — predictions and targets of MSE, the leading axes of logits and
targets, and the mask with the targets — or the metric raises `dp.ArgumentError` (a ValueError):
broadcasting (B, 1) against (B,) would silently average a (B, B) matrix.
A target id outside [0, classes) at a counted position is an error too; under `jit`, where ids
are not known, the metric is NaN instead (a loss that `dp.train` stops on, naming the step).
Positions the mask leaves out may hold any id (e.g. -100 for padding)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .core import ArgumentError


def _check(function, targets, mask, **shapes):
    """Each named array's shape (given as {name: (shape, what it must equal)}) and the mask's."""
    for name, (got, want) in shapes.items():
        if tuple(got) != tuple(want):
            raise ArgumentError(f"{function}: expected {name} {tuple(want)}, got {tuple(got)}")
    if mask is not None and np.shape(mask) != np.shape(targets):
        raise ArgumentError(f"{function}: expected mask shaped like targets {np.shape(targets)}, "
                            f"got {np.shape(mask)}")


def _check_logits(function, logits, targets, mask):
    """Shapes and dtypes, then the ids: returns the counted positions whose id is outside
    [0, classes) (raising on concrete ones)."""
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise ArgumentError(f"{function}: expected integer class targets, got {jnp.result_type(targets)}")
    _check(function, targets, mask, **{"logits (..., classes) whose leading axes are the targets'": (np.shape(logits)[:-1], np.shape(targets))})
    classes = np.shape(logits)[-1]
    outside = (targets < 0) | (targets >= classes)
    if mask is not None:
        outside = outside & mask.astype(bool)
    if not isinstance(outside, jax.core.Tracer) and outside.any():
        raise ArgumentError(f"{function}: expected target ids in [0, {classes}) at the counted positions, got "
                            f"{np.unique(np.asarray(targets)[np.asarray(outside)]).tolist()[:5]}")
    return outside


def _mean(values, mask, outside=None):
    """The mean over the counted positions; NaN if any of them has an id outside the classes."""
    if outside is not None:
        values = jnp.where(outside, jnp.nan, values)
    if mask is None:
        return values.mean()
    mask = mask.astype(bool)
    return jnp.where(mask, values, 0).sum() / jnp.maximum(mask.sum(), 1)


def cross_entropy(logits, targets, mask=None):
    """Mean −log softmax(logits)[target], in nats. logits (..., vocab), targets int (...)."""
    outside = _check_logits("cross_entropy", logits, targets, mask)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return _mean(losses, mask, outside)


def bits(nats):
    """Nats → bits (per token / per character)."""
    return nats / np.log(2.0)


def perplexity(nats):
    """exp(cross-entropy in nats)."""
    return jnp.exp(nats)


def accuracy(logits, targets, mask=None):
    """Fraction of positions whose argmax equals the target."""
    outside = _check_logits("accuracy", logits, targets, mask)
    return _mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32), mask, outside)


def exact_match(logits, targets, mask=None):
    """Fraction of sequences (leading axis) whose every counted position is right.
    logits (B, T, vocab), targets (B, T)."""
    outside = _check_logits("exact_match", logits, targets, mask)
    right = jnp.argmax(logits, -1) == targets
    if mask is not None:
        right = right | ~mask.astype(bool)
    return jnp.where(outside.any(), jnp.nan, right.reshape(right.shape[0], -1).all(-1).astype(jnp.float32).mean())


def mse(predictions, targets, mask=None):
    """Mean squared error; predictions and targets of one shape."""
    _check("mse", targets, mask, **{"predictions shaped like the targets": (np.shape(predictions), np.shape(targets))})
    return _mean(jnp.square(predictions.astype(jnp.float32) - targets), mask)
