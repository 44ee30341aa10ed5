"""The notes' Conv / MaxPool / FeedForward composition on the 8×8 handwritten digits that
ship with scikit-learn (pip install -e ".[vision]").

    python -m experiments.vision [--epochs 30]

Model: FeedForward(10, identity) ∘ FeedForward(64) ∘ Flatten ∘ MaxPool(2) ∘ Conv(32)^2 ∘ Conv(16)
on (8, 8, 1) images; 75/25 stratified split; reports test accuracy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffprog as dp

from .common import at_least, markdown_table, parser, run_dir, save_config, save_json

MODEL = (dp.FeedForward(10, activation="identity") @ dp.FeedForward(64) @ dp.Flatten
         @ dp.MaxPool(2) @ dp.Conv(32) ** 2 @ dp.Conv(16))


def load_digits():
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit("experiments.vision needs scikit-learn: pip install -e '.[vision]'") from e
    digits = sk_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return train_test_split(x, digits.target.astype(np.int32), test_size=0.25, random_state=0, stratify=digits.target)


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=at_least(1), default=30)
    p.add_argument("--batch_size", type=at_least(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = run_dir("vision", args.out)
    save_config(out, {**vars(args), "model": repr(MODEL)})
    x_train, x_test, y_train, y_test = load_digits()
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    per_epoch = len(x_train) // args.batch_size
    steps = args.epochs * per_epoch

    @jax.jit
    def data(step):
        epoch, i = step // per_epoch, step % per_epoch
        order = jax.random.permutation(jax.random.fold_in(jax.random.key(args.seed), epoch), len(x_train))
        take = jax.lax.dynamic_slice_in_dim(order, i * args.batch_size, args.batch_size)
        return {"inputs": x_train[take], "targets": y_train[take]}

    dp.summary(MODEL, x_train[0])
    test = [{"inputs": jnp.asarray(x_test), "targets": jnp.asarray(y_test)}]
    result = dp.train(MODEL, lambda o, b: dp.metrics.cross_entropy(o, b["targets"]), optax.adam(2e-3), data,
                      steps=steps, seed=args.seed, eval_data=test, eval_every=per_epoch * 5,
                      eval_metrics={"accuracy": lambda o, b: dp.metrics.accuracy(o, b["targets"])},
                      description="vision")
    evals = [h for h in result.history if "eval_accuracy" in h]
    accuracy = evals[-1]["eval_accuracy"]
    save_json(out / "results.json", {"test_accuracy": accuracy, "evals": evals, "history": result.history})
    print(markdown_table(["model", "test accuracy"], [[repr(MODEL), f"{accuracy:.4f}"]]))
    print(f"\nResults: {out}")
    return accuracy


if __name__ == "__main__":
    main()
