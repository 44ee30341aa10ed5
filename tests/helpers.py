"""Shared by the tests: training something small, comparing a causal LM with `transformers`."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffprog as dp


def fit(loss, params, optimizer, steps, until=None, every=50):
    """Minimise loss(params, step) with an optax optimiser, one jit-compiled step at a time, for
    `steps` steps, or until `until(params)` holds (checked every `every` steps).
    Returns (params, the last step's loss)."""
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, i):
        value, grads = jax.value_and_grad(loss)(params, i)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, value
    value = None
    for i in range(steps):
        params, state, value = step(params, state, i)
        if until is not None and (i + 1) % every == 0 and until(params):
            break
    return params, value


def assert_causal_lm_equals(model, params, reference, ids, steps: int):
    """`model` (a dp causal LM) computes what the `transformers` model `reference` computes: the
    logits of every prefix of ids (B, T) to 1e-5, and `steps` greedy tokens after ids[:, :6]."""
    import torch
    with torch.no_grad():
        logits = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(dp.batched(model)(params, jnp.asarray(ids)), logits, atol=1e-5, rtol=1e-5)
    prompt = ids[:, :6]
    with torch.no_grad():
        theirs = reference.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                    do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    np.testing.assert_array_equal(dp.generate(model, params, prompt, steps), theirs[:, 6:].numpy())
