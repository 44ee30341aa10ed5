"""The C++ kernels (`dp.kernels`: causal attention, the LSTM recurrence) against the jnp paths
they replace on the CPU."""
import ctypes
import functools
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import chex
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.test_util import check_grads

import diffprog as dp
from diffprog import kernels
from diffprog.recurrent import Weights

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("c++") is None,
                                reason="the kernel needs an x86-64 CPU and a C++ compiler")


def test_the_kernel_builds_and_registers():
    assert kernels.available()


def test_build_compiles_each_source_apart_then_links_them_and_names_a_failure(tmp_path, monkeypatch):
    """`build`: one compiler process per source, then one link into a library that holds them
    all (a symbol of one source calls the other's); built once; nothing but the library left in
    the cache; a source that does not compile is an error naming the sources."""
    monkeypatch.setenv("DIFFPROG_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.cc", tmp_path / "b.cc"
    a.write_text('extern "C" int seven() { return 7; }\n')
    b.write_text('extern "C" int seven();\nextern "C" int eight() { return seven() + 1; }\n')
    library = kernels.build([a, b])
    assert ctypes.CDLL(str(library)).eight() == 8
    assert kernels.build([a, b]) == library and list((tmp_path / "cache").iterdir()) == [library]
    b.write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match=r"could not build a\.cc, b\.cc"):
        kernels.build([a, b])
    assert list((tmp_path / "cache").iterdir()) == [library]


def test_the_kernels_vectors_take_the_cpus_native_width():
    """Built on this machine with -march=native: 16 floats a vector where the CPU has AVX-512F,
    8 (AVX2) where it does not."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert ctypes.CDLL(str(kernels.build())).diffprog_vector_lanes() == (16 if "avx512f" in flags else 8)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 2, 5), (3, 13, 1, 16), (2, 37, 3, 24), (1, 70, 2, 64)])
def test_kernel_matches_the_definition_values_and_gradients(shape, causal, key):
    """Odd lengths and widths exercise the edge tiles (rows not a multiple of 6, columns of 16).
    Causal: against the query blocks; over all keys: against jax.nn.dot_product_attention."""
    q, k, v, ct = (jax.random.normal(kk, shape) for kk in jax.random.split(key, 4))
    reference = jax.jit(jax.vmap(kernels.causal_attention_blocks) if causal else jax.nn.dot_product_attention)
    fast = functools.partial(kernels.self_attention, causal=causal)
    for f in (fast, jax.jit(fast)):
        chex.assert_trees_all_close(f(q, k, v), reference(q, k, v), atol=2e-6)
    grads = [jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), (0, 1, 2))(q, k, v) for f in (fast, reference)]
    chex.assert_trees_all_close(*grads, atol=1e-5)
    assert "diffprog_attention_forward" in jax.jit(fast).lower(q, k, v).as_text()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch, steps, heads, dim", [(1, 1, 1, 1), (2, 7, 2, 5), (3, 37, 3, 24), (1, 70, 2, 64)])
def test_projected_kernel_is_attention_of_the_projections_thirds(batch, steps, heads, dim, causal, key):
    """projected_self_attention(qkv, bias) reads q, k, v as the thirds of qkv plus the bias: the
    same values and gradients (∂qkv, ∂bias) as the definition on split_projection's q, k, v, jitted
    or not, under vmap over examples and over the bias too, by the projected handlers."""
    kq, kb, kc = jax.random.split(key, 3)
    qkv = jax.random.normal(kq, (batch, steps, 3 * heads * dim))
    bias = jax.random.normal(kb, (3 * heads * dim,))
    ct = jax.random.normal(kc, (batch, steps, heads, dim))
    definition = jax.vmap(kernels.causal_attention_blocks) if causal else jax.nn.dot_product_attention
    reference = jax.jit(lambda qkv, bias: definition(*kernels.split_projection(qkv, bias, heads)))
    fast = lambda qkv, bias: kernels.projected_self_attention(qkv, bias, heads, causal)
    for f in (fast, jax.jit(fast)):
        chex.assert_trees_all_close(f(qkv, bias), reference(qkv, bias), atol=2e-6)
    grads = [jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), (0, 1))(qkv, bias) for f in (fast, reference)]
    chex.assert_trees_all_close(*grads, atol=2e-5)
    assert "diffprog_projected_attention_backward" in jax.jit(jax.grad(lambda a, b: fast(a, b).sum())).lower(qkv, bias).as_text()
    stacked = jnp.stack([qkv, -qkv])
    chex.assert_trees_all_close(jax.vmap(fast, (0, None))(stacked, bias), jnp.stack([fast(qkv, bias), fast(-qkv, bias)]), atol=1e-6)
    chex.assert_trees_all_close(jax.vmap(fast)(stacked, jnp.stack([bias, 2 * bias])),
                                jnp.stack([fast(qkv, bias), fast(-qkv, 2 * bias)]), atol=1e-6)


def test_projected_kernel_rejects_a_projection_that_is_not_three_heads_wide(key):
    qkv = jax.random.normal(key, (5, 3 * 2 * 4))
    with pytest.raises(ValueError, match=r"projected_self_attention.*\(5, 24\).*\(23,\)"):
        kernels.projected_self_attention(qkv, jnp.zeros(23), 2, True)
    with pytest.raises(ValueError, match=r"projected_self_attention.*\(5, 24\)"):
        kernels.projected_self_attention(qkv, jnp.zeros(24), 5, True)


def test_attention_layers_take_the_projected_kernel_where_it_applies(key, monkeypatch):
    """Self-attention with one key/value head per query head and no rotary positions reads q, k, v
    from the projection (no slices of it in the program); grouped-query or rotary attention, and
    autocast with AMX attention (its bfloat16 kernel takes q, k, v), split it first."""
    xs = jax.random.normal(key, (2, 6, 8))
    targets = lambda layer: jax.jit(dp.batched(layer).apply).lower(layer.init(key, xs[0]), xs).as_text()
    assert "diffprog_projected_attention_forward" in targets(dp.Attention(2, causal=True))
    for layer in (dp.Attention(2, causal=True, kv_heads=1), dp.Attention(2, causal=True, rotary=10000.0)):
        text = targets(layer)
        assert "diffprog_attention_forward" in text and "projected" not in text, layer
    monkeypatch.setattr(kernels.attention, "bfloat16_products", lambda: True)
    monkeypatch.setattr(kernels.attention, "amx_attention", lambda: True)
    text = targets(dp.Attention(2, causal=True))
    assert "diffprog_attention_forward_bf16" in text and "projected" not in text


@pytest.mark.skipif(not kernels.library.amx_attention(), reason="no AMX here (the bfloat16 attention kernel needs it)")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 1, 8), (3, 37, 2, 24), (1, 70, 2, 80)])
def test_attention_kernel_in_bfloat16_is_attention_on_rounded_products(shape, causal, key):
    """On AMX, under autocast: the kernel's products take bfloat16 operands (the forward pass
    within bfloat16's error of the definition on rounded q, k, v, and not float32's values), its
    gradients within bfloat16's error of float32's; autocast alone turns it on, and without
    bfloat16 products (no MKL bfloat16 hardware) it stays float32. Odd sizes: the zero padding
    to AMX's 32 × 32 blocks."""
    q, k, v, ct = (jax.random.normal(kk, shape) for kk in jax.random.split(key, 4))
    rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    definition = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    fast = functools.partial(kernels.self_attention, causal=causal)
    with kernels.autocast(jnp.bfloat16):
        low = jax.jit(fast)
        out, hlo = low(q, k, v), low.lower(q, k, v).as_text()
        low_grads = jax.grad(lambda q, k, v: jnp.sum(fast(q, k, v) * ct), (0, 1, 2))(q, k, v)
    assert "diffprog_attention_forward_bf16" in hlo
    assert "_bf16" not in jax.jit(lambda q, k, v: fast(q, k, v)).lower(q, k, v).as_text()  # traced outside autocast
    chex.assert_trees_all_close(out, definition(*map(rounded, (q, k, v))), atol=2e-2)
    assert jnp.max(jnp.abs(out - fast(q, k, v))) > 1e-4
    full = jax.grad(lambda q, k, v: jnp.sum(fast(q, k, v) * ct), (0, 1, 2))(q, k, v)
    for a, b in zip(low_grads, full):
        assert 1e-5 < jnp.max(jnp.abs(a - b)) < 2e-2 * jnp.max(jnp.abs(b))


