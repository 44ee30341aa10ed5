"""A CPU-only rewrite of the matrix product x w (XLA:CPU's slow transposed-operand dot)."""
from __future__ import annotations

import jax

from .library import on_cpu


def product(x, w):
    """x w for x (N, d), w (d, out). On the CPU, where d > out, the weight gradient xᵀ ∂y is
    computed as ((∂y)ᵀ x)ᵀ from a transposed copy of the narrower ∂y: XLA:CPU runs a product whose
    left operand is contracted over its rows (xᵀ ∂y) as a slower Eigen dot, ~18.5 vs ~13 ms for
    (4096 × 1024)ᵀ·(4096 × 256). Elsewhere (and inside `disabled()`), x @ w."""
    if w.shape[0] <= w.shape[1]:
        return x @ w
    return on_cpu(_narrowing_product, jax.numpy.matmul, x, w, kernel=False)


@jax.custom_jvp
def _narrowing_product(x, w):
    return x @ w


@_narrowing_product.defjvp
def _narrowing_product_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    # x dw written so that its transpose (reverse mode) is ((∂y)ᵀ x)ᵀ with both transposes
    # materialised: the barriers keep XLA from folding them back into the product.
    barrier = jax.lax.optimization_barrier
    x_dw = barrier(jax.lax.dot_general(barrier(dw.T), x, (((1,), (1,)), ((), ())))).T
    return x @ w, dx @ w + x_dw
