"""Core layers against their equations, finite-difference gradients, and clear errors."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.special import erf
from jax.test_util import check_grads

import diffprog as dp
from helpers import fit


def grads_ok(layer, params, x, **side):
    """Finite differences vs autodiff, w.r.t. params and (float) input."""
    if jax.tree.leaves(params):
        check_grads(lambda p: layer(p, x, **side), (params,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
    if jnp.issubdtype(x.dtype, jnp.floating):
        check_grads(lambda x: layer(params, x, **side), (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_dense_and_feedforward_equations(key):
    x = jax.random.normal(key, (6,))
    p = dp.Dense(4).init(key, x)
    chex.assert_trees_all_close(dp.Dense(4)(p, x), p["weight"].T @ x + p["bias"], atol=1e-6)
    ff = dp.FeedForward(4, activation="tanh")
    chex.assert_trees_all_close(ff(p, x), jnp.tanh(p["weight"].T @ x + p["bias"]), atol=1e-6)
    grads_ok(ff, p, x)
    xs = jax.random.normal(key, (3, 6))  # position-wise on (T, d)
    chex.assert_trees_all_close(ff(p, xs), jax.vmap(lambda v: ff(p, v))(xs), atol=1e-6)


@pytest.mark.parametrize("d,out", [(12, 5), (5, 12)], ids=["narrowing", "widening"])
def test_dense_product_derivatives_in_both_modes(d, out, key):
    """`dp.basic.product` writes its own tangent rule where d > out (for a faster weight
    gradient): forward- and reverse-mode derivatives to second order match finite differences,
    and the weight gradient of a batch is Σ_n x_n ∂y_nᵀ."""
    x = jax.random.normal(key, (3, 7, d))
    p = dp.Dense(out).init(key, x[0])
    check_grads(lambda p, x: dp.Dense(out).apply_batch(p, x), (p, x), order=2, modes=["fwd", "rev"],
                atol=2e-2, rtol=2e-2)
    ct = jax.random.normal(jax.random.key(1), (3, 7, out))
    grad = jax.grad(lambda p: jnp.sum(dp.Dense(out).apply_batch(p, x) * ct))(p)
    chex.assert_trees_all_close(grad["weight"], jnp.einsum("btd,bto->do", x, ct), atol=1e-4)


def test_dense_errors_name_layer_expected_and_got(key):
    p = dp.Dense(4).init(key, jnp.ones(7))
    with pytest.raises(dp.LayerError, match=r"Dense\(4\): expected input \(7,\) or \(T, 7\) float, got \(5, 8\) float32"):
        dp.Dense(4)(p, jnp.ones((5, 8)))
    with pytest.raises(dp.LayerError, match=r"got \(7,\) int32"):
        dp.Dense(4)(p, jnp.ones(7, jnp.int32))
    with pytest.raises(dp.LayerError, match="FeedForward"):
        dp.FeedForward(4).init(key, jnp.ones((2, 3, 4)))


@pytest.mark.parametrize("name", sorted(dp.ACTIVATIONS))
def test_activations(name, key):
    x = jax.random.normal(key, (5,)) + 0.1
    layer = dp.Activation(name)
    expected = {"relu": np.maximum(x, 0), "sigmoid": 1 / (1 + np.exp(-x)), "tanh": np.tanh(x),
                "gelu": x * (1 + erf(x / np.sqrt(2))) / 2,
                "gelu_tanh": x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))) / 2, "step": (x > 0).astype(np.float32),
                "softmax": np.exp(x) / np.exp(x).sum(), "identity": x, "silu": x / (1 + np.exp(-x))}[name]
    chex.assert_trees_all_close(layer({}, x), expected, atol=1e-6)
    assert layer({}, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16  # no float32 constant inside
    if name != "step":
        grads_ok(layer, {}, x)
    with pytest.raises(dp.LayerError):
        dp.Activation("nope").init(key, x)


def test_step_is_relu_derivative(key):
    x = jax.random.normal(key, (100,))
    x = jnp.where(jnp.abs(x) < 1e-3, 1.0, x)  # away from 0
    chex.assert_trees_all_equal(jax.vmap(jax.grad(jax.nn.relu))(x), dp.step(x))
    chex.assert_trees_all_equal(jax.grad(lambda x: dp.step(x).sum())(x), jnp.zeros_like(x))


def test_flatten_and_dropout(key):
    x = jax.random.normal(key, (2, 3, 4))
    chex.assert_trees_all_equal(dp.Flatten({}, x), x.reshape(-1))
    d = dp.Dropout(0.25)
    big = jnp.ones((20000,))
    chex.assert_trees_all_equal(d({}, big), big)  # no key: identity
    y = d({}, big, key=key)
    kept = np.asarray(y != 0)
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    with pytest.raises(dp.LayerError):
        dp.Dropout(1.0)


def test_layernorm_equation(key):
    x = 3 + 2 * jax.random.normal(key, (4, 8))
    ln = dp.LayerNorm()
    p = ln.init(key, x)
    p = {"scale": jnp.arange(8.0), "bias": jnp.ones(8)}
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    chex.assert_trees_all_close(ln(p, x), (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + 1, atol=1e-5)
    grads_ok(ln, p, x)
    with pytest.raises(dp.LayerError, match=r"LayerNorm: expected input \(8,\) or \(T, 8\)"):
        ln(p, jnp.ones((4, 7)))


def test_conv2d_against_a_direct_sum(key):
    x = jax.random.normal(key, (6, 5, 3))
    conv = dp.Conv(4, kernel=3, stride=2, padding="VALID")
    p = conv.init(key, x)
    y = conv(p, x)
    chex.assert_shape(y, (2, 2, 4))
    k = np.asarray(p["kernel"])
    for i in range(2):
        for j in range(2):
            patch = np.asarray(x)[2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
            np.testing.assert_allclose(y[i, j], np.einsum("hwc,hwco->o", patch, k) + p["bias"], rtol=1e-4, atol=1e-5)
    grads_ok(conv, p, x)


def test_conv1d_same_and_explicit_padding(key):
    x = jax.random.normal(key, (9, 2))
    conv = dp.Conv(3, kernel=3)
    p = conv.init(key, x)
    chex.assert_shape(conv(p, x), (9, 3))
    explicit = dp.Conv(3, kernel=3, padding=((1, 1),))
    chex.assert_trees_all_close(explicit(p, x), conv(p, x), atol=1e-6)
    xp = np.pad(np.asarray(x), ((1, 1), (0, 0)))
    k = np.asarray(p["kernel"])
    expected = np.stack([np.einsum("wc,wco->o", xp[t:t + 3], k) for t in range(9)])
    np.testing.assert_allclose(conv(p, x), expected, atol=1e-5)
    grads_ok(conv, p, x)
    with pytest.raises(dp.LayerError, match=r"Conv\(3\): expected input \(W, 2\)"):
        conv(p, jnp.ones((9, 5)))
    with pytest.raises(dp.LayerError, match="Conv"):
        conv.init(key, jnp.ones(5))


def test_bfloat16_conv_sums_in_float32_and_rounds_once(key):
    """On bfloat16 values Conv accumulates in float32 and adds the bias before rounding: its
    output is the float32 Conv of the same (bfloat16) numbers, rounded once; the program sums no
    bfloat16 (the bias gradient is a sum over every position, slow in emulated bfloat16); its
    gradients keep the params' dtype. bfloat16 inputs with float32 params give float32."""
    x = jax.random.normal(key, (12, 10, 3))
    conv = dp.Conv(8, kernel=3)
    p = jax.tree.map(lambda a: (a + 0.1).astype(jnp.bfloat16), conv.init(key, x))
    xb = x.astype(jnp.bfloat16)
    y = conv(p, xb)
    assert y.dtype == jnp.bfloat16
    as32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
    exact = conv(as32(p), as32(xb))
    np.testing.assert_allclose(as32(y), exact.astype(jnp.bfloat16).astype(jnp.float32), rtol=2 ** -8, atol=1e-6)
    loss = lambda p: jnp.sum(jnp.sin(conv(p, xb).astype(jnp.float32)))
    lowered = jax.jit(jax.grad(loss)).lower(p).as_text()
    assert not [line for line in lowered.splitlines() if "stablehlo.reduce(" in line and "xbf16>" in line.split("->")[-1]]
    grads = jax.grad(loss)(p)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    want = jax.grad(lambda p: jnp.sum(jnp.sin(conv(p, as32(xb)))))(as32(p))
    for got, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(as32(got), w, atol=0.02 * float(jnp.abs(w).max()))
    assert conv(as32(p), xb).dtype == jnp.float32