@pytest.mark.skipif(not kernels.library.amx_attention(), reason="no AMX here (the bfloat16 attention kernel needs it)")
def test_a_transformer_trained_with_bfloat16_attention_tracks_float32():
    """TrainStep(compute_dtype=bfloat16) on a CPU with AMX runs the attention kernel's bfloat16
    handlers; a small causal Transformer LM's losses track float32's (final loss within 2 %)."""
    ids = (jnp.arange(32)[None] + 3 * jnp.arange(16)[:, None]) % 11  # the next token is the token + 1
    batch = {"inputs": ids, "targets": (ids + 1) % 11}
    model = dp.LanguageModel(11, 32, dp.TransformerBlock(32, 2, 64, causal=True) ** 2,
                             positions=dp.LearnedPositions(32), per_position=True)
    params = model.init(jax.random.key(0), ids[0])
    final = {}
    for dtype in (None, jnp.bfloat16):
        step = dp.TrainStep(model, lambda out, b: dp.metrics.cross_entropy(out, b["targets"]), optax.adam(1e-2), dtype)
        run, state, put = step.compile(step.init(jax.tree.map(jnp.copy, params)), batch)
        hlo = run.lower(state, put(batch)).compile().as_text()
        assert ("diffprog_attention_backward_bf16" in hlo) == (dtype is not None)
        for _ in range(15):
            state, value = run(state, put(batch))
        final[dtype] = float(value)
    assert final[None] < 1.0 and abs(final[jnp.bfloat16] - final[None]) < 0.02 * final[None]


def test_attention_under_autocast_stays_float32_without_bfloat16_products(key, monkeypatch):
    """Where autocast's products stay float32 (no MKL with bfloat16 hardware) or AMX is missing,
    the attention kernel keeps its float32 products: the same values as without autocast."""
    q, k, v = (jax.random.normal(kk, (2, 9, 2, 8)) for kk in jax.random.split(key, 3))
    for blas, amx in ((None, True), ({"packed": None}, False)):
        monkeypatch.setattr(kernels.products, "vendor_blas", lambda: blas)
        monkeypatch.setattr(kernels.products, "bfloat16_hardware", lambda: True)
        monkeypatch.setattr(kernels.attention, "amx_attention", lambda: amx)
        with kernels.autocast(jnp.bfloat16), warnings.catch_warnings(record=True):
            step = jax.jit(lambda q, k, v: kernels.causal_attention(q, k, v))
            out, hlo = step(q, k, v), step.lower(q, k, v).as_text()
        assert "diffprog_attention_forward" in hlo and "_bf16" not in hlo
        chex.assert_trees_all_close(out, kernels.causal_attention(q, k, v), atol=1e-6)


def test_kernel_gradients_against_finite_differences(key):
    q, k, v = (jax.random.normal(kk, (2, 9, 2, 4)) for kk in jax.random.split(key, 3))
    for causal in (True, False):
        check_grads(functools.partial(kernels.self_attention, causal=causal), (q, k, v), order=1, modes=["rev"],
                    atol=1e-2, rtol=1e-2)


def test_kernel_under_vmap_is_the_batched_call(key):
    q, k, v = (jax.random.normal(kk, (3, 11, 2, 8)) for kk in jax.random.split(key, 3))
    per_example = jax.vmap(kernels.causal_attention)(q, k, v)
    chex.assert_trees_all_close(per_example, kernels.causal_attention(q, k, v), atol=1e-6)
    chex.assert_trees_all_close(per_example[1], kernels.causal_attention(q[1], k[1], v[1]), atol=1e-6)


def test_kernel_rejects_mismatched_shapes(key):
    q = jax.random.normal(key, (5, 2, 4))
    with pytest.raises(ValueError, match=r"self_attention.*\(5, 2, 4\).*\(6, 2, 4\)"):
        kernels.causal_attention(q, jnp.zeros((6, 2, 4)), q)


def test_the_kernel_is_lowered_for_the_cpu_only():
    """On accelerators causal attention keeps `jax.nn.dot_product_attention` (the query blocks)."""
    q = jnp.ones((8, 2, 4))
    step = jax.jit(jax.grad(lambda q: kernels.causal_attention(q, q, q).sum()))
    lowered = {platform: step.trace(q).lower(lowering_platforms=(platform,)).as_text()
               for platform in ("cpu", "cuda")}
    assert "diffprog_attention_backward" in lowered["cpu"]
    assert "diffprog_attention" not in lowered["cuda"]


def lstm_arguments(key, steps, batch, d, hidden, lengths):
    """The arguments of the LSTM's batch loop (`kernels.recurrence`) for random weights and states."""
    layer = dp.LSTM(hidden)
    kx, kp, kh, kc = jax.random.split(key, 4)
    xs = jax.random.normal(kx, (steps, batch, d))
    weights = layer.weights(layer.init(kp, xs[:, 0]))
    carry = {"h": jax.random.normal(kh, (batch, hidden)), "c": jax.random.normal(kc, (batch, hidden))}
    valid = None if lengths is None else jnp.arange(steps)[:, None] < jnp.array(lengths)
    return layer, (weights._replace(b_x=weights.b_x + 0.1), xs, carry, valid)


needs_bfloat16_mkl = pytest.mark.skipif(kernels.vendor_blas() is None or not kernels.library.bfloat16_hardware(),
                                        reason="MKL with bfloat16 hardware (AMX or AVX512-BF16) is not here")


@pytest.fixture(params=["mkl", "micro-kernel"])
def lstm_products(request):
    """The LSTM kernel's per-step products by MKL's packed sgemm (where installed) and by cpu.h's
    micro-kernel; the switch is read as the kernel runs, so the tests block on every result."""
    if request.param == "mkl" and kernels.vendor_blas() is None:
        pytest.skip("MKL is not installed")
    kernels.library.use_vendor_sgemm(request.param == "mkl")
    yield request.param
    kernels.library.use_vendor_sgemm(kernels.library.float32_by_mkl())


@pytest.mark.parametrize("steps, batch, d, hidden, lengths", [
    (1, 1, 1, 1, None), (9, 5, 3, 10, [9, 3, 1, 2, 7]), (13, 7, 9, 21, None), (6, 33, 4, 16, None)])
def test_lstm_kernel_matches_the_scan_values_and_gradients(steps, batch, d, hidden, lengths, key, lstm_products):
    """Hidden sizes not a multiple of 8 and batches not a multiple of 6 exercise the masked lanes
    and the narrow tiles; `lengths` the rows that stop early."""
    layer, args = lstm_arguments(key, steps, batch, d, hidden, lengths)
    kernel = jax.jit(lambda *a: kernels.lstm_recurrence(layer, False, *a))
    scan = jax.jit(lambda *a: kernels.scan_recurrence(layer, *a))
    chex.assert_trees_all_close(kernel(*args), scan(*args), atol=1e-6)
    kc, kh, ky = jax.random.split(jax.random.key(1), 3)

    def loss(f):
        def value(*a):
            final, outs = f(*a)
            return (jnp.sum(jnp.tanh(outs["h"]) * jax.random.normal(ky, outs["h"].shape))
                    + jnp.sum(final["h"] * jax.random.normal(kh, final["h"].shape))
                    + jnp.sum(final["c"] * jax.random.normal(kc, final["c"].shape)))
        return jax.jit(jax.grad(value, range(3)))
    chex.assert_trees_all_close(loss(kernel)(*args), loss(scan)(*args), atol=2e-5)


@needs_bfloat16_mkl
def test_lstm_kernel_in_bfloat16_rounds_each_steps_product(key, mkl_at_full_width):
    """With bfloat16 (autocast's LSTM), each step's h_{t-1} W_h and the input projection x W_x
    round their operands to bfloat16 and sum in float32: the steps equal a scan written so; the gradients stay within bfloat16's error of
    float32's, and autocast is what turns it on."""
    kernels.library.use_vendor_sgemm(True)  # MKL's packed GEMMs handed to the kernel, as on Intel's CPUs
    try:
        lstm_in_bfloat16(key)
    finally:
        kernels.library.use_vendor_sgemm(kernels.library.float32_by_mkl())


@needs_bfloat16_mkl
def test_lstm_kernel_in_bfloat16_by_the_micro_kernels_pairs(key):
    """Where MKL is not handed to the kernel (AMD's AVX-512 CPUs: `mkl_at_full_width()` False),
    autocast's LSTM steps are cpu.h's micro-kernel on AVX512-BF16's bfloat16 pairs: the same
    rounding, the same sums in float32, and autocast turns it on there too."""
    kernels.library.use_vendor_sgemm(False)
    try:
        lstm_in_bfloat16(key)
    finally:
        kernels.library.use_vendor_sgemm(kernels.library.float32_by_mkl())


