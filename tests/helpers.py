"""Shared by the tests that train something small."""
import jax
import optax


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
