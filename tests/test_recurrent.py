"""Recurrent layers against the notes' equations, variable lengths, Collapse, PyTorch parity."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import diffprog as dp
from diffprog import kernels
from helpers import fit

sigmoid = jax.nn.sigmoid
LAYERS = [dp.SimpleRNN(5), dp.LSTM(5), dp.GRU(5)]


def xs_(key, T=7, d=3):
    return jax.random.normal(key, (T, d))


def test_simple_rnn_equation(key):
    xs = xs_(key)
    rnn = dp.SimpleRNN(5, return_state=True)
    p = rnn.init(key, xs)
    h, expected = jnp.zeros(5), []
    for x in xs:
        h = jnp.tanh(p["w_x"].T @ x + p["w_h"].T @ h + p["bias"])
        expected.append(h)
    ys, state = rnn(p, xs)
    chex.assert_trees_all_close(ys, jnp.stack(expected), atol=1e-5)
    chex.assert_trees_all_close(state["h"], h, atol=1e-5)


def test_lstm_equations_in_the_notes_terms(key):
    xs = xs_(key)
    lstm = dp.LSTM(5, return_gates=True, return_state=True)
    p = lstm.init(key, xs)
    assert set(p) == {"remember", "save", "focus", "candidate"}
    np.testing.assert_array_equal(p["remember"]["bias"], 1.0)  # "do not forget" at first
    np.testing.assert_array_equal(p["save"]["bias"], 0.0)
    gate = lambda g, x, h: p[g]["w_x"].T @ x + p[g]["w_h"].T @ h + p[g]["bias"]
    h, c = jnp.zeros(5), jnp.zeros(5)
    hs, cs, remembers = [], [], []
    for x in xs:
        remember, save, focus = (sigmoid(gate(g, x, h)) for g in ("remember", "save", "focus"))
        candidate = jnp.tanh(gate("candidate", x, h))
        c = remember * c + save * candidate
        h = focus * jnp.tanh(c)
        hs.append(h), cs.append(c), remembers.append(remember)
    ys, trace, state = lstm(p, xs)
    chex.assert_trees_all_close(ys, jnp.stack(hs), atol=1e-5)
    chex.assert_trees_all_close(trace["cell"], jnp.stack(cs), atol=1e-5)
    chex.assert_trees_all_close(trace["remember"], jnp.stack(remembers), atol=1e-5)
    chex.assert_trees_all_close(state, {"h": h, "c": c}, atol=1e-5)
    assert dp.LSTM(5, remember_bias=3.0).init(key, xs)["remember"]["bias"][0] == 3.0


def test_gru_equation(key):
    xs = xs_(key)
    gru = dp.GRU(5)
    p = gru.init(key, xs)
    p["candidate"]["bias_h"] = jnp.arange(5.0) / 10
    lin = lambda g, x, h: p[g]["w_x"].T @ x + p[g]["w_h"].T @ h + p[g]["bias"]
    h, expected = jnp.zeros(5), []
    for x in xs:
        r, z = sigmoid(lin("reset", x, h)), sigmoid(lin("update", x, h))
        n = jnp.tanh(p["candidate"]["w_x"].T @ x + p["candidate"]["bias"]
                     + r * (p["candidate"]["w_h"].T @ h + p["candidate"]["bias_h"]))
        h = (1 - z) * n + z * h
        expected.append(h)
    chex.assert_trees_all_close(gru(p, xs), jnp.stack(expected), atol=1e-5)


@pytest.mark.parametrize("layer", LAYERS, ids=repr)
def test_jit_vmap_and_gradients(layer, key):
    xs = jax.random.normal(key, (3, 6, 3))
    p = layer.init(key, xs[0])
    loop = jnp.stack([layer(p, x) for x in xs])
    chex.assert_trees_all_close(jax.jit(jax.vmap(layer.apply, (None, 0)))(p, xs), loop, atol=1e-5)
    check_grads(lambda p, x: layer(p, x), (p, xs[0]), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


BATCH_LAYERS = [dp.SimpleRNN(5, return_state=True), dp.LSTM(5, return_state=True, return_gates=True),
                dp.GRU(5, return_state=True), dp.Bidirectional(dp.LSTM(4))]


@pytest.mark.parametrize("layer", BATCH_LAYERS, ids=repr)
def test_batch_path_matches_vmap_in_values_and_gradients(layer, key):
    """apply_batch runs the time-major loop with its written-out backward pass; it must agree
    with vmap of the per-example layer (plain autodiff of lax.scan), outputs and gradients
    (params, inputs, initial state), with and without lengths."""
    kx, kc, kp = jax.random.split(key, 3)
    xs = jax.random.normal(kx, (4, 6, 3))
    p = layer.init(kp, xs[0])
    recurrent = isinstance(layer, dp.Recurrent)
    initial = None
    if recurrent:
        initial = jax.tree.map(lambda a: jax.random.normal(kc, a.shape), layer.initial_carry(jnp.float32, (4,)))

    def by_vmap(p, xs, initial, side):
        return jax.vmap(lambda x, s: layer.apply(p, x, **s))(xs, side)

    def by_batch(p, xs, initial, side):
        return layer.apply_batch(p, xs, **side)

    def loss(run, side):
        def f(p, xs, initial):
            s = dict(side, **({"initial_state": initial} if initial is not None else {}))
            return sum(jnp.sum(jnp.sin(a) * (i + 1)) for i, a in enumerate(jax.tree.leaves(run(p, xs, initial, s))))
        return f

    for side in [{}, {"lengths": jnp.array([6, 2, 4, 1])}]:
        s = dict(side, **({"initial_state": initial} if recurrent else {}))
        chex.assert_trees_all_close(jax.jit(by_batch)(p, xs, initial, s), jax.jit(by_vmap)(p, xs, initial, s), atol=1e-5)
        args = (p, xs, initial) if recurrent else (p, xs)
        wrt = (0, 1, 2) if recurrent else (0, 1)
        grad_vmap = jax.jit(jax.grad(loss(by_vmap, side), wrt))(*args, *([] if recurrent else [None]))
        grad_batch = jax.jit(jax.grad(loss(by_batch, side), wrt))(*args, *([] if recurrent else [None]))
        chex.assert_trees_all_close(grad_batch, grad_vmap, atol=1e-4)
    first = lambda out: out[0] if isinstance(out, tuple) else out
    check_grads(jax.jit(lambda p, xs: first(layer.apply_batch(p, xs))), (p, xs[:2]), order=1, modes=["rev"],
                atol=2e-2, rtol=2e-2)


def test_batched_stacks_use_the_batch_path_and_check_their_input(key):
    model = dp.Dense(2) @ dp.LSTM(6) ** 2 @ dp.EmbedToken(9, 4)
    ids = jax.random.randint(key, (3, 5), 0, 9)
    p = model.init(key, ids[0])
    net = dp.batched(model)
    by_vmap = lambda p: jax.vmap(model.apply, (None, 0))(p, ids)
    chex.assert_trees_all_close(jax.jit(net)(p, ids), jax.jit(by_vmap)(p), atol=1e-5)
    g_net = jax.jit(jax.grad(lambda p: net(p, ids).sum()))(p)
    g_vmap = jax.jit(jax.grad(lambda p: by_vmap(p).sum()))(p)
    chex.assert_trees_all_close(g_net, g_vmap, atol=1e-5)
    lstm = dp.LSTM(6)
    q = lstm.init(key, jnp.ones((5, 4)))
    with pytest.raises(dp.LayerError, match=r"LSTM\(6\): expected input \(T, 4\) float, got \(5, 3\)"):
        lstm.apply_batch(q, jnp.ones((2, 5, 3)))
    with pytest.raises(dp.LayerError, match=r"lengths= to be one int per example \(shape \(2,\)\)"):
        lstm.apply_batch(q, jnp.ones((2, 5, 4)), lengths=jnp.array(3))
    with pytest.raises(dp.LayerError, match=r"lengths in \[0, 5\], got -1"):
        lstm.apply_batch(q, jnp.ones((2, 5, 4)), lengths=jnp.array([3, -1]))
    with pytest.raises(dp.LayerError, match=r"expected a batch"):
        lstm.apply_batch(q, jnp.float32(1.0))


@pytest.mark.parametrize("layer, vocab, dim", [(layer, 6, 3) for layer in LAYERS] + [(dp.LSTM(5), 6, 5), (dp.GRU(5), 40, 5)],
                         ids=["table projected-SimpleRNN", "table projected-LSTM", "table projected-GRU",
                              "table projected, stacked-LSTM", "tokens projected-GRU"])
def test_recurrent_after_an_embedding_projects_the_table(layer, vocab, dim, key):
    """On a batch, `dp.batched(layer ** 2 @ EmbedToken)` (the fusion is on by default) computes
    layer 1's input projection as (E W_x)[ids] when the vocabulary is not larger than the batch's
    tokens: the same values and gradients as the unfused model (fuse=False) and as vmap of the
    per-example model; out-of-range ids still give NaN rows under jit and a LayerError with
    concrete ids. On the CPU the LSTM's kernel reads those rows from the projected table itself.
    (dim 5 = hidden: the two layers' params are stacked and the first application leaves the
    scan.)"""
    model = layer ** 2 @ dp.EmbedToken(vocab, dim)
    ids = jax.random.randint(key, (3, 4), 0, vocab)
    p = model.init(key, ids[0])
    net = dp.batched(model)
    assert dp.fusion.fuse(model) != model and jax.tree.structure(dp.fusion.fuse(model).init(key, ids[0])) == jax.tree.structure(p)
    gates = {dp.SimpleRNN: 5, dp.LSTM: 20, dp.GRU: 15}[type(layer)]
    projects_table = lambda net: f"f32[{vocab},{gates}] = dot_general" in str(jax.make_jaxpr(net)(p, ids))
    assert projects_table(net) == (vocab <= ids.size) and not projects_table(dp.batched(model, fuse=False))
    for side in [{}, {"lengths": jnp.array([4, 1, 3])}]:
        by_vmap = lambda p: jax.vmap(lambda i, s: model.apply(p, i, **s))(ids, side)
        by_batch = lambda p: net(p, ids, **side)
        unfused = lambda p: dp.batched(model, fuse=False)(p, ids, **side)
        outputs_and_grads = lambda run: jax.jit(lambda p: (run(p), jax.grad(lambda p: jnp.sum(jnp.sin(run(p))))(p)))(p)
        chex.assert_trees_all_close(outputs_and_grads(by_batch), outputs_and_grads(by_vmap), outputs_and_grads(unfused),
                                    atol=1e-5)
    from_table = 'custom_call_target="diffprog_lstm_forward_from_table"' in jax.jit(net).lower(p, ids).compile().as_text()
    assert from_table == (isinstance(layer, dp.LSTM) and vocab <= ids.size and kernels.available())
    out = jax.jit(net)(p, ids.at[1, 2].set(vocab).at[2, 3].set(-1))
    assert np.isnan(out[1, 2:]).all() and np.isnan(out[2, 3:]).all()
    assert np.isfinite(out[0]).all() and np.isfinite(out[1, :2]).all() and np.isfinite(out[2, :3]).all()
    with pytest.raises(dp.LayerError, match=r"expected token ids in \[0, \d+\), got \[-1\]"):
        net(p, ids.at[2, 3].set(-1))


@pytest.mark.parametrize("layer", LAYERS + [dp.Bidirectional(dp.LSTM(4))], ids=repr)
def test_lengths_match_the_truncated_sequence(layer, key):
    xs = xs_(key, T=8)
    p = layer.init(key, xs)
    full = layer(p, xs, lengths=5)
    chex.assert_trees_all_close(full[:5], layer(p, xs[:5]), atol=1e-5)
    np.testing.assert_array_equal(full[5:], 0.0)
    # Padding content is irrelevant; jit and a traced lengths give the same result.
    padded = xs.at[5:].set(100.0)
    chex.assert_trees_all_close(jax.jit(layer.apply)(p, padded, lengths=jnp.int32(5)), full, atol=1e-5)


@pytest.mark.parametrize("layer", [dp.SimpleRNN(5, return_state=True), dp.LSTM(5, return_state=True),
                                   dp.GRU(5, return_state=True)], ids=repr)
def test_final_state_is_the_state_at_the_last_valid_step(layer, key):
    xs = xs_(key, T=8)
    p = layer.init(key, xs)
    _, state = layer(p, xs, lengths=3)
    _, expected = layer(p, xs[:3])
    chex.assert_trees_all_close(state, expected, atol=1e-5)
    # initial_state continues a sequence: running 3 then 5 steps == running 8.
    ys_b, state_b = layer(p, xs[3:], initial_state=expected)
    ys_all, state_all = layer(p, xs)
    chex.assert_trees_all_close(ys_b, ys_all[3:], atol=1e-5)
    chex.assert_trees_all_close(state_b, state_all, atol=1e-5)


def test_collapse_modes_and_lengths(key):
    x = jax.random.normal(key, (6, 3))
    chex.assert_trees_all_close(dp.Collapse("first")({}, x), x[0])
    chex.assert_trees_all_close(dp.Collapse("last")({}, x), x[-1])
    chex.assert_trees_all_close(dp.Collapse("mean")({}, x), x.mean(0), atol=1e-6)
    chex.assert_trees_all_close(dp.Collapse("last")({}, x, lengths=4), x[3])
    chex.assert_trees_all_close(dp.Collapse("mean")({}, x, lengths=4), x[:4].mean(0), atol=1e-6)
    with pytest.raises(dp.LayerError, match="mode"):
        dp.Collapse("max")


def test_recurrent_errors_are_clear(key):
    lstm = dp.LSTM(11)
    p = lstm.init(key, jnp.ones((5, 7)))
    with pytest.raises(dp.LayerError, match=r"LSTM\(11\): expected input \(T, 7\) float, got \(5, 8\) float32"):
        lstm(p, jnp.ones((5, 8)))
    with pytest.raises(dp.LayerError, match=r"LSTM\(11\): expected input \(T, 7\)"):
        lstm(p, jnp.ones(7))
    with pytest.raises(dp.LayerError, match=r"lengths in \[0, 5\], got 6"):
        lstm(p, jnp.ones((5, 7)), lengths=6)
    with pytest.raises(dp.LayerError, match="non-empty sequence"):
        lstm(p, jnp.ones((0, 7)))
    with pytest.raises(dp.LayerError, match="initial_state"):
        lstm(p, jnp.ones((5, 7)), initial_state={"h": jnp.zeros(11)})


def test_stacks_compose_like_the_notes(key):
    body = dp.LSTM(16) ** 3 @ dp.EmbedToken(20, 8)
    assert repr(body) == "LSTM(16)^3 ∘ EmbedToken(20, 8)"
    p = body.init(key, jnp.zeros(9, jnp.int32))
    chex.assert_shape(p["1_LSTM^n"]["stack"]["remember"]["w_h"], (2, 16, 16))
    chex.assert_shape(body(p, jnp.arange(9) % 20), (9, 16))


def test_text_classifier_learns_two_synthetic_classes(key):
    """Dense(1) ∘ Collapse('mean') ∘ LSTM^2 ∘ EmbedToken separates sequences by a marker token."""
    model = dp.batched(dp.Dense(1) @ dp.Collapse("mean") @ dp.LSTM(16) ** 2 @ dp.EmbedToken(12, 8))
    kx, ky, kl = jax.random.split(key, 3)
    labels = jax.random.bernoulli(ky, 0.5, (64,))
    tokens = jax.random.randint(kx, (64, 10), 2, 12)
    tokens = tokens.at[:, 4].set(jnp.where(labels, 1, 0))  # class = which marker appears mid-sequence
    lengths = jax.random.randint(kl, (64,), 6, 11)
    p = model.init(key, tokens)

    def loss(p, _):
        logits = model(p, tokens, lengths=lengths)[:, 0]
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    first = loss(p, 0)
    p, l = fit(loss, p, optax.adam(0.02), 60)
    accuracy = ((model(p, tokens, lengths=lengths)[:, 0] > 0) == labels).mean()
    assert l < 0.2 * first and accuracy == 1.0


def test_load_torch_recurrent_parity():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(2, 9, 4)).astype(np.float32)
    for module, layer in [(torch.nn.RNN(4, 6, batch_first=True), dp.SimpleRNN(6, return_state=True)),
                          (torch.nn.LSTM(4, 6, batch_first=True), dp.LSTM(6, return_state=True)),
                          (torch.nn.GRU(4, 6, batch_first=True), dp.GRU(6, return_state=True))]:
        sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        p = dp.load_torch(layer, sd)
        with torch.no_grad():
            out, state = module(torch.tensor(x))
        ys, final = jax.vmap(layer.apply, (None, 0))(p, x)
        np.testing.assert_allclose(ys, out.numpy(), atol=1e-5)
        h = state[0] if isinstance(state, tuple) else state
        np.testing.assert_allclose(final["h"], h[0].numpy(), atol=1e-5)
        if isinstance(state, tuple):
            np.testing.assert_allclose(final["c"], state[1][0].numpy(), atol=1e-5)