def lstm_in_bfloat16(key):
    layer, (weights, xs, carry, valid) = lstm_arguments(key, 9, 7, 5, 21, [9, 3, 1, 2, 7, 9, 8])
    rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)

    def written(weights, xs, carry, valid):  # the notes' LSTM step, h W_h from rounded operands
        def step(state, inputs):
            xw, v = inputs
            z = xw + weights.b_x + weights.b_h + rounded(state["h"]) @ rounded(weights.w_h)
            remember, save, focus, candidate = jnp.split(z, 4, -1)
            c = jax.nn.sigmoid(remember) * state["c"] + jax.nn.sigmoid(save) * jnp.tanh(candidate)
            h = jax.nn.sigmoid(focus) * jnp.tanh(c)
            keep = lambda new, old: jnp.where(v[:, None], new, old)
            return {"h": keep(h, state["h"]), "c": keep(c, state["c"])}, jnp.where(v[:, None], h, 0.0)
        final, hs = jax.lax.scan(step, carry, (rounded(xs) @ rounded(weights.w_x), valid))
        return final, {"h": hs}
    in_bfloat16 = jax.jit(lambda *a: kernels.lstm_recurrence(layer, True, *a))
    in_float32 = jax.jit(lambda *a: kernels.lstm_recurrence(layer, False, *a))
    args = (weights, xs, carry, valid)
    chex.assert_trees_all_close(in_bfloat16(*args), written(*args), atol=2e-6)
    assert jnp.max(jnp.abs(in_bfloat16(*args)[1]["h"] - in_float32(*args)[1]["h"])) > 1e-4

    def grads(f):
        return jax.grad(lambda w, xs: jnp.sum(jnp.sin(f(w, xs, carry, valid)[1]["h"])), (0, 1))(weights, xs)
    low, full = grads(in_bfloat16), grads(in_float32)
    chex.assert_trees_all_close(low, full, atol=3e-2, rtol=3e-2)  # bfloat16 has 8 significant bits
    assert max(jnp.max(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(full))) > 1e-5

    net = dp.batched(dp.LSTM(21))
    params = net.layer.init(key, xs[:, 0])
    with kernels.autocast(jnp.bfloat16):
        hlo = jax.jit(net.apply).lower(params, jnp.swapaxes(xs, 0, 1)).compile().as_text()
    assert "bfloat16 = true" in hlo and "bfloat16 = false" not in hlo
    assert "bfloat16 = false" in jax.jit(net.apply).lower(params, jnp.swapaxes(xs, 0, 1)).compile().as_text()


def test_lstm_under_autocast_keeps_float32_without_bfloat16_mkl(key, monkeypatch):
    """Where MKL is missing or has no bfloat16 hardware, autocast leaves the LSTM's kernel and
    its products in float32 (a warning says so where MKL lacks the hardware): the same values as
    without autocast."""
    net = dp.batched(dp.LSTM(8))
    xs = jax.random.normal(key, (3, 5, 4))
    params = net.layer.init(key, xs[0])
    for blas, hardware in ((None, True), ({"packed": None}, False)):
        monkeypatch.setattr(kernels.products, "vendor_blas", lambda: blas)
        monkeypatch.setattr(kernels.products, "bfloat16_hardware", lambda: hardware)
        kernels.library.bfloat16_in_float32.cache_clear()
        with kernels.autocast(jnp.bfloat16), warnings.catch_warnings(record=True):
            assert not kernels.products.bfloat16_products()
            apply = jax.jit(net.apply)
            out, hlo = apply(params, xs), apply.lower(params, xs).compile().as_text()
        assert "bfloat16 = true" not in hlo and "bf16" not in hlo
        chex.assert_trees_all_close(out, jax.jit(net.apply)(params, xs), atol=1e-6)


def test_lstm_kernel_gradients_against_finite_differences(key):
    layer, (weights, xs, carry, valid) = lstm_arguments(key, 5, 3, 2, 4, [5, 2, 4])

    def f(w_x, w_h, xs, carry):
        final, outs = kernels.lstm_recurrence(layer, False, weights._replace(w_x=w_x, w_h=w_h), xs, carry, valid)
        return outs["h"], final
    check_grads(f, (weights.w_x, weights.w_h, xs, carry), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_lstm_layer_uses_the_kernel_on_the_cpu_only(key):
    layer = dp.batched(dp.LSTM(4))
    xs = jnp.ones((2, 3, 5))
    params = layer.init(key, xs)
    step = jax.jit(jax.grad(lambda p: layer.apply(p, xs).sum()))
    lowered = {platform: step.trace(params).lower(lowering_platforms=(platform,)).as_text()
               for platform in ("cpu", "cuda")}
    assert "diffprog_lstm_forward" in lowered["cpu"] and "diffprog_lstm_backward" in lowered["cpu"]
    assert "diffprog_lstm" not in lowered["cuda"]
    gates = dp.batched(dp.LSTM(4, return_gates=True))
    assert "diffprog_lstm" not in jax.jit(gates.apply).trace(params, xs).lower().as_text()


def test_lstm_kernel_under_vmap_is_a_loop_over_the_calls(key):
    steps, batch, hidden = 4, 3, 8
    ks = jax.random.split(key, 4)
    xw = jax.random.normal(ks[0], (2, steps, batch, 4 * hidden))
    w_h = jax.random.normal(ks[1], (2, hidden, 4 * hidden))
    h0, c0 = jax.random.normal(ks[2], (2, 2, batch, hidden))
    bias, lengths = jnp.zeros(4 * hidden), jnp.array([4, 1, 3])
    weights = lambda w_h: Weights(None, w_h, bias, bias)
    mapped = jax.vmap(lambda xw, w_h, h, c: kernels.lstm_forward(weights(w_h), xw, {"h": h, "c": c}, lengths))(
        xw, w_h, h0, c0)
    for i in range(2):
        chex.assert_trees_all_close(tuple(m[i] for m in mapped),
                                    tuple(kernels.lstm_forward(weights(w_h[i]), xw[i], {"h": h0[i], "c": c0[i]}, lengths)))


def test_lstm_kernel_rejects_mismatched_shapes():
    xw, state = jnp.zeros((3, 2, 8)), jnp.zeros((2, 2))
    with pytest.raises(ValueError, match=r"lstm_forward: for xw \(3, 2, 8\).*'w_h': \(2, 8\).*'w_h': \(3, 8\)"):
        kernels.lstm_forward(Weights(None, jnp.zeros((3, 8)), jnp.zeros(8), jnp.zeros(8)), xw,
                             {"h": state, "c": state}, jnp.array([3, 3]))


def test_kernels_run_on_each_devices_shard_of_the_batch(monkeypatch):
    """Under a 4-device data-parallel mesh (conftest's host devices) the C++ kernels (LSTM,
    causal attention) run on each device's quarter of the batch: the compiled step has the
    kernels and no all-gather (XLA would otherwise gather the batch in front of each kernel and
    run it whole on every device), and its losses equal the 1-device run's. So for the LSTM's
    weight gradients by MKL over its time-major rows (`summed_products`, at any size here), and
    for the LSTM in bfloat16 (autocast: MKL's products over all steps on batch-major rows) where
    MKL has bfloat16 hardware."""
    assert len(jax.devices()) >= 4
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_WORK", 1)
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_SIDE", 1)
    bodies = {"lstm": (dp.LSTM(16) ** 2, None), "transformer": (dp.TransformerBlock(16, 2, 32, causal=True) ** 2, None)}
    if kernels.vendor_blas() is not None and kernels.library.bfloat16_hardware():
        bodies["lstm in bfloat16"] = (dp.LSTM(16) ** 2, jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(1), (8, 12), 0, 11)
    batch = {"inputs": ids, "targets": jnp.roll(ids, -1, 1)}
    loss = lambda logits, batch: dp.metrics.cross_entropy(logits, batch["targets"])
    optimizer = optax.adam(1e-2)
    for name, (body, dtype) in bodies.items():
        positions = dp.LearnedPositions(12) if name == "transformer" else None
        model = dp.LanguageModel(11, 16, body, positions=positions, per_position=True)
        params = model.init(jax.random.key(0), ids[0])
        losses = {}
        for devices in (1, 4):
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
            step = dp.TrainStep(model, loss, optimizer, dtype, mesh=mesh)
            run, state, put = step.compile(step.init(jax.tree.map(jnp.copy, params)), batch)
            if devices == 4:
                hlo = run.lower(state, put(batch)).compile().as_text().splitlines()
                kernels_in_step = sum('custom_call_target="diffprog_' in line for line in hlo)
                assert kernels_in_step >= 2 and not any("all-gather" in line for line in hlo), name
                # the first LSTM reads its inputs' rows from the projected embedding table, sharded by ids
                assert any("diffprog_lstm_forward_from_table" in line for line in hlo) == name.startswith("lstm")
            losses[devices] = []
            for _ in range(3):
                state, value = run(state, put(batch))
                losses[devices].append(float(value))
        np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5, err_msg=name)


