"""Losses and evaluation metrics over a batch: cross-entropy (nats, bits), accuracy, exact match,
perplexity, mean squared error. `mask` (same shape as targets) marks the positions that count."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax


def _mean(values, mask):
    if mask is None:
        return values.mean()
    mask = mask.astype(values.dtype)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1)


def cross_entropy(logits, targets, mask=None):
    """Mean −log softmax(logits)[target], in nats. logits (..., vocab), targets int (...)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return _mean(losses, mask)


def bits(nats):
    """Nats → bits (per token / per character)."""
    return nats / np.log(2.0)


def perplexity(nats):
    """exp(cross-entropy in nats)."""
    return jnp.exp(nats)


def accuracy(logits, targets, mask=None):
    """Fraction of positions whose argmax equals the target."""
    return _mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32), mask)


def exact_match(logits, targets, mask=None):
    """Fraction of sequences (leading axis) whose every counted position is right.
    logits (B, T, vocab), targets (B, T)."""
    right = jnp.argmax(logits, -1) == targets
    if mask is not None:
        right = right | ~mask.astype(bool)
    return right.reshape(right.shape[0], -1).all(-1).astype(jnp.float32).mean()


def mse(predictions, targets, mask=None):
    """Mean squared error."""
    return _mean(jnp.square(predictions.astype(jnp.float32) - targets), mask)
