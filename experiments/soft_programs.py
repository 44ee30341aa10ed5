"""Learn a soft `if`, a soft `switch` and a soft lookup from data, and watch the gates sharpen.

    python -m experiments.soft_programs [--steps 400]

Each program has learnable conditions and is trained three ways: soft (τ = 1), annealed
(τ from 1 down to 0.05) and hard (straight-through one-hot choices). Reports the held-out error
of each when run with HARD choices, and plots how far the gates are from 0/1 over training.
  if:     y = x if w·x > 0 else −x           (gate = σ(w·x + b))
  switch: y = case_c(x), c = argmax(W x)      (3 cases: x, 2x, −x; mask = softmax(W x + b))
  lookup: y = value of the key nearest q      (soft_lookup with a "general" score)
The lookup's keys have unit length, so the nearest key is the one with the largest q·k and the
"general" score qᵀ W k can express the rule (W = a large multiple of I); with keys of different
lengths it could not, for nearness also depends on ‖k‖².
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffprog as dp
from diffprog import soft

from .common import at_least, markdown_table, parser, run_dir, save_config, save_json

DIRECTION = jnp.array([1.0, -2.0, 0.5, 1.5])
SWITCH = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])


def if_program(params, x, temperature, hard):
    g = jax.nn.sigmoid(x @ params["w"] + params["b"])
    return soft.soft_if(g, x, -x, temperature=temperature, hard=hard), g


def switch_program(params, x, temperature, hard):
    mask = jax.nn.softmax(params["W"] @ x + params["b"])
    cases = jnp.stack([x, 2 * x, -x])
    return soft.soft_switch(mask, cases, temperature=temperature, hard=hard), mask


KEYS = jax.random.normal(jax.random.key(7), (6, 4))
KEYS = KEYS / jnp.linalg.norm(KEYS, axis=-1, keepdims=True)  # unit keys: the nearest is the most similar
VALUES = jnp.arange(6.0)[:, None]


def lookup_program(params, q, temperature, hard):
    y, weights = soft.soft_lookup(q, KEYS, VALUES, score="general", params=params,
                                  temperature=temperature, hard=hard, return_weights=True)
    return y, weights


def targets(name, x):
    if name == "if":
        return jnp.where((x @ DIRECTION > 0)[:, None], x, -x)
    if name == "switch":
        c = jnp.argmax(x @ SWITCH.T, -1)
        return jnp.stack([x, 2 * x, -x])[c, jnp.arange(x.shape[0])]
    nearest = jnp.argmin(((x[:, None] - KEYS[None]) ** 2).sum(-1), -1)
    return VALUES[nearest]


PROGRAMS = {"if": if_program, "switch": switch_program, "lookup": lookup_program}


def init(name, key):
    if name == "if":
        return {"w": 0.1 * jax.random.normal(key, (4,)), "b": jnp.zeros(())}
    if name == "switch":
        return {"W": 0.1 * jax.random.normal(key, (3, 4)), "b": jnp.zeros(3)}
    return soft.score_layer("general").init(key, (KEYS[0], KEYS))


def inputs(name, key, n):
    if name == "lookup":  # queries near one of the keys
        which = jax.random.randint(key, (n,), 0, 6)
        return KEYS[which] + 0.3 * jax.random.normal(jax.random.fold_in(key, 1), (n, 4))
    return jax.random.normal(key, (n, 4))


def sharpness(choice):
    """Mean distance of the choice weights from the nearest hard choice (0 = one-hot)."""
    if choice.ndim == 1:  # a gate per example
        return jnp.minimum(choice, 1 - choice).mean()
    return (1 - choice.max(-1)).mean()


def train(name, mode, steps, seed):
    program = PROGRAMS[name]
    params = init(name, jax.random.key(seed))
    opt = optax.adam(0.05)
    state = opt.init(params)
    test_x = inputs(name, jax.random.key(999), 1000)
    test_y = targets(name, test_x)

    def loss(params, x, y, temperature, hard):
        pred, _ = jax.vmap(lambda x: program(params, x, temperature, hard))(x)
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def step(params, state, key, temperature):
        x = inputs(name, key, 128)
        l, g = jax.value_and_grad(loss)(params, x, targets(name, x), temperature, mode == "hard")
        u, state = opt.update(g, state)
        return optax.apply_updates(params, u), state, l

    curve = []
    for i in range(steps):
        temperature = 1.0 if mode != "annealed" else float(0.05 ** (i / max(steps - 1, 1)))
        params, state, l = step(params, state, jax.random.fold_in(jax.random.key(seed), i), temperature)
        if i % max(steps // 40, 1) == 0 or i == steps - 1:
            _, choice = jax.vmap(lambda x: program(params, x, 1.0, False))(test_x)
            curve.append((i, float(sharpness(choice)), float(l)))
    hard_error = float(loss(params, test_x, test_y, 1.0, True))
    return {"program": name, "mode": mode, "hard_test_mse": hard_error, "curve": curve}


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=at_least(1), default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = run_dir("soft_programs", args.out)
    save_config(out, vars(args))
    from tqdm.auto import tqdm
    runs = [train(n, m, args.steps, args.seed)
            for n, m in tqdm([(n, m) for n in PROGRAMS for m in ("soft", "annealed", "hard")], desc="soft_programs")]
    save_json(out / "results.json", {"runs": runs})
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, name in zip(axes, PROGRAMS):
        for r in runs:
            if r["program"] == name:
                steps, gap, _ = zip(*r["curve"])
                ax.plot(steps, gap, label=r["mode"])
        ax.set(title=f"soft {name}", xlabel="step", ylabel="distance of the choice from one-hot")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "sharpening.png", dpi=110)
    rows = [[r["program"], r["mode"], f"{r['hard_test_mse']:.4f}", f"{r['curve'][0][1]:.3f} → {r['curve'][-1][1]:.3f}"] for r in runs]
    print(markdown_table(["program", "training", "test MSE with hard choices", "choice softness"], rows))
    print(f"\nResults and plot: {out}")
    return runs


if __name__ == "__main__":
    main()