KERNELS_AT_ONCE = """
import jax, jax.numpy as jnp
import diffprog as dp
assert dp.kernels.available()
model = dp.transformer_seq2seq(10, 10, 24, 2, 48, 2, 16)
src = jax.random.randint(jax.random.key(0), (32, 5), 2, 10)
tin = jnp.concatenate([jnp.ones((32, 1), jnp.int32), src[:, :0:-1]], 1)
params = model.init(jax.random.key(0), (src[0], tin[0]))
loss = lambda p: dp.metrics.cross_entropy(jax.vmap(model.apply, (None, 0))(p, (src, tin)), src[:, ::-1])
step = jax.jit(jax.grad(loss))
for _ in range(300):
    jax.block_until_ready(step(params))
print("finished")
"""


@pytest.mark.slow
def test_kernels_running_at_once_on_xlas_threads_finish():
    """An encoder's and a decoder's self-attention are independent: XLA runs the two kernel calls
    at once on its pool threads. Each kernel once scheduled part of its work on the pool and
    waited for it while every pool thread was doing the same, forever; now a kernel's calling
    thread does the work no other thread has started. The program repeats one such gradient
    300 times (with the old kernels it hung within that in 4 runs of 4); a hang is a timeout."""
    out = subprocess.run([sys.executable, "-c", KERNELS_AT_ONCE], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.split()[-1] == "finished", out.stderr[-3000:]


# -- the vendor's matrix products (MKL) --------------------------------------------------------

def test_mkl_is_there_where_it_is_a_dependency():
    """pyproject.toml installs mkl and mkl-include on x86-64 Linux: there the products must take it."""
    if sys.platform == "linux":
        assert kernels.vendor_blas() is not None


needs_mkl = pytest.mark.skipif(kernels.vendor_blas() is None, reason="MKL is not installed")


@pytest.fixture
def mkl_at_full_width(monkeypatch):
    """The seam's choices where MKL runs at the CPU's width (Intel's CPUs, AVX2 ones), on any CPU
    with MKL: on AMD's AVX-512 ones `runs_on_mkl` keeps gemm.cc for the micro-kernel's products
    alone (tested apart), so MKL's handlers and their routes are tested here."""
    monkeypatch.setattr(kernels.products, "mkl_at_full_width", lambda: True)


@pytest.fixture
def float32_products(request):
    """gemm.cc's float32 products of depth ≤ 256 by MKL (`use_vendor_sgemm(True)`) or by cpu.h's
    micro-kernel (False), as the test's `route` says; the default again afterwards."""
    route = request.node.callspec.params["route"]
    if route in ("mkl", "micro-kernel"):
        kernels.library.use_vendor_sgemm(route == "mkl")
    yield
    kernels.library.use_vendor_sgemm(kernels.library.float32_by_mkl())


@needs_mkl
@pytest.mark.parametrize("dtype, route, sizes", [
    (jnp.float32, "mkl", (50, 37, 29)), (jnp.float32, "micro-kernel", (127, 256, 70)), (jnp.bfloat16, "chosen", (50, 37, 29)),
    (jnp.bfloat16, "mkl", (50, 37, 29))])
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_matches_xla_values_gradients_and_vmap(transpose_a, transpose_b, dtype, route, sizes, key, monkeypatch,
                                                    float32_products):
    """C = op(A) op(B) by MKL or, in float32, by the micro-kernel where it takes the product
    (depth ≤ 256, A not transposed: here M 127 crosses a block of 120 rows, N 70 a panel's edge, and
    127 · 256 · 70 multiply-adds pass kSplitWork, so the threads split the panels), in bfloat16 Aᵀ B
    by the micro-kernel's AVX512-BF16 pairs where gemm.cc takes them (`vendor_blas()["paired"]`),
    or, in bfloat16, where `runs_on_mkl` chooses XLA's dot into float32, against XLA's dot: values,
    both gradients, and vmap over A (folded into rows), over B and over both (XLA's batched dot)."""
    if route != "chosen":  # gemm.cc's handlers, whichever `runs_on_mkl` would choose on this CPU
        monkeypatch.setattr(kernels.products, "runs_on_mkl", lambda *_: True)
    m, k, n = sizes
    ka, kb, kc = jax.random.split(key, 3)
    a = jax.random.normal(ka, (k, m) if transpose_a else (m, k), dtype)
    b = jax.random.normal(kb, (n, k) if transpose_b else (k, n), dtype)
    ct = jax.random.normal(kc, (m, n))
    ours = lambda a, b: kernels.gemm(a, b, transpose_a, transpose_b)
    xla = lambda a, b: jnp.matmul(a.T if transpose_a else a, b.T if transpose_b else b)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == jnp.float32 else dict(atol=0.2, rtol=2e-2)
    loss = lambda f: jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * ct), (0, 1)))
    as32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    chex.assert_trees_all_close(as32(jax.jit(ours)(a, b)), as32(xla(a, b)), **tol)
    chex.assert_trees_all_close(as32(loss(ours)(a, b)), as32(loss(xla)(a, b)), **tol)
    on_mkl = 'custom_call_target="diffprog_gemm_' in jax.jit(ours).lower(a, b).compile().as_text()
    assert on_mkl == (route != "chosen" or kernels.products.runs_on_mkl(transpose_a, a.shape[0] if transpose_a else a.shape[1],
                                                                         jnp.dtype(dtype), transpose_b))
    stacked = lambda x: jnp.stack([x, 2 * x, -x])
    for axes in ((0, None), (None, 0), (0, 0)):
        args = [stacked(x) if axis == 0 else x for x, axis in zip((a, b), axes)]
        chex.assert_trees_all_close(as32(jax.jit(jax.vmap(ours, axes))(*args)), as32(jax.vmap(xla, axes)(*args)), **tol)


@needs_mkl
def test_a_jitted_step_with_mkl_products_is_dispatched_without_python(key, monkeypatch):
    """`gemm` is a plain JAX primitive: after the first call, a jitted training step holding it
    (forward and both gradients) runs on jit's C++ dispatch path. With `jax_no_tracing` any call
    that falls back to Python (a retrace, or a per-call lowering) raises."""
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_WORK", 1)
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_SIDE", 1)
    model = dp.batched(dp.Dense(4) @ dp.FeedForward(16))
    xs = jax.random.normal(key, (3, 5, 8))
    step = jax.jit(jax.value_and_grad(lambda p, xs: jnp.sum(model.apply(p, xs) ** 2)))
    params = model.init(key, xs)
    assert 'custom_call_target="diffprog_gemm_f32"' in step.lower(params, xs).compile().as_text()
    first = step(params, xs)
    jax.config.update("jax_no_tracing", True)
    try:
        again = step(params, xs)
    finally:
        jax.config.update("jax_no_tracing", False)
    chex.assert_trees_all_equal(again, first)


def test_without_jaxs_device_registry_the_products_are_xlas(key, monkeypatch):
    """gemm's CPU lowering needs jax's (internal) registry of primitives that lower with their
    devices; a jax without it keeps XLA's dot in `product`, in float32 and under autocast."""
    monkeypatch.setattr(kernels.products, "_needs_devices", None)
    a, b = jax.random.normal(key, (2, 256, 256))
    product = jax.jit(lambda a, b: kernels.product(a, b))
    assert "diffprog_gemm" not in product.lower(a, b).compile().as_text()
    chex.assert_trees_all_close(product(a, b), a @ b, atol=1e-4)
    with kernels.autocast(jnp.bfloat16):
        assert not kernels.products.bfloat16_products()
        rounded = jax.jit(lambda a, b: kernels.product(a, b))
        assert "diffprog_gemm" not in rounded.lower(a, b).compile().as_text()