@pytest.mark.parametrize("pool,reduce", [(dp.MaxPool, np.max), (dp.AvgPool, np.mean)])
def test_pooling_fold_matches_sliding_window_and_definition(pool, reduce, key):
    x = jax.random.normal(key, (8, 6, 3))
    y = pool(2)({}, x)
    expected = np.stack([np.stack([reduce(np.asarray(x)[2 * i:2 * i + 2, 2 * j:2 * j + 2], axis=(0, 1))
                                   for j in range(3)]) for i in range(4)])
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    # The fold (reshape) path and the reduce_window path agree.
    layer = pool(2)
    chex.assert_trees_all_close(layer.fold(x, (2, 2)), layer.sliding(x, (2, 2), (2, 2)), atol=1e-6)
    # Overlapping windows take the reduce_window path.
    chex.assert_shape(pool(3, stride=1)({}, x), (6, 4, 3))
    chex.assert_shape(pool(2)({}, jnp.ones((9, 3))), (4, 3))  # 1-D, not divisible
    grads_ok(pool(2), {}, x + 1e-3 * jax.random.normal(jax.random.key(1), x.shape))
    with pytest.raises(dp.LayerError, match="larger than the input"):
        pool(4)({}, jnp.ones((2, 2, 1)))


def test_max_pool_backward_routes_gradient_to_argmax(key):
    x = jax.random.normal(key, (4, 4, 1))
    g = jax.grad(lambda x: dp.MaxPool(2)({}, x).sum())(x)
    blocks = np.asarray(x).reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
    gblocks = np.asarray(g).reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
    for b, gb in zip(blocks, gblocks):
        assert gb.sum() == 1.0 and gb[np.argmax(b)] == 1.0


