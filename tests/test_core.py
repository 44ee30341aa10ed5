"""The layer protocol and the composition algebra."""
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffprog as dp


def test_compose_is_function_composition(key):
    f, g = dp.Dense(3), dp.Dense(5)
    x = jnp.arange(4.0)
    fg = f @ g
    p = fg.init(key, x)
    assert list(p) == ["0_Dense", "1_Dense"]
    expected = f(p["1_Dense"], g(p["0_Dense"], x))
    chex.assert_trees_all_close(fg(p, x), expected)
    assert fg.apply(p, x).shape == (3,)


def test_composition_is_associative(key):
    f, g, h = dp.FeedForward(3), dp.FeedForward(4, activation="tanh"), dp.Dense(5)
    x = jnp.linspace(-1, 1, 6)
    left, right = (f @ g) @ h, f @ (g @ h)
    p = left.init(key, x)
    chex.assert_trees_all_equal_structs(p, right.init(key, x))
    chex.assert_trees_all_close(left(p, x), right(p, x))
    assert left == right == dp.serial(h, g, f)


def test_power_one_is_the_layer_itself(key):
    f = dp.FeedForward(3)
    assert f ** 1 is f
    with pytest.raises(dp.LayerError):
        f ** 0


def test_power_stacks_parameters_and_equals_unrolled_composition(key):
    f = dp.FeedForward(6, activation="tanh")
    x = jnp.linspace(-1, 1, 6)
    p = (f ** 3).init(key, x)
    chex.assert_shape(p["stack"]["weight"], (3, 6, 6))
    chex.assert_shape(p["stack"]["bias"], (3, 6))
    per_layer = [jax.tree.map(lambda a: a[i], p["stack"]) for i in range(3)]
    unrolled = f(per_layer[2], f(per_layer[1], f(per_layer[0], x)))
    chex.assert_trees_all_close((f ** 3)(p, x), unrolled, atol=1e-6)
    # The n sets are independent draws, not copies.
    assert not np.allclose(per_layer[0]["weight"], per_layer[1]["weight"])


def test_power_with_a_shape_changing_first_application(key):
    f = dp.FeedForward(64)
    x = jnp.ones(10)
    p = (f ** 3).init(key, x)
    chex.assert_shape(p["first"]["weight"], (10, 64))
    chex.assert_shape(p["stack"]["weight"], (2, 64, 64))
    rest = [jax.tree.map(lambda a: a[i], p["stack"]) for i in range(2)]
    chex.assert_trees_all_close((f ** 3)(p, x), f(rest[1], f(rest[0], f(p["first"], x))),
                                atol=1e-6)


def test_power_rejects_a_layer_that_keeps_changing_shape(key):
    with pytest.raises(dp.LayerError, match=r"Conv\(4, padding='VALID'\)\^3"):
        (dp.Conv(4, padding="VALID") ** 3).init(key, jnp.ones((12, 12, 4)))


def _equations(model, x, key):
    p = model.init(key, x)
    return len(jax.make_jaxpr(model.apply)(p, x).jaxpr.eqns)


def test_power_is_one_scan_not_n_copies(key):
    block = dp.FeedForward(8) @ dp.LayerNorm()
    x = jnp.ones(8)
    assert _equations(block ** 64, x, key) <= _equations(block ** 4, x, key)


def test_repr_reads_like_the_notes():
    model = dp.FeedForward(4) ** 3 @ dp.MaxPool(2) @ dp.Conv(16) ** 3 @ dp.MaxPool(2) @ dp.Conv(8)
    assert repr(model) == "FeedForward(4)^3 ∘ MaxPool(2) ∘ Conv(16)^3 ∘ MaxPool(2) ∘ Conv(8)"
    assert repr((dp.Dense(3) @ dp.Tanh) ** 2) == "(Dense(3) ∘ Tanh)^2"
    assert repr(dp.EmbedToken(65, 32)) == "EmbedToken(65, 32)"


def alexnet():
    """The notes' AlexNet: FeedForward^3 ∘ MaxPool ∘ Conv^3 ∘ MaxPool ∘ Conv ∘ MaxPool ∘ Conv."""
    return (dp.FeedForward(10, activation="identity") @ dp.FeedForward(32) ** 2 @ dp.Flatten
            @ dp.MaxPool(2) @ dp.Conv(16) ** 3 @ dp.MaxPool(2) @ dp.Conv(16)
            @ dp.MaxPool(2) @ dp.Conv(8, kernel=5, stride=1))


def test_alexnet_builds_and_runs_on_an_image(key):
    model = alexnet()
    x = jax.random.normal(key, (32, 32, 3))
    p = model.init(key, x)
    y = jax.jit(model.apply)(p, x)
    chex.assert_shape(y, (10,))
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_close(y, model(p, x), atol=1e-5)