@needs_mkl
def test_gemm_derivatives_to_second_order_against_finite_differences(key):
    a, b = jax.random.normal(key, (2, 6, 6))
    check_grads(lambda a, b: kernels.gemm(a, b, False, True), (a, b), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


@needs_mkl
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True)])
def test_gemm_under_checkpoint_and_linearize(transpose_a, transpose_b, key):
    """Reverse mode through `jax.checkpoint` (as `dp.Remat` runs) and `jax.linearize` transpose
    the product's jvp terms: both agree with XLA's dot."""
    ka, kb, kc = jax.random.split(key, 3)
    a, b = jax.random.normal(ka, (2, 7, 7))
    ct = jax.random.normal(kc, (7, 7))
    ours = lambda a, b: kernels.gemm(a, b, transpose_a, transpose_b)
    xla = lambda a, b: jnp.matmul(a.T if transpose_a else a, b.T if transpose_b else b)
    loss = lambda f: lambda a, b: jnp.sum(jnp.tanh(f(a, b)) * ct)
    chex.assert_trees_all_close(jax.jit(jax.grad(jax.checkpoint(loss(ours)), (0, 1)))(a, b),
                                jax.grad(loss(xla), (0, 1))(a, b), atol=1e-5)
    tangent = jax.random.normal(kb, (7, 7))
    _, linear = jax.linearize(lambda a: ours(a, b), a)
    chex.assert_trees_all_close(linear(tangent), jax.jvp(lambda a: xla(a, b), (a,), (tangent,))[1], atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("route", ["micro-kernel", "mkl"])
def test_relu_affine_kernel_matches_its_definition(route, key, float32_products):
    """relu(x w + b) in one gemm.cc call — the bias and the ReLU applied as the micro-kernel stores
    each tile, or (MKL's products) as a pass over each thread's part — against its definition:
    values and the three gradients, jitted, at odd sizes (x (2, 67, 200): 134 rows, not a whole
    number of 6-row tiles; 70 outputs, a panel's edge; past kSplitWork, so the threads split
    the work); vmap over examples (folded into the rows) and over the weights (one call each)."""
    kx, kw, kb, kc = jax.random.split(key, 4)
    x, w = jax.random.normal(kx, (2, 67, 200)), jax.random.normal(kw, (200, 70)) / 10
    b, ct = jax.random.normal(kb, (70,)), jax.random.normal(kc, (2, 67, 70))
    definition = lambda x, w, b: jax.nn.relu(jnp.einsum("...d,do->...o", x, w, precision="highest") + b)
    fused = kernels.products._fused_relu_affine
    assert 'custom_call_target="diffprog_relu_affine_f32"' in jax.jit(fused).lower(x, w, b).compile().as_text()
    tol = dict(atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(jax.jit(fused)(x, w, b), definition(x, w, b), **tol)
    assert 0.3 < float((definition(x, w, b) > 0).mean()) < 0.7  # both sides of the ReLU are tested
    loss = lambda f: jax.jit(jax.grad(lambda x, w, b: jnp.sum(f(x, w, b) * ct), (0, 1, 2)))
    chex.assert_trees_all_close(loss(fused)(x, w, b), loss(definition)(x, w, b), **tol)
    chex.assert_trees_all_close(jax.jit(jax.vmap(fused, (0, None, None)))(x, w, b), definition(x, w, b), **tol)
    ws = jnp.stack([w, -w])
    chex.assert_trees_all_close(jax.jit(jax.vmap(fused, (0, 0, None)))(x, ws, b),
                                jax.vmap(definition, (0, 0, None))(x, ws, b), **tol)


@needs_mkl
def test_feedforward_relu_takes_the_fused_kernel_where_the_product_is_shallow(key):
    """FeedForward(out) with its ReLU and bias runs `relu_affine`'s one call where gemm.cc's
    float32 product is shallow and the micro-kernel's (AVX2 CPUs), and only then: not for another
    activation, without a bias, past SHALLOW_DEPTH, on an accelerator, under `disabled()`; the
    layer's output is the same either way."""
    x = jax.random.normal(key, (8, 128, 256))
    def targets(layer, x=x, **lowering):
        params = layer.init(key, x[0])
        traced = jax.jit(dp.batched(layer).apply).trace(params, x)
        return (traced.lower(**lowering).compile() if not lowering else traced.lower(**lowering)).as_text()
    fused = not kernels.library.float32_by_mkl()
    assert ("diffprog_relu_affine_f32" in targets(dp.FeedForward(512))) == fused
    assert "diffprog_relu_affine_f32" not in targets(dp.FeedForward(512, "gelu"))
    assert "diffprog_relu_affine_f32" not in targets(dp.FeedForward(512, use_bias=False))
    assert "diffprog_relu_affine_f32" not in targets(dp.FeedForward(512), x=jnp.concatenate([x, x], -1))
    assert "diffprog_relu_affine" not in targets(dp.FeedForward(512), lowering_platforms=("cuda",))
    layer = dp.FeedForward(512)
    params = layer.init(key, x[0])
    with kernels.disabled():
        assert "diffprog_relu_affine" not in jax.jit(dp.batched(layer).apply).lower(params, x).as_text()
        want = dp.batched(layer).apply(params, x)
    chex.assert_trees_all_close(jax.jit(dp.batched(layer).apply)(params, x), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"relu_affine: expected w \(d, out\), .* got w \(256, 512\), x \(8, 128, 256\) and b \(511,\)"):
        kernels.relu_affine(x, params["weight"], params["bias"][:-1])
    with pytest.raises(ValueError, match=r"relu_affine: expected w \(d, out\), .* got w \(1, 256, 512\)"):
        kernels.relu_affine(x, params["weight"][None], params["bias"])


@needs_mkl
def test_dense_takes_mkl_on_the_cpu_only_and_agrees_with_xla(key, monkeypatch, mkl_at_full_width):
    """The seam picks MKL for a Dense layer over a batch (its gradient too, one product over all
    rows) on the CPU, XLA's dot on accelerators and inside `disabled()`; per-example gradients
    (vmap of grad) and batch gradients (grad of vmap) agree with the reference."""
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_WORK", 1)
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_SIDE", 1)
    net, xs = dp.batched(dp.Dense(5) @ dp.FeedForward(12)), jax.random.normal(key, (3, 7, 6))
    params = net.init(key, xs)
    batch_grad = jax.jit(jax.grad(lambda p, xs: net.apply(p, xs).sum()))
    compiled = batch_grad.lower(params, xs).compile().as_text()
    # FeedForward's product (with its bias and ReLU where `relu_affine` fuses them) and weight
    # gradient, Dense's weight and input gradients (the loss's value, and so Dense's own product,
    # is not needed for the gradient)
    fused = not kernels.library.float32_by_mkl()
    assert compiled.count('custom_call_target="diffprog_gemm_f32"') == 4 - fused
    assert compiled.count('custom_call_target="diffprog_relu_affine_f32"') == fused
    accelerator = batch_grad.trace(params, xs).lower(lowering_platforms=("cuda",)).as_text()
    assert "diffprog_gemm" not in accelerator and "diffprog_relu_affine" not in accelerator
    per_example = jax.jit(jax.vmap(jax.grad(lambda p, x: net.layer.apply(p, x).sum()), (None, 0)))
    got = batch_grad(params, xs), per_example(params, xs)
    with kernels.disabled():
        fresh = jax.jit(jax.grad(lambda p, xs: net.apply(p, xs).sum()))
        assert "diffprog_gemm" not in fresh.trace(params, xs).lower().as_text()
        want = jax.grad(lambda p, xs: net.apply(p, xs).sum())(params, xs), \
            jax.vmap(jax.grad(lambda p, x: net.layer.apply(p, x).sum()), (None, 0))(params, xs)
    chex.assert_trees_all_close(got, want, atol=1e-5)


@needs_mkl
def test_where_mkl_runs_narrower_than_the_cpu_gemm_cc_takes_only_the_micro_kernels_products(key, monkeypatch):
    """On AMD's AVX-512 CPUs (`mkl_at_full_width()` False: MKL runs its AVX2 code there) the seam
    keeps gemm.cc for float32 products the micro-kernel runs (depth ≤ 256, A not transposed) and
    gives XLA's dot the rest — deeper products, weight gradients (Aᵀ B from a transposed copy of
    A; `summed_products`),
    autocast's bfloat16 products — and the LSTM's steps run in bfloat16 under autocast (by the
    micro-kernel's AVX512-BF16 pairs): the values and gradients of the definitions."""
    monkeypatch.setattr(kernels.products, "mkl_at_full_width", lambda: False)
    monkeypatch.setattr(kernels.products, "float32_by_mkl", lambda: False)
    monkeypatch.setattr(kernels.products, "bfloat16_hardware", lambda: True)
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_WORK", 1)
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_SIDE", 1)
    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    runs = kernels.products.runs_on_mkl
    assert runs(False, 256, f32) and not runs(True, 256, f32) and not runs(False, 257, f32)
    assert not runs(False, 64, bf16) and not runs(True, 64, bf16, True)
    assert runs(True, 64, bf16) == kernels.vendor_blas()["paired"]  # Aᵀ B by AVX512-BF16's pairs where built
    net, xs = dp.batched(dp.Dense(5) @ dp.FeedForward(300) @ dp.FeedForward(12)), jax.random.normal(key, (3, 7, 6))
    params = net.init(key, xs)
    loss = lambda p, xs: jnp.sum(jnp.sin(net.apply(p, xs)))
    grad = jax.jit(jax.grad(loss, (0, 1)))
    compiled = grad.lower(params, xs).compile().as_text()
    # gemm.cc: FeedForward(12)'s x W (depth 6, fused with its bias and ReLU), FeedForward(300)'s
    # (depth 12), and the input gradients of depth ≤ 256 (Dense's ∂y Wᵀ, depth 5; FeedForward(300)'s
    # is 300 deep: XLA's); no weight gradient
    assert compiled.count('custom_call_target="diffprog_relu_affine_f32"') == 2
    assert compiled.count('custom_call_target="diffprog_gemm_f32"') == 2
    # the weight gradients xᵀ ∂y from a transposed copy of x (XLA:CPU contracts an operand's rows slowly)
    assert grad.lower(params, xs).as_text().count("stablehlo.optimization_barrier") >= 3
    with kernels.disabled():
        want = jax.grad(loss, (0, 1))(params, xs)
    chex.assert_trees_all_close(grad(params, xs), want, atol=1e-5)
    a, b = jax.random.normal(key, (2, 7, 8, 16))
    assert "diffprog_gemm" not in jax.jit(lambda a, b: kernels.products.summed_products(a, b)).lower(a, b).as_text()
    lstm = dp.batched(dp.LSTM(8))
    lstm_params = lstm.layer.init(key, xs[0])
    with kernels.autocast(jnp.bfloat16):
        product = jax.jit(lambda a, b: kernels.product(a, b))
        hlo = product.lower(a[0], b[0].T).compile().as_text(), jax.jit(lstm.apply).lower(lstm_params, xs).compile().as_text()
        out = product(a[0], b[0].T)
    assert "diffprog_gemm" not in hlo[0] and "bf16" in hlo[0]
    rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    chex.assert_trees_all_close(out, rounded(a[0]) @ rounded(b[0].T), atol=1e-4)
    assert "bfloat16 = true" in hlo[1] and "bfloat16 = false" not in hlo[1]


@pytest.mark.skipif(kernels.vendor_blas() is None or not kernels.vendor_blas()["paired"],
                    reason="gemm.cc's bfloat16 Aᵀ B by AVX512-BF16's pairs is taken where MKL runs narrower than the CPU")
@pytest.mark.parametrize("rows, m, n", [(37, 5, 21), (301, 70, 33), (301, 33, 70), (1024, 64, 96)])
def test_bfloat16_transposed_products_by_the_micro_kernels_pairs(rows, m, n, key):
    """Where gemm.cc takes bfloat16 Aᵀ B (AMD's AVX-512 CPUs with AVX512-BF16: XLA's dot runs it in
    float32), cpu.h's micro-kernel on pairs of rows computes it: Aᵀ B of the operands rounded to
    bfloat16, summed in float32 — an odd number of rows (the last pair padded), panel edges, more
    columns of A than of B (computed as (Bᵀ A)ᵀ), and sizes the threads split."""
    a, b = jax.random.normal(key, (rows, m)), jax.random.normal(jax.random.fold_in(key, 1), (rows, n))
    product = jax.jit(lambda a, b: kernels.gemm(a, b, transpose_a=True, precision=jnp.bfloat16))
    assert 'custom_call_target="diffprog_gemm_bf16"' in product.lower(a, b).compile().as_text()
    rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    want = jnp.matmul(rounded(a).T, rounded(b), precision="highest")
    chex.assert_trees_all_close(product(a, b), want, atol=1e-5 * rows ** 0.5 * 4, rtol=1e-5)
    assert float(jnp.max(jnp.abs(product(a, b) - a.T @ b))) > 1e-3  # the operands were rounded


@needs_mkl
def test_summed_products_by_mkl_agree_with_tensordot_under_grad_vmap_and_a_mesh(key, monkeypatch, mkl_at_full_width):
    """summed_products(a (T, B, K), b (T, B, N)) = Σ_{t,b} a_tbᵀ b_tb: on the CPU one MKL call
    (Aᵀ B on the merged rows) whose value, gradients (to second order) and vmap equal
    tensordot's; small sums and `disabled()` stay tensordot; under a 4-device mesh sharding B,
    each device sums its rows and the devices add them (no all-gather of the batch)."""
    a, b = jax.random.normal(key, (7, 8, 5)), jax.random.normal(jax.random.fold_in(key, 1), (7, 8, 3))
    fresh = lambda: jax.jit(lambda a, b: kernels.products.summed_products(a, b))  # traced anew: jit caches by function
    assert "diffprog_gemm" not in fresh().lower(a, b).as_text()  # below VENDOR_MIN_WORK
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_WORK", 1)
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_SIDE", 1)
    summed = fresh()
    assert summed.lower(a, b).compile().as_text().count('custom_call_target="diffprog_gemm_f32"') == 1
    reference = lambda a, b: jnp.tensordot(a, b, ((0, 1), (0, 1)))
    np.testing.assert_allclose(summed(a, b), reference(a, b), rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.fold_in(key, 2), (5, 3))
    loss = lambda f: lambda a, b: jnp.sum(jnp.tanh(f(a, b)) * weights)
    chex.assert_trees_all_close(jax.grad(loss(summed), (0, 1))(a, b), jax.grad(loss(reference), (0, 1))(a, b), atol=1e-5)
    second = lambda f: jax.grad(lambda a: jnp.sum(jax.grad(loss(f))(a, b) ** 2))(a)
    np.testing.assert_allclose(second(summed), second(reference), rtol=1e-4, atol=1e-4)
    stacked = jnp.stack([a, -a]), jnp.stack([b, 2 * b])
    np.testing.assert_allclose(jax.vmap(summed)(*stacked), jax.vmap(reference)(*stacked), rtol=1e-5, atol=1e-5)
    with kernels.disabled():
        assert "diffprog_gemm" not in fresh().lower(a, b).as_text()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", None))
    hlo = summed.lower(jax.device_put(a, sharded), jax.device_put(b, sharded)).compile().as_text()
    assert "diffprog_gemm_f32" in hlo and "all-gather" not in hlo and "all-reduce" in hlo
    np.testing.assert_allclose(summed(jax.device_put(a, sharded), jax.device_put(b, sharded)), reference(a, b),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same leading axes"):
        kernels.products.summed_products(a, b[:, :4])


@needs_mkl
def test_bfloat16_products_sum_in_float32(key):
    """A bfloat16 product over K = 4096 terms: MKL sums in float32, so its error is that of
    rounding the operands and the result, well below a sum kept in bfloat16."""
    a, b = jax.random.normal(key, (2, 4096, 8))
    exact = a.T @ b
    ours = kernels.gemm(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), True, False).astype(jnp.float32)
    assert jnp.max(jnp.abs(ours - exact)) < 0.02 * jnp.max(jnp.abs(exact))


@needs_mkl
def test_mkl_products_run_on_each_devices_shard_of_the_batch(monkeypatch, mkl_at_full_width):
    """Under a 4-device data-parallel mesh each device multiplies its rows of the batch (and its
    slice of the weight gradient's sum, added across devices): no all-gather, and the losses of
    the 1-device run."""
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_WORK", 1)
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_SIDE", 1)
    ids = jax.random.randint(jax.random.key(1), (8, 12), 0, 11)
    batch = {"inputs": ids, "targets": jnp.roll(ids, -1, 1)}
    model = dp.Dense(11) @ dp.FeedForward(32) @ dp.EmbedToken(11, 16)
    params = model.init(jax.random.key(0), ids[0])
    losses = {}
    for devices in (1, 4):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
        step = dp.TrainStep(model, lambda out, b: dp.metrics.cross_entropy(out, b["targets"]), optax.adam(1e-2), mesh=mesh)
        run, state, put = step.compile(step.init(jax.tree.map(jnp.copy, params)), batch)
        hlo = run.lower(state, put(batch)).compile().as_text()
        assert hlo.count('custom_call_target="diffprog_gemm_f32"') >= 4 and "all-gather" not in hlo
        losses[devices] = []
        for _ in range(3):
            state, value = run(state, put(batch))
            losses[devices].append(float(value))
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)


@needs_mkl
def test_autocast_runs_the_products_in_bfloat16_and_training_in_it_matches_float32(key, mkl_at_full_width):
    """`autocast`: float32 in and out, the operands rounded to bfloat16 (MKL's bfloat16 kernel)
    where the CPU has AMX or AVX512-BF16; where it has neither, float32 products and a warning
    that says so. A TrainStep with compute_dtype=bfloat16 on the CPU keeps float32 params and
    activations and runs its products so: its losses track float32's (final loss within 2 %)."""
    a, b = jax.random.normal(key, (2, 256, 256))  # big enough for MKL (smaller products stay float32)
    hardware = kernels.library.bfloat16_hardware()
    kernels.library.bfloat16_in_float32.cache_clear()
    with kernels.autocast(jnp.bfloat16), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        product = jax.jit(lambda a, b: kernels.product(a, b, transpose_a=True))
        out = product(a, b)
    assert out.dtype == jnp.float32
    assert any("neither AMX nor AVX512-BF16" in str(w.message) for w in caught) != hardware
    if hardware:
        rounded = a.astype(jnp.bfloat16).astype(jnp.float32).T @ b.astype(jnp.bfloat16).astype(jnp.float32)
        chex.assert_trees_all_close(out, rounded, atol=1e-3, rtol=1e-4)
        assert jnp.max(jnp.abs(out - a.T @ b)) > 1e-2  # the operands were rounded
    else:
        chex.assert_trees_all_close(out, a.T @ b, atol=1e-3, rtol=1e-5)  # float32 products
    target = "diffprog_gemm_bf16" if hardware else "diffprog_gemm_f32"
    assert f'custom_call_target="{target}"' in product.lower(a, b).compile().as_text()

    ids = (jnp.arange(32)[None] + 5 * jnp.arange(16)[:, None]) % 13  # the next token is the token + 1
    batch = {"inputs": ids, "targets": (ids + 1) % 13}
    model = dp.Dense(13) @ dp.FeedForward(256) @ dp.FeedForward(256) @ dp.EmbedToken(13, 128)
    params = model.init(jax.random.key(0), ids[0])
    final = {}
    for dtype in (None, jnp.bfloat16):
        step = dp.TrainStep(model, lambda out, b: dp.metrics.cross_entropy(out, b["targets"]), optax.adam(3e-3), dtype)
        run, state, put = step.compile(step.init(jax.tree.map(jnp.copy, params)), batch)
        if dtype is not None:
            assert f'custom_call_target="{target}"' in run.lower(state, put(batch)).compile().as_text()
        for _ in range(10):
            state, value = run(state, put(batch))
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))
        final[dtype] = float(value)
    assert final[None] < 1.0 and abs(final[jnp.bfloat16] - final[None]) < 0.02 * final[None]