def test_embed_token(key):
    e = dp.EmbedToken(10, 4)
    ids = jnp.array([3, 0, 9, 3])
    p = e.init(key, ids)
    chex.assert_trees_all_equal(e(p, ids), p["table"][ids])
    with pytest.raises(dp.LayerError, match=r"EmbedToken\(10, 4\): expected token ids in \[0, 10\), got \[12, -1\]"):
        e(p, jnp.array([1, 12, -1]))
    with pytest.raises(dp.LayerError, match=r"expected input \(\) or \(T,\) int, got \(3,\) float32"):
        e(p, jnp.ones(3))
    assert np.isnan(jax.jit(e.apply)(p, jnp.array([1, 12]))[1]).all()  # documented jit behaviour
    g = jax.grad(lambda p: e(p, ids).sum())(p)["table"]
    np.testing.assert_allclose(g[:, 0], [1, 0, 0, 2, 0, 0, 0, 0, 0, 1])


def test_from_flax_trains_one_optax_step_under_jit(key):
    model = dp.Dense(1) @ dp.from_flax(nn.Dense(8)) @ dp.FeedForward(16)
    x = jax.random.normal(key, (16, 5))
    y = x.sum(-1, keepdims=True)
    p = model.init(key, x[0])
    assert "params" in p["1_from_flax"] and p["1_from_flax"]["params"]["kernel"].shape == (16, 8)

    def loss(p, _):
        return jnp.mean((jax.vmap(model.apply, (None, 0))(p, x) - y) ** 2)

    p2, l0 = fit(loss, p, optax.sgd(0.05), 1)
    assert loss(p2, 0) < l0
    assert not np.allclose(p2["1_from_flax"]["params"]["kernel"], p["1_from_flax"]["params"]["kernel"])


