"""A small training problem shared by the trainer tests (also run as a subprocess script).

python tests/train_toy.py WORKDIR STEPS CHECKPOINT_EVERY [--hang-after N]
prints the JSON list of losses; with --hang-after the data function blocks after step N.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import optax

import diffprog as dp

MODEL = dp.Dense(1) @ dp.Dropout(0.1) @ dp.FeedForward(16, activation="tanh") ** 2
OPTIMIZER = optax.adam(1e-2)  # one object: the trainer tests share one compiled step


def data(step, hang_after=None):
    if hang_after is not None and step > hang_after:
        time.sleep(600)
    key = jax.random.fold_in(jax.random.key(42), step)
    x = jax.random.normal(key, (8, 4))
    return {"inputs": x, "targets": jnp.tanh(x @ jnp.array([[1.0], [-1.0], [0.5], [0.2]]))}


def loss(outputs, batch):
    return dp.metrics.mse(outputs, batch["targets"])


def run(workdir, steps, checkpoint_every=0, resume=False, hang_after=None, **kw):
    return dp.train(MODEL, loss, OPTIMIZER, lambda s: data(s, hang_after), steps=steps,
                    workdir=workdir, checkpoint_every=checkpoint_every, resume=resume, quiet=True,
                    log_every=1, seed=3, **kw)


if __name__ == "__main__":
    args = sys.argv[1:]
    workdir, steps, every = args[0], int(args[1]), int(args[2])
    hang = int(args[args.index("--hang-after") + 1]) if "--hang-after" in args else None
    result = run(workdir, steps, every, resume="--resume" in args, hang_after=hang)
    print(json.dumps([h["loss"] for h in result.history if "loss" in h]))