@needs_bfloat16_mkl
def test_bfloat16_products_take_xlas_dot_but_for_the_weight_gradients(key, mkl_at_full_width):
    """Under autocast, with bfloat16 hardware: x W and ∂y Wᵀ run as XLA's dot into float32 (the
    faster there), xᵀ ∂y (A contracted over its rows) as MKL's; the values and gradients are
    those of products of the rounded operands."""
    x, w = jax.random.normal(key, (2, 256, 256))
    rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(kernels.product(x, w)))
    with kernels.autocast(jnp.bfloat16):
        forward, gradient = jax.jit(lambda x, w: kernels.product(x, w)), jax.jit(jax.grad(loss, (0, 1)))
        compiled = forward.lower(x, w).compile().as_text(), gradient.lower(x, w).compile().as_text()
        got = forward(x, w), gradient(x, w)
    assert "diffprog_gemm" not in compiled[0] and "bf16" in compiled[0]
    assert compiled[1].count('custom_call_target="diffprog_gemm_bf16"') == 1  # xᵀ ∂y alone
    cotangent = jnp.cos(rounded(x) @ rounded(w))
    chex.assert_trees_all_close(got[0], rounded(x) @ rounded(w), atol=1e-3, rtol=1e-4)
    assert jnp.max(jnp.abs(got[0] - x @ w)) > 1e-2  # the operands were rounded
    want = rounded(cotangent) @ rounded(w).T, rounded(x).T @ rounded(cotangent)
    chex.assert_trees_all_close(got[1], want, atol=5e-2, rtol=1e-3)  # a cotangent may round the other way