def test_to_flax_wraps_a_layer(key):
    layer = dp.FeedForward(3) @ dp.Dense(4)
    module = dp.to_flax(layer)
    x = jnp.ones(5)
    variables = module.init(key, x)
    params = variables["params"]["diffprog"]
    chex.assert_trees_all_close(module.apply(variables, x), layer(params, x))


def test_rmsnorm_equation(key):
    """RMSNorm(x) = scale ⊗ x / sqrt(mean(x²) + eps), no centring, no bias; gradients match
    finite differences."""
    x = 3 + 2 * jax.random.normal(key, (4, 8))
    norm = dp.RMSNorm(1e-5)
    assert jax.tree.map(jnp.shape, norm.init(key, x)) == {"scale": (8,)}
    p = {"scale": jnp.arange(8.0)}
    chex.assert_trees_all_close(norm(p, x), x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"], atol=1e-5)
    grads_ok(norm, p, x)
    with pytest.raises(dp.LayerError, match=r"RMSNorm\(eps=1e-05\): expected input \(8,\) or \(T, 8\)"):
        norm(p, jnp.ones((4, 7)))


def test_load_torch_with_hand_made_arrays(key):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    p = dp.load_torch(dp.Dense(3), {"weight": w, "bias": b})
    x = rng.normal(size=5).astype(np.float32)
    np.testing.assert_allclose(dp.Dense(3)(p, x), w @ x + b, rtol=1e-5)
    cw = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)  # OIHW
    pc = dp.load_torch(dp.Conv(4), {"weight": cw, "bias": np.zeros(4, np.float32)})
    chex.assert_shape(pc["kernel"], (3, 3, 2, 4))
    np.testing.assert_array_equal(pc["kernel"][1, 2, 0, 3], cw[3, 0, 1, 2])
    with pytest.raises(dp.LayerError, match=r"load_torch\(Dense\(3\)\): state dict lacks \['bias'\]"):
        dp.load_torch(dp.Dense(3), {"weight": w})


def test_load_torch_matches_real_modules():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)  # NHWC
    cases = [
        (torch.nn.Linear(3, 4), dp.Dense(4), lambda m, x: m(torch.tensor(x)), x[0, 0]),
        (torch.nn.Conv2d(3, 5, 3, stride=2, padding=1), dp.Conv(5, stride=2, padding=((1, 1), (1, 1))),
         lambda m, x: m(torch.tensor(x).permute(2, 0, 1)[None])[0].permute(1, 2, 0), x[0]),
        (torch.nn.LayerNorm(3), dp.LayerNorm(), lambda m, x: m(torch.tensor(x)), x[0, 0]),
        (torch.nn.RMSNorm(3, eps=1e-6), dp.RMSNorm(1e-6), lambda m, x: m(torch.tensor(x)), x[0, 0]),
    ]
    with torch.no_grad():
        cases[-1][0].weight.normal_()  # a scale that is not all ones
    for module, layer, run, xi in cases:
        sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        with torch.no_grad():
            expected = run(module, xi).numpy()
        np.testing.assert_allclose(layer(dp.load_torch(layer, sd), xi), expected, atol=1e-5)
    emb = torch.nn.Embedding(11, 4)
    ids = np.array([0, 3, 10])
    p = dp.load_torch(dp.EmbedToken(11, 4), {"weight": emb.weight.detach().numpy()})
    np.testing.assert_allclose(dp.EmbedToken(11, 4)(p, ids), emb(torch.tensor(ids)).detach().numpy())