def test_init_from_shape_dtype_struct_matches_init_from_array(key):
    model = alexnet()
    x = jnp.ones((32, 32, 3))
    chex.assert_trees_all_equal(model.init(key, x),
                                model.init(key, jax.ShapeDtypeStruct(x.shape, x.dtype)))


def test_jit_vmap_grad_through_a_composition(key):
    model = dp.Dense(1) @ dp.FeedForward(8) ** 3
    x = jax.random.normal(key, (5, 8))
    p = model.init(key, x[0])
    loop = jnp.stack([model(p, xi) for xi in x])
    chex.assert_trees_all_close(jax.vmap(model.apply, (None, 0))(p, x), loop, atol=1e-6)
    chex.assert_trees_all_close(jax.jit(jax.vmap(model.apply, (None, 0)))(p, x), loop, atol=1e-5)
    grads = jax.grad(lambda p: jax.vmap(model.apply, (None, 0))(p, x).sum())(p)
    chex.assert_trees_all_equal_structs(grads, p)
    jax.test_util.check_grads(lambda p: model(p, x[0]), (p,), order=1, modes=["rev"],
                              atol=1e-2, rtol=1e-2)


def test_batched_helper_maps_and_splits_keys(key):
    model = dp.Dropout(0.5) @ dp.Dense(16)
    xb = jnp.ones((4, 3))
    net = dp.batched(model)
    p = net.init(key, xb)
    chex.assert_trees_all_equal_structs(p, model.init(key, xb[0]))
    y = net(p, xb, key=jax.random.key(1))
    masks = np.asarray(y != 0)
    assert not all((masks[0] == masks[i]).all() for i in range(1, 4)), "same mask for all"
    loop = jnp.stack([model(p, x) for x in xb])
    chex.assert_trees_all_close(net(p, xb), loop, atol=1e-6)  # no key: dropout is off


def test_side_inputs_are_checked(key):
    d = dp.Dense(2)
    p = d.init(key, jnp.ones(3))
    with pytest.raises(dp.LayerError, match=r"Dense\(2\): unexpected side input"):
        d(p, jnp.ones(3), lengths=3)
    d(p, jnp.ones(3), key=key)  # every layer takes key=


def test_summary_lists_each_stage(key):
    model = dp.Dense(3) @ dp.FeedForward(5) ** 2
    text = dp.summary(model, jnp.ones(4), print_fn=lambda s: None)
    lines = text.splitlines()
    assert lines[2].startswith("FeedForward(5)^2") and "(4,) float32 → (5,) float32" in lines[2]
    assert lines[3].startswith("Dense(3)") and " 18 " in lines[3]  # 5*3 + 3 params
    n_params = sum(a.size for a in jax.tree.leaves(model.init(key, jnp.ones(4))))
    assert f"{n_params:,}" in lines[-1]
    flops = [int(line.split()[-1].replace(",", "")) for line in lines[2:]]
    assert flops == [2 * (4 * 5 + 5 * 5), 2 * 5 * 3, 2 * (4 * 5 + 5 * 5 + 5 * 3)]  # 2 × multiply-adds


def test_summary_flops_count_every_step_of_a_scan():
    """XLA's cost analysis counts a scan's body once; the summary counts each step."""
    def flops(model, x):
        return int(dp.summary(model, x, print_fn=lambda s: None).splitlines()[-1].split()[-1].replace(",", ""))
    steps, d, hidden = 7, 3, 4
    assert flops(dp.LSTM(hidden) ** 2, jnp.ones((steps, hidden))) == 2 * steps * 2 * 4 * hidden * (hidden + hidden)
    assert flops(dp.SimpleRNN(hidden), jnp.ones((steps, d))) == steps * 2 * hidden * (d + hidden)
    assert flops(dp.FeedForward(6) ** 9, jnp.ones(6)) == 9 * 2 * 6 * 6  # a scan over 9 > UNROLLED_UP_TO
    assert flops(dp.Conv(5, (3, 3)), jnp.ones((4, 4, 2))) == 2 * 4 * 4 * 5 * 3 * 3 * 2


def test_importing_diffprog_loads_no_c_library():
    """Importing diffprog never touches malloc's settings or builds the kernels: it loads no C
    library at all (a fresh process records every ctypes.CDLL). `dp.keep_freed_memory()` is the
    explicit call that changes malloc; what it saves is measured by `benchmarks.page_faults`."""
    code = """if True:
        import ctypes
        loaded, real = [], ctypes.CDLL
        ctypes.CDLL = lambda name, *a, **k: loaded.append(str(name)) or real(name, *a, **k)
        import diffprog
        print(loaded)"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]", out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_is_accepted_by_glibc():
    assert dp.keep_freed_memory() is True