@needs_mkl
def test_without_bfloat16_hardware_autocast_keeps_float32_products_and_says_so(key, monkeypatch):
    """Where MKL's bfloat16 products would be emulated (no AMX, no AVX512-BF16), they run as
    float32 products — exact float32 values — with a warning."""
    monkeypatch.setattr(kernels.products, "bfloat16_hardware", lambda: False)
    kernels.library.bfloat16_in_float32.cache_clear()
    a, b = jax.random.normal(key, (2, 256, 256))
    with kernels.autocast(jnp.bfloat16), pytest.warns(UserWarning, match="neither AMX nor AVX512-BF16"):
        product = jax.jit(lambda a, b: kernels.product(a, b))
        out = product(a, b)
    compiled = product.lower(a, b).compile().as_text()
    assert 'custom_call_target="diffprog_gemm_f32"' in compiled and "diffprog_gemm_bf16" not in compiled
    chex.assert_trees_all_close(out, a @ b, atol=1e-3, rtol=1e-5)


def test_autocast_and_gemm_reject_what_they_cannot_compute(key):
    """autocast runs bfloat16 products only (float16 would reach MKL's float32 kernel with
    float16 data); gemm names operands whose products do not chain or whose dtypes differ."""
    with pytest.raises(ValueError, match=r"autocast: products run in bfloat16.*got float16"):
        with kernels.autocast(jnp.float16):
            pass
    a = jnp.ones((5, 7))
    with pytest.raises(ValueError, match=r"gemm: .*\(5, 7\) float32 and \(5, 3\) float32"):
        kernels.gemm(a, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"gemm: .*\(5, 7\) float32 and \(7, 3\) bfloat16"):
        kernels.gemm(a, jnp.ones((7, 3), jnp.bfloat16))


def test_float16_compute_dtype_on_the_cpu_casts_as_before(key):
    """Only bfloat16 becomes autocast on the CPU; float16 still casts params and inputs."""
    ids = jnp.arange(2 * 12).reshape(2, 12) % 7
    model = dp.Dense(7) @ dp.FeedForward(16) @ dp.EmbedToken(7, 8)
    step = dp.TrainStep(model, lambda out, b: dp.metrics.cross_entropy(out, b["targets"]), optax.adam(1e-3), jnp.float16)
    params = model.init(jax.random.key(0), ids[0])
    jaxpr = str(jax.make_jaxpr(lambda p: step.outputs(p, {"inputs": ids, "targets": ids}))(params))
    assert "f16[" in jaxpr
    state, loss = jax.jit(step)(step.init(params), {"inputs": ids, "targets": ids})
    assert jnp.isfinite(loss) and all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))


def test_add_to_each_sums_the_gradient_by_a_product_with_ones(key):
    """`add_to_each` (a learned positional table added to every example): values and gradients
    those of `xs + y` (under jit and vmap too), the table's gradient a product with ones on the
    CPU — not XLA's sum over the leading axis, 20–40× slower there — and `LearnedPositions` on a
    batch takes it."""
    xs, ct = jax.random.normal(key, (2, 5, 12, 8))
    y = jax.random.normal(jax.random.key(1), (12, 8))
    loss = lambda add: lambda xs, y: jnp.sum(jnp.sin(add(xs, y)) * ct)
    fast, plain = jax.grad(loss(kernels.add_to_each), (0, 1)), jax.grad(loss(jnp.add), (0, 1))
    chex.assert_trees_all_close(jax.jit(fast)(xs, y), plain(xs, y), atol=1e-5)
    chex.assert_trees_all_close(kernels.add_to_each(xs, y), xs + y)
    with pytest.raises(ValueError, match=r"add_to_each: expected y shaped like one example .*\(12, 8\).*got \(8,\)"):
        kernels.add_to_each(xs, y[0])  # would broadcast
    many = jnp.stack([y, 2 * y])
    chex.assert_trees_all_close(jax.vmap(jax.grad(loss(kernels.add_to_each), 1), (None, 0))(xs, many),
                                jax.vmap(jax.grad(loss(jnp.add), 1), (None, 0))(xs, many), atol=1e-5)
    compiled = jax.jit(fast).lower(xs, y).compile().as_text()
    assert "dot(" in compiled and "reduce(" not in compiled
    layer = dp.LearnedPositions(16)
    params = layer.init(key, xs[0])
    grad = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(dp.batched(layer).apply(p, xs)))))
    assert "reduce(" not in grad.lower(params).compile().as_text()
    chex.assert_trees_all_close(grad(params), jax.grad(lambda p: jnp.sum(jax.vmap(
        lambda x: jnp.sin(layer.apply(p, x)))(xs)))(params), atol=1e-5)


