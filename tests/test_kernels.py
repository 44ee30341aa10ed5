"""The C++ causal attention kernel (`dp.kernels`) against the jnp path it replaces on the CPU."""
import platform
import shutil

import chex
import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import diffprog as dp
from diffprog import kernels

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("c++") is None,
                                reason="the kernel needs an x86-64 CPU and a C++ compiler")


def test_the_kernel_builds_and_registers():
    assert kernels.available()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 2, 5), (3, 13, 1, 16), (2, 37, 3, 24), (1, 70, 2, 64)])
def test_kernel_matches_query_blocks_values_and_gradients(shape, key):
    """Odd lengths and widths exercise the edge tiles (rows not a multiple of 6, columns of 16)."""
    q, k, v, ct = (jax.random.normal(kk, shape) for kk in jax.random.split(key, 4))
    reference = jax.vmap(dp.attention.causal_attention_blocks)
    for f in (kernels.causal_attention, jax.jit(kernels.causal_attention)):
        chex.assert_trees_all_close(f(q, k, v), reference(q, k, v), atol=2e-6)
    grads = [jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), (0, 1, 2))(q, k, v)
             for f in (kernels.causal_attention, reference)]
    chex.assert_trees_all_close(*grads, atol=1e-5)


def test_kernel_gradients_against_finite_differences(key):
    q, k, v = (jax.random.normal(kk, (2, 9, 2, 4)) for kk in jax.random.split(key, 3))
    check_grads(kernels.causal_attention, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_kernel_under_vmap_is_the_batched_call(key):
    q, k, v = (jax.random.normal(kk, (3, 11, 2, 8)) for kk in jax.random.split(key, 3))
    per_example = jax.vmap(kernels.causal_attention)(q, k, v)
    chex.assert_trees_all_close(per_example, kernels.causal_attention(q, k, v), atol=1e-6)
    chex.assert_trees_all_close(per_example[1], kernels.causal_attention(q[1], k[1], v[1]), atol=1e-6)


def test_kernel_rejects_mismatched_shapes(key):
    q = jax.random.normal(key, (5, 2, 4))
    with pytest.raises(ValueError, match=r"causal_attention.*\(5, 2, 4\).*\(6, 2, 4\)"):
        kernels.causal_attention(q, jnp.zeros((6, 2, 4)), q)


def test_the_kernel_is_lowered_for_the_cpu_only():
    """On accelerators causal attention keeps `jax.nn.dot_product_attention` (the query blocks)."""
    q = jnp.ones((8, 2, 4))
    step = jax.jit(jax.grad(lambda q: dp.attention.causal_attention(q, q, q).sum()))
    lowered = {platform: step.trace(q).lower(lowering_platforms=(platform,)).as_text()
               for platform in ("cpu", "cuda")}
    assert "diffprog_causal_attention_backward" in lowered["cpu"]
    assert "diffprog_causal_attention" not in lowered["cuda"]
