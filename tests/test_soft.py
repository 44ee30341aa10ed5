"""Soft programming constructs and the identities the notes state."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffprog as dp
from helpers import fit
from diffprog import soft

sigma = jax.nn.sigmoid


def test_soft_if_is_elementwise_blend(key):
    g = jnp.array([0.0, 1.0, 0.25])
    T, F = jnp.array([1.0, 2.0, 3.0]), jnp.array([10.0, 20.0, 30.0])
    chex.assert_trees_all_close(soft.soft_if(g, T, F), jnp.array([10.0, 2.0, 0.25 * 3 + 0.75 * 30]))


def test_soft_if_is_the_two_case_switch(key):
    g = jax.random.uniform(key, ())
    T, F = jax.random.normal(key, (2, 5))
    chex.assert_trees_all_close(soft.soft_if(g, T, F), soft.soft_switch(jnp.stack([g, 1 - g]), jnp.stack([T, F])), atol=1e-6)
    z = jnp.float32(0.7)  # same with temperature: σ(z/τ) vs softmax([z, 0]/τ)
    chex.assert_trees_all_close(soft.soft_if(sigma(z), T, F, temperature=0.3),
                                soft.soft_switch(jax.nn.softmax(jnp.array([z, 0.0])), jnp.stack([T, F]), temperature=0.3), atol=1e-5)
    with pytest.raises(dp.LayerError, match="expected a mask of 2 cases"):
        soft.soft_switch(jnp.ones(3) / 3, jnp.stack([T, F]))


def test_gate_gradients_match_the_notes(key):
    x, y, r = jax.random.normal(key, (3, 4))
    dx, dy, dr = jax.grad(lambda x, y, r: soft.gate(x, y, r).sum(), argnums=(0, 1, 2))(x, y, r)
    chex.assert_trees_all_close(dx, sigma(r), atol=1e-6)
    chex.assert_trees_all_close(dy, 1 - sigma(r), atol=1e-6)
    chex.assert_trees_all_close(dr, (x - y) * sigma(r) * (1 - sigma(r)), atol=1e-6)
    jax.test_util.check_grads(soft.gate, (x, y, r), order=2)


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_soft_lookup_is_softmax_weighted_sum(score, key):
    kq, kk, kv = jax.random.split(key, 3)
    q, keys, values = jax.random.normal(kq, (4,)), jax.random.normal(kk, (6, 4)), jax.random.normal(kv, (6, 3))
    layer = soft.score_layer(score)
    p = layer.init(key, (q, keys))
    if score == "dot":
        s = keys @ q
    elif score == "general":
        s = jnp.array([q @ p["W"] @ k for k in keys])
    else:
        s = jnp.array([p["v"] @ jnp.tanh(jnp.concatenate([p["W_q"], p["W_k"]]).T @ jnp.concatenate([q, k])) for k in keys])
    out, w = soft.soft_lookup(q, keys, values, score=score, params=p, return_weights=True)
    chex.assert_trees_all_close(w, jax.nn.softmax(s), atol=1e-5)
    chex.assert_trees_all_close(out, jax.nn.softmax(s) @ values, atol=1e-5)
    jax.test_util.check_grads(lambda p, q: soft.soft_lookup(q, keys, values, score=score, params=p), (p, q), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    lookup = dp.SoftLookup(score)
    chex.assert_trees_all_close(lookup(lookup.init(key, (q, keys, values)), (q, keys, values)).shape, (3,))


def test_exact_key_is_retrieved_as_temperature_drops(key):
    keys = jnp.eye(5) * 3
    values = jnp.arange(5.0)[:, None] * jnp.ones((5, 2))
    errors = [float(jnp.abs(soft.soft_lookup(keys[3], keys, values, temperature=t) - 3.0).max()) for t in (8.0, 2.0, 0.05)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_temperature_approaches_hard_choice(key):
    z = jax.random.normal(key, (6,))
    g = sigma(z)
    hard = (z > 0).astype(jnp.float32)
    gaps = [float(jnp.abs(soft.sharpen_gate(g, t) - hard).max()) for t in (1.0, 0.1, 0.01)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3
    chex.assert_trees_all_close(soft.sharpen_gate(g, 0.3), sigma(z / 0.3), atol=1e-5)
    m = jax.nn.softmax(z)
    chex.assert_trees_all_close(soft.sharpen_mask(m, 0.3), jax.nn.softmax(z / 0.3), atol=1e-5)
    one_hot = jax.nn.one_hot(jnp.argmax(z), 6)
    assert float(jnp.abs(soft.sharpen_mask(m, 0.01) - one_hot).max()) < 1e-3


def test_hard_mode_is_straight_through(key):
    T, F = jnp.array([1.0, 2.0]), jnp.array([5.0, 7.0])
    g = jnp.array([0.7, 0.2])
    chex.assert_trees_all_equal(soft.soft_if(g, T, F, hard=True), jnp.array([1.0, 7.0]))
    hard_grad = jax.grad(lambda g: soft.soft_if(g, T, F, hard=True).sum())(g)
    soft_grad = jax.grad(lambda g: soft.soft_if(g, T, F).sum())(g)
    chex.assert_trees_all_close(hard_grad, soft_grad)
    C = jnp.array([[1.0], [2.0], [3.0]])
    m = jnp.array([0.2, 0.5, 0.3])
    chex.assert_trees_all_equal(soft.soft_switch(m, C, hard=True), jnp.array([2.0]))
    chex.assert_trees_all_close(jax.grad(lambda m: soft.soft_switch(m, C, hard=True).sum())(m), C[:, 0])


def test_notes_identities(key):
    x = jax.random.normal(key, (50,)) * 5
    chex.assert_trees_all_close(jax.vmap(lambda v: jax.nn.softmax(jnp.array([0.0, v]))[1])(x), sigma(x), atol=1e-6)
    x = jnp.where(jnp.abs(x) < 1e-3, 1.0, x)
    chex.assert_trees_all_equal(jax.vmap(jax.grad(jax.nn.relu))(x), dp.step(x))  # step = ReLU'
    logits = jax.random.normal(key, (7,))
    chex.assert_trees_all_close(jax.nn.softmax(logits + 123.0), jax.nn.softmax(logits), atol=1e-6)
    big = jnp.array([1e4, 0.0, -1e4])
    chex.assert_tree_all_finite(jax.nn.softmax(big))
    chex.assert_trees_all_close(jax.nn.softmax(big), jnp.array([1.0, 0.0, 0.0]))


def test_max_backward_routes_gradient_to_the_argmax(key):
    x = jnp.array([0.3, 2.0, 1.0, 2.0]) + 1e-3 * jax.random.normal(key, (4,))  # noise breaks the tie
    g = jax.grad(jnp.max)(x)
    chex.assert_trees_all_equal(g, jax.nn.one_hot(jnp.argmax(x), 4))
    # Exact ties (documented): jnp.max splits the gradient equally among the tied maxima.
    chex.assert_trees_all_close(jax.grad(jnp.max)(jnp.array([0.3, 2.0, 1.0, 2.0])), jnp.array([0, 0.5, 0, 0.5]))


def test_gated_and_switch_layers_compose_and_learn(key):
    """Learn y = x if x₀ > 0 else −x with a Gated layer; a Switch picks among three maps."""
    gated = dp.Gated(dp.Dense(3), dp.Dense(3), dp.Dense(1))
    model = dp.Dense(3) @ gated ** 2
    assert repr(model) == "Dense(3) ∘ Gated(Dense(3), Dense(3), Dense(1))^2"
    pm = model.init(key, jnp.ones(3))
    chex.assert_shape(pm["0_Gated^n"]["stack"]["condition"]["weight"], (2, 3, 1))
    one = jax.tree.map(lambda a: a[0], pm["0_Gated^n"]["stack"])
    two = jax.tree.map(lambda a: a[1], pm["0_Gated^n"]["stack"])
    chex.assert_trees_all_close(model(pm, jnp.ones(3)), dp.Dense(3)(pm["1_Dense"], gated(two, gated(one, jnp.ones(3)))), atol=1e-6)
    x = jax.random.normal(key, (256, 3))
    y = jnp.where(x[:, :1] > 0, x, -x)
    net = dp.batched(dp.Gated(dp.Dense(3), dp.Dense(3), dp.Dense(1)))
    p = net.init(key, x)
    loss = lambda p, _: jnp.mean((net(p, x) - y) ** 2)
    first = loss(p, 0)
    p, l = fit(loss, p, optax.adam(0.05), 300)
    assert l < 0.05 * first
    sw = dp.Switch((dp.Dense(2), dp.Dense(2), dp.Tanh @ dp.Dense(2)), dp.Dense(3))
    ps = sw.init(key, jnp.ones(4))
    assert set(ps["cases"]) == {"0_Dense", "1_Dense", "2_serial"}
    g = jax.nn.softmax(sw.selector(ps["selector"], jnp.ones(4)))
    cases = jnp.stack([c(ps["cases"][n], jnp.ones(4)) for n, c in zip(["0_Dense", "1_Dense", "2_serial"], sw.cases)])
    chex.assert_trees_all_close(sw(ps, jnp.ones(4)), g @ cases, atol=1e-6)
    once = (sw ** 1).init(key, jnp.ones(4))  # Switch changes the shape: its params are "first", a stack of none
    chex.assert_trees_all_close((sw ** 1)(once, jnp.ones(4)), sw(once["first"], jnp.ones(4)))


def test_docs_examples_run():
    """Every python block of docs/soft_programming.md runs as written."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).parent.parent / "docs" / "soft_programming.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    namespace = {}
    for block in blocks:
        exec(block, namespace)