@pytest.mark.parametrize("hardware", [False, True], ids=["emulated bfloat16", "bfloat16 hardware"])
def test_bfloat16_layers_run_in_float32_on_the_cpu_their_products_in_bfloat16_where_the_hardware_is(key, monkeypatch,
                                                                                                   hardware):
    """A model in bfloat16 (params and inputs) on the CPU: the kernels (self-attention, the LSTM,
    the selective scan), the scan of the other recurrent layers, the position-wise layers, rotary
    positions, Attention and SelectiveSSM run in float32 on the bfloat16 inputs, their results
    rounded to bfloat16 — the float32 model's outputs and gradients to bfloat16's precision. So
    the program (its StableHLO, before XLA's passes) sums no bfloat16: the bias and scale
    gradients of Dense, FeedForward, LayerNorm, RMSNorm and attention's output projection, and
    SelectiveSSM's convolution and skip, are sums over every position, which XLA:CPU runs in
    bfloat16 as slow trees of reduce-windows (the README's Transformer LM in bfloat16: its training
    step 1.2× the float32 one where bfloat16 is emulated, 1.9× on an AMD EPYC, Zen 5, with
    AVX512-BF16). Where the CPU has bfloat16 hardware their products multiply bfloat16 operands
    into float32 (`autocast`); where it emulates bfloat16 they are float32, and a warning at the
    user's line says so."""
    for module in (kernels.library, kernels.products):
        monkeypatch.setattr(module, "bfloat16_hardware", lambda: hardware)
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_WORK", 1)  # the products take `gemm`, as at real sizes
    monkeypatch.setattr(kernels.products, "VENDOR_MIN_SIDE", 1)
    kernels.library.bfloat16_in_float32.cache_clear()
    model = (dp.Dense(11) @ dp.RMSNorm() @ dp.FeedForward(16, activation="gelu") @ dp.LSTM(16) @ dp.SelectiveSSM(4)
             @ dp.TransformerBlock(16, 2, 32, causal=True, rotary=1e4) @ dp.TransformerBlock(16, 2, 32, causal=True)
             @ dp.SimpleRNN(16) @ dp.EmbedToken(11, 16))
    net, ids = dp.batched(model), jax.random.randint(key, (3, 9), 0, 11)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.init(key, ids[0]))
    loss = lambda p: net.apply(p, ids).astype(jnp.float32).sum()
    run = jax.jit(jax.value_and_grad(loss))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowered = run.lower(params)
        hlo = lowered.compile().as_text()
    said = [w for w in caught if "neither AMX nor AVX512-BF16" in str(w.message)]
    targets = ("diffprog_projected_attention_forward", "diffprog_lstm_forward", "diffprog_selective_forward")
    assert all(t in hlo for t in targets) and bool(said) == (not hardware)
    assert ("bfloat16 = true" in hlo) == (hardware and kernels.vendor_blas() is not None)  # the LSTM's steps
    assert all(w.filename == __file__ for w in said)  # the line that traced the model, not diffprog's
    in_bfloat16 = lambda op: [line for line in lowered.as_text().splitlines()
                              if op in line and "xbf16>" in line.split("->")[-1]]
    assert not in_bfloat16("stablehlo.reduce(")
    # RoPE's gradient negates and pads the halves of q and k: in float32 (in bfloat16, ~9 ms a
    # rotation in the Transformer++ step)
    assert not in_bfloat16("stablehlo.negate") and not in_bfloat16("stablehlo.pad")
    bfloat16_products = [line for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line
                         and "xbf16>" in line.split("->")[0] and "xf32>" in line.split("->")[-1]]
    assert bool(bfloat16_products) == hardware
    value, grads = run(params)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    as_float32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    want_value, want_grads = jax.jit(jax.value_and_grad(loss))(as_float32)
    np.testing.assert_allclose(value, want_value, rtol=0.03)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.05 * float(jnp.abs(want).max()) + 1e-3)


@pytest.mark.parametrize("layer", [dp.Attention(2, causal=True), dp.Attention(2, kv_heads=1, rotary=1e4, causal=True),
                                   dp.Attention(2)], ids=repr)
def test_bfloat16_attention_where_emulated_is_float32_attention_rounded_once(layer, key, monkeypatch):
    """Where the CPU emulates bfloat16, an Attention layer on bfloat16 params and values computes
    in float32 as one computation — projections, attention, output projection — and rounds its
    result once: bit for bit the float32 layer on the same (rounded) numbers, rounded. Its
    gradients are the float32 layer's at those numbers, rounded. (Before, q, k, v and the heads'
    output were rounded to bfloat16 in between, each in a pass of its own.)"""
    monkeypatch.setattr(kernels.library, "bfloat16_hardware", lambda: False)
    kx, kp, kc = jax.random.split(key, 3)
    x = jax.random.normal(kx, (3, 9, 8)).astype(jnp.bfloat16)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), layer.init(kp, x[0]))
    ct = jax.random.normal(kc, (3, 9, 8)).astype(jnp.bfloat16).astype(jnp.float32)
    net = dp.batched(layer)
    as32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
    loss = lambda p, x: jnp.sum(net.apply(p, x).astype(jnp.float32) * ct)
    rounded_loss = lambda p, x: jnp.sum(net.apply(p, x).astype(jnp.bfloat16).astype(jnp.float32) * ct)
    y = jax.jit(net.apply)(params, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, jax.jit(net.apply)(as32(params), as32(x)).astype(jnp.bfloat16))
    grads = jax.jit(jax.grad(loss, (0, 1)))(params, x)
    want = jax.jit(jax.grad(rounded_loss, (0, 1)))(as32(params), as32(x))
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(got.astype(jnp.float32), expected.astype(jnp.bfloat16).astype(jnp.float32),
                                   rtol=1e-2, atol=1e-2 * float(jnp.abs(expected).max()))


@needs_mkl
@pytest.mark.parametrize("transpose_b", [False, True])
def test_a_recurrent_steps_product_takes_the_micro_kernel_where_it_runs_shallow_products(transpose_b, key, monkeypatch):
    """`step_product(h, w)` (each step's h W_h, and ∂gh W_hᵀ backward) is gemm.cc's call where the
    micro-kernel runs float32 products of depth ≤ 256 (AVX2 CPUs), whatever its size, and h @ w
    elsewhere (MKL's sgemm CPUs, depth 257, bfloat16, one example's h (K,)), under `autocast` too:
    the same values, gradients and vmap. A SimpleRNN's loop on a batch then holds the call."""
    kh, kw, kc = jax.random.split(key, 3)
    h, w = jax.random.normal(kh, (32, 24)), jax.random.normal(kw, (40, 24) if transpose_b else (24, 40))
    ct = jax.random.normal(kc, (32, 40))
    plain = lambda h, w: h @ (w.T if transpose_b else w)
    for micro_kernel in (True, False):
        monkeypatch.setattr(kernels.products, "float32_by_mkl", lambda: not micro_kernel)
        fast = lambda h, w: kernels.step_product(h, w, transpose_b)  # a new function: jit's cache keys on it
        assert ("diffprog_gemm_f32" in jax.jit(fast).lower(h, w).as_text()) == micro_kernel
        chex.assert_trees_all_close(jax.jit(fast)(h, w), plain(h, w), atol=1e-5)
        grads = [jax.grad(lambda h, w: jnp.sum(f(h, w) * ct), (0, 1))(h, w) for f in (fast, plain)]
        chex.assert_trees_all_close(*grads, atol=1e-4)
        chex.assert_trees_all_close(jax.vmap(fast, (0, None))(jnp.stack([h, -h]), w), jnp.stack([plain(h, w), plain(-h, w)]),
                                    atol=1e-5)
    monkeypatch.setattr(kernels.products, "float32_by_mkl", lambda: False)
    fast = lambda h, w: kernels.step_product(h, w, transpose_b)
    deep = jnp.zeros((257, 8)) if not transpose_b else jnp.zeros((8, 257))
    for args in ((jnp.zeros((4, 257)), deep), (h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)), (h[0], w)):
        assert "diffprog_gemm" not in jax.jit(fast).lower(*args).as_text()
    with kernels.autocast():  # a step's product stays float32 under autocast: the micro-kernel's still
        assert "diffprog_gemm_f32" in jax.jit(lambda h, w: kernels.step_product(h, w, transpose_b)).lower(h, w).as_text()
    model = dp.Dense(5) @ dp.SimpleRNN(16) @ dp.EmbedToken(5, 8)
    ids = jax.random.randint(key, (3, 7), 0, 5)
    params = model.init(key, ids[0])
    # its other products (x W_x over all steps, the head) are under `product`'s sizes: XLA's dots
    assert "diffprog_gemm_f32" in jax.jit(dp.batched(model).apply).lower(params, ids).compile().as_text()
