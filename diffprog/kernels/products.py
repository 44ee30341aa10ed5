"""The matrix product of `Dense` and its kin, and where it runs on the CPU: the vendor's GEMM
(MKL, gemm.cc) in float32 or bfloat16, XLA's dot where it is the faster one, or a rewrite of XLA:CPU's slow transposed-operand dot; and
`autocast`, products in bfloat16 inside a float32 program."""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from .library import (bfloat16_hardware, bfloat16_in_float32, enabled, float32_by_mkl, mkl_at_full_width, on_cpu, require,
                      vendor_blas)
from .partition import batch_partitioned, product_partitioned, summed_partitioned

try:  # jax's set of primitives whose lowering needs the devices: gemm's CPU lowering holds a
    # custom_partitioning. Internal to jax; without it `product` keeps XLA's dot.
    from jax._src.dispatch import prim_requires_devices_during_lowering as _needs_devices
except ImportError:
    _needs_devices = None

# The vendor's GEMM is chosen for products of at least VENDOR_MIN_WORK multiply-adds whose three
# sides are all ≥ VENDOR_MIN_SIDE: below either, XLA's dot was as fast or faster on the Xeon
# (AVX-512, AMX) measured — the call's fixed cost, and MKL's skinny products (a decoding step's
# 4 rows, a 65-token vocabulary) — see benchmarks/README.md.
VENDOR_MIN_WORK, VENDOR_MIN_SIDE = 1 << 22, 128
SHALLOW_DEPTH = 256  # gemm.cc's kShallow: the deepest float32 product its micro-kernel runs
TYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_autocast = threading.local()


@contextlib.contextmanager
def autocast(dtype=jnp.bfloat16):
    """Inside the block, the float32 products `product` traces round their operands to `dtype`
    (bfloat16) and sum in float32; everything else stays float32 — PyTorch's
    `torch.autocast(dtype=torch.bfloat16)` for the products. On the CPU, products MKL does not
    take (see `product`, or MKL missing) stay float32, and so do all of them
    where the CPU has no bfloat16 hardware (neither AMX nor AVX512-BF16: float32 is faster there;
    a warning says so). Chosen when a function is traced, like `disabled()`."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"autocast: products run in bfloat16 (MKL's bfloat16 × bfloat16 → float32), got {jnp.dtype(dtype)}")
    before = getattr(_autocast, "dtype", None)
    _autocast.dtype = jnp.dtype(dtype)
    try:
        yield
    finally:
        _autocast.dtype = before


def bfloat16_products() -> bool:
    """Whether the float32 products traced now run in bfloat16 on this CPU: inside
    `autocast(bfloat16)`, with MKL there and bfloat16 hardware under it (AMX or AVX512-BF16)."""
    if getattr(_autocast, "dtype", None) != jnp.bfloat16 or not enabled() or _needs_devices is None:
        return False
    if vendor_blas() is None:
        return False
    if not bfloat16_hardware():
        bfloat16_in_float32()
        return False
    return True


def product(a, b, transpose_a=False, transpose_b=False):
    """op(a) op(b), op the transpose where asked (a (M, K) or (K, M); b (K, N) or (N, K)): the
    matrix product of `Dense` and its kin, and of the written-out gradients of the kernels; under
    `autocast`, float32 operands rounded to its dtype. On the CPU: `gemm` (MKL) where
    `vendor_blas()` is there, a and b are both float32 or both bfloat16, and the product has
    ≥ `VENDOR_MIN_WORK` multiply-adds and sides ≥ `VENDOR_MIN_SIDE`; else, for a b with K > N,
    `_narrowing_product`. Elsewhere (and inside `disabled()`), XLA's dot."""
    m, k = a.shape[::-1] if transpose_a else a.shape
    n = b.shape[0] if transpose_b else b.shape[1]
    precision = getattr(_autocast, "dtype", None) if a.dtype == b.dtype == jnp.float32 else None
    if _needs_devices is not None and a.dtype == b.dtype and a.dtype in TYPES and _vendor_takes(m, k, n):
        return gemm(a, b, transpose_a, transpose_b, precision)
    if precision is not None:
        flags = dict(transpose_a=transpose_a, transpose_b=transpose_b)
        return on_cpu(functools.partial(_dot, **flags), functools.partial(_dot, **flags, precision=precision), a, b,
                      kernel=False)
    if transpose_a or transpose_b or k <= n:
        return _dot(a, b, transpose_a, transpose_b)
    return on_cpu(_narrowing_product, jnp.matmul, a, b, kernel=False)


def _on_micro_kernel(depth) -> bool:
    """Whether gemm.cc runs a float32 product of this depth by cpu.h's micro-kernel (its shallow
    product) when traced now: depth ≤ SHALLOW_DEPTH, where `float32_by_mkl()` is False,
    MKL installed."""
    return (_needs_devices is not None and depth <= SHALLOW_DEPTH and enabled() and vendor_blas() is not None
            and not float32_by_mkl())


def step_product(h, w, transpose_b=False):
    """h op(w) for one step of a recurrent loop: h (B, K), w (K, N) or, transposed, (N, K) — the
    h_{t-1} W_h of `Recurrent.scan` and the ∂gh_t W_hᵀ of its written-out backward pass. On the
    CPU in float32 where gemm.cc's shallow product runs (depth K ≤ SHALLOW_DEPTH, cpu.h's
    micro-kernel: `library.float32_by_mkl()` False — AVX2 CPUs, AMD's AVX-512 ones —, MKL installed), `gemm` whatever
    the product's size: inside XLA's while loop its dot took ~3× as long at the SimpleRNN's
    (32 × 256)·(256 × 256) (the README SimpleRNN's forward pass 0.71–0.89× as long by gemm) — under
    `autocast` too, where h op(w) stays float32 (a step's product is below `product`'s sizes).
    Elsewhere (and for one example, h (K,)) h op(w)."""
    if h.ndim == 2 and h.dtype == w.dtype == jnp.float32 and _on_micro_kernel(w.shape[1] if transpose_b else w.shape[0]):
        return gemm(h, w, transpose_b=transpose_b)
    return h @ (w.T if transpose_b else w)


def relu_affine(x, w, b):
    """relu(x w + b) over the last axis of x (..., d), with w (d, out) and b (out,): the layer
    FeedForward(out) with its default ReLU. On the CPU in float32 (bfloat16 too, in float32:
    `on_cpu`), outside `autocast`, where `product` takes gemm.cc and the product is shallow
    (d ≤ SHALLOW_DEPTH, by cpu.h's micro-kernel: AVX2 CPUs and AMD's AVX-512 ones, see `library.float32_by_mkl`), one call adds the bias and takes the ReLU as each tile of the
    product is stored: no second pass over the (..., out) result (its gradient: g = ∂y ⊙ [y > 0],
    ∂x = g wᵀ, ∂w = xᵀ g by `product`, ∂b = Σ g). Elsewhere, and under `autocast`, the
    definition relu(product(x, w) + b)."""
    if w.ndim != 2 or x.shape[-1:] != w.shape[:1] or b.shape != w.shape[1:]:
        raise ValueError(f"relu_affine: expected w (d, out), x (..., d) and b (out,), got w {w.shape}, x {x.shape} "
                         f"and b {b.shape}")
    d, out = w.shape
    if getattr(_autocast, "dtype", None) is None and _on_micro_kernel(d) and _vendor_takes(math.prod(x.shape[:-1]), d, out):
        return on_cpu(_fused_relu_affine, _relu_affine, x, w, b)
    return _relu_affine(x, w, b)


def _relu_affine(x, w, b):
    return jax.nn.relu(product(x.reshape(-1, w.shape[0]), w).reshape(x.shape[:-1] + w.shape[1:]) + b)


@batch_partitioned("... d, d o, o -> ... o")
def _relu_affine_call(x, w, b):
    require("relu_affine")
    result = jax.ShapeDtypeStruct(x.shape[:-1] + w.shape[1:], x.dtype)
    return tuple(jax.ffi.ffi_call("diffprog_relu_affine_f32", (result,))(x, w, b))


@jax.custom_vjp
def _fused_relu_affine(x, w, b):
    return _relu_affine_call(x, w, b)[0]


def _fused_relu_affine_forward(x, w, b):
    y = _fused_relu_affine(x, w, b)
    return y, (x, w, y)


def _fused_relu_affine_backward(residuals, dy):
    x, w, y = residuals
    g = jnp.where(y > 0, dy, 0).reshape(-1, w.shape[1])
    return product(g, w, transpose_b=True).reshape(x.shape), product(x.reshape(-1, w.shape[0]), g, transpose_a=True), g.sum(0)


_fused_relu_affine.defvjp(_fused_relu_affine_forward, _fused_relu_affine_backward)


def _vendor_takes(m, k, n) -> bool:
    """Whether an (M × K)·(K × N) product goes to MKL: the kernels enabled, MKL installed, and
    ≥ VENDOR_MIN_WORK multiply-adds with every side ≥ VENDOR_MIN_SIDE."""
    return (enabled() and m * k * n >= VENDOR_MIN_WORK and min(m, k, n) >= VENDOR_MIN_SIDE
            and vendor_blas() is not None)


def gemm(a, b, transpose_a=False, transpose_b=False, precision=None):
    """op(a) op(b), op the transpose where asked: a (M, K) or, transposed, (K, M); b (K, N) or
    (N, K); one dtype, float32 or bfloat16; the result (M, N) in that dtype, its sums in float32;
    with `precision` (bfloat16) float32 operands are rounded to it first. On the CPU MKL
    (`vendor_blas()` must be there), or XLA's dot into float32 where `runs_on_mkl` says MKL is
    the slower (decided when traced: the primitive's `mkl`) — there Aᵀ B multiplies a transposed
    copy of A (in `precision`): XLA:CPU's dot contracting A's rows ran at 200–330 GFLOP/s against
    330–400 with the copy at the char-LMs' weight gradients (AMD EPYC, Zen 5; the README
    Transformer's step 0.96× as long, under autocast 0.89×); `lax.dot_general` elsewhere. Its
    gradient is two more such products, transposes read in place; under vmap, a batch of `a`
    alone folds into its rows (one product), any other batch runs XLA's batched dot."""
    precision = jnp.dtype(precision or a.dtype)
    return _gemm.bind(a, b, transpose_a=transpose_a, transpose_b=transpose_b, precision=precision,
                      mkl=runs_on_mkl(transpose_a, a.shape[0] if transpose_a else a.shape[1], precision, transpose_b))


def _dot(a, b, transpose_a, transpose_b, precision=None):
    """op(a) op(b) by XLA (dtypes promoted as by `jnp.matmul`); with `precision`, the operands
    rounded to it and the product computed into float32, then given a's dtype (on the CPU, XLA's
    fast bfloat16 path: into a bfloat16 result it is 4× slower; the transposes as the dot's
    contracted dimensions, which XLA:CPU runs 4× faster than a transposed operand's copy)."""
    if precision is None:
        return jnp.matmul(a.T if transpose_a else a, b.T if transpose_b else b)
    contract = ((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ())
    return jax.lax.dot_general(a.astype(precision), b.astype(precision), contract,
                               preferred_element_type=jnp.float32).astype(a.dtype)


def runs_on_mkl(transpose_a, depth, precision, transpose_b=False) -> bool:
    """Whether `gemm` runs op(A) op(B) of this depth by gemm.cc (MKL, or cpu.h's micro-kernel for
    its shallow products) on this CPU, else by XLA's dot. Where MKL runs at the CPU's width
    (`library.mkl_at_full_width`): in float32 always (MKL 1.05–1.4× faster at the char-LMs'
    shapes); in bfloat16 where the CPU has its hardware, only where A is contracted over its rows
    (Aᵀ B, the weight gradients: MKL 3.5–4× faster) — XLA's dot into float32 (YNNPACK, on AMX)
    runs the others 1.1–2.8× faster where the result stays float32 (`autocast`), most at K = 256,
    and level with MKL where it is rounded to bfloat16. On the Xeon measured (`benchmarks.kernels`).
    Elsewhere (AMD's AVX-512 CPUs) only the micro-kernel's products — float32 ones, and bfloat16
    Aᵀ B (B not transposed) on AVX512-BF16's pairs (`vendor_blas()["paired"]`: 2.5–3× XLA's dot,
    which runs a bfloat16 product contracting an operand's rows in float32) —: XLA's dot runs the
    others at twice MKL's rate there."""
    if vendor_blas() is None or (precision == jnp.bfloat16 and not bfloat16_hardware()):
        return True  # `_mkl` says what is missing, or runs it in float32 and says so
    if not mkl_at_full_width():
        if precision == jnp.bfloat16:
            return transpose_a and not transpose_b and vendor_blas()["paired"]
        return not transpose_a and _on_micro_kernel(depth)
    return precision != jnp.bfloat16 or transpose_a


def _mkl(a, b, transpose_a, transpose_b, precision):
    """op(a) op(b) in float32 by gemm.cc, the operands rounded to `precision` where the CPU's
    MKL computes in it."""
    if vendor_blas() is None:
        raise RuntimeError("gemm: MKL's products are not available here (pip install mkl mkl-include, on x86-64)")
    if precision == jnp.bfloat16 and not bfloat16_hardware():
        bfloat16_in_float32()
        precision = jnp.dtype(jnp.float32)
    target = "diffprog_gemm_bf16" if precision == jnp.bfloat16 else "diffprog_gemm_f32"
    return _partitioned_call(target, transpose_a, transpose_b)(a.astype(precision), b.astype(precision))


def _call(target, a, b, transpose_a, transpose_b):
    """gemm.cc's op(a) op(b) on one device."""
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@functools.cache
def _partitioned_call(target, transpose_a, transpose_b):
    def call(a, b):
        return _call(target, a, b, transpose_a, transpose_b)
    return product_partitioned(call, transpose_a, transpose_b)


def summed_products(a, b):
    """Σ_r a_rᵀ b_r over every row r of a (..., K) and b (..., N), two arrays with the same
    leading axes: (K, N). The weight gradient of a product applied at every step and example,
    ∂W = Σ_{t,b} x_{t,b}ᵀ ∂y_{t,b}, read in the layout it is in. On the CPU, float32, at
    `product`'s sizes: MKL's Aᵀ B on the rows, the leading axes merged on each device (under a mesh
    each sums its shard, and the devices add theirs: no gather of the batch); XLA:CPU's dot
    contracting two leading axes is about half as fast. Elsewhere, and under vmap, `jnp.tensordot`."""
    if a.shape[:-1] != b.shape[:-1] or b.ndim != a.ndim:
        raise ValueError(f"summed_products: expected a (..., K) and b (..., N) with the same leading axes, "
                         f"got {a.shape} and {b.shape}")
    if (a.dtype == b.dtype == jnp.float32 and _vendor_takes(int(np.prod(a.shape[:-1])), a.shape[-1], b.shape[-1])
            and mkl_at_full_width()):
        return on_cpu(_summed_by_mkl, _summed_reference, a, b, kernel=False)
    return _summed_reference(a, b)


def _summed_reference(a, b):
    over = tuple(range(a.ndim - 1))
    return jnp.tensordot(a, b, (over, over))


@jax.custom_vjp
def _summed_by_mkl(a, b):
    return _summed_mapped(a, b)


def _summed_bwd(residuals, grad):  # ∂a_r = b_r ∂Sᵀ, ∂b_r = a_r ∂S
    a, b = residuals
    return b @ grad.T, a @ grad


_summed_by_mkl.defvjp(lambda a, b: (_summed_by_mkl(a, b), (a, b)), _summed_bwd)


@jax.custom_batching.custom_vmap
def _summed_mapped(a, b):
    return _summed_partitioned(a.ndim)(a, b)


@_summed_mapped.def_vmap
def _summed_under_vmap(axis_size, in_batched, a, b):
    a, b = (x if mapped else jnp.broadcast_to(x, (axis_size,) + x.shape) for x, mapped in zip((a, b), in_batched))
    return jax.vmap(_summed_reference)(a, b), True


@functools.cache
def _summed_partitioned(ndim):
    """MKL's Aᵀ B over the merged leading axes of a, b (ndim axes each)."""
    return summed_partitioned(lambda a, b: _call("diffprog_gemm_f32", a.reshape(-1, a.shape[-1]),
                                                 b.reshape(-1, b.shape[-1]), True, False), ndim)


def batch_sum(xs):
    """Σ_b xs_b over the leading axis of xs (B, ...), as a product with a vector of ones: XLA:CPU
    sums a short leading axis of a (B, T, d) array 20–40× slower (on the Xeon measured: 3.6–4.8
    against 0.1 ms for (32, 128, 256), 5.3 against 0.2 ms for (8, 128, 768))."""
    rows = xs.reshape(xs.shape[0], -1)
    return (jnp.ones(rows.shape[0], rows.dtype) @ rows).reshape(xs.shape[1:])


def add_to_each(xs, y):
    """xs_b + y for every b of xs (B, ...), y shaped like one xs_b (a learned positional table
    added to each example). On the CPU y's gradient Σ_b ∂xs_b is `batch_sum`'s. Elsewhere,
    inside `disabled()` and for mixed dtypes, `xs + y`. Any other y is a ValueError (never a
    broadcast of another shape)."""
    if xs.shape[1:] != y.shape:
        raise ValueError(f"add_to_each: expected y shaped like one example of xs {xs.shape}, i.e. {xs.shape[1:]}, "
                         f"got {y.shape}")
    if xs.dtype != y.dtype:
        return xs + y
    return on_cpu(_add_to_each, jnp.add, xs, y, kernel=False)


@jax.custom_vjp
def _add_to_each(xs, y):
    return xs + y


def _add_to_each_bwd(_, grad):
    return grad, batch_sum(grad)


_add_to_each.defvjp(lambda xs, y: (xs + y, None), _add_to_each_bwd)


# `gemm` as a primitive of its own: JAX differentiates it by the bilinear rules below and batches
# it by `_batched_gemm`; it becomes MKL's call (or XLA's dot) only when lowered, per platform.
_gemm = Primitive("diffprog_gemm")


@_gemm.def_abstract_eval
def _gemm_shape(a, b, *, transpose_a, transpose_b, precision, mkl):
    m = a.shape[1] if transpose_a else a.shape[0]
    k, n = (b.shape[1], b.shape[0]) if transpose_b else b.shape
    if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype or (a.shape[0] if transpose_a else a.shape[1]) != k:
        raise ValueError(f"gemm: expected matrices of one dtype whose products chain, got {a.shape} {a.dtype}"
                         f"{'ᵀ' * transpose_a} and {b.shape} {b.dtype}{'ᵀ' * transpose_b}")
    return jax.core.ShapedArray((m, n), a.dtype)


def _lowered(on_cpu):
    def product(a, b, *, transpose_a, transpose_b, precision, mkl):
        dtype = a.dtype
        if on_cpu and mkl:
            return _mkl(a, b, transpose_a, transpose_b, precision).astype(dtype)
        if on_cpu and transpose_a:  # Aᵀ B by XLA:CPU: Aᵀ copied (rounded first), the barrier keeps it a copy
            a, transpose_a = jax.lax.optimization_barrier(a.astype(precision).T), False
        return _dot(a, b, transpose_a, transpose_b, precision).astype(dtype)
    return mlir.lower_fun(product, multiple_results=False)


_eager = functools.cache(lambda **flags: jax.jit(functools.partial(_gemm.bind, **flags)))
_gemm.def_impl(lambda a, b, **flags: _eager(**flags)(a, b))
mlir.register_lowering(_gemm, _lowered(on_cpu=True), platform="cpu")
mlir.register_lowering(_gemm, _lowered(on_cpu=False))
if _needs_devices is not None:
    _needs_devices.add(_gemm)


# C = op(A) op(B): ∂op(A) = ∂C op(B)ᵀ, ∂op(B) = op(A)ᵀ ∂C, each transposed back when op is.
def _grad_a(grad, a, b, *, transpose_a, transpose_b, precision, mkl):
    return gemm(b, grad, transpose_b, True, precision) if transpose_a else gemm(grad, b, False, not transpose_b, precision)


def _grad_b(grad, a, b, *, transpose_a, transpose_b, precision, mkl):
    return gemm(grad, a, True, transpose_a, precision) if transpose_b else gemm(a, grad, not transpose_a, False, precision)


ad.defbilinear(_gemm, _grad_a, _grad_b)


def _batched_gemm(args, dims, *, transpose_a, transpose_b, precision, mkl):
    """A batch of A's rows alone folds into one product; any other batch runs XLA's batched dot."""
    (a, b), (da, db) = args, dims
    if da is not None and db is None and not transpose_a:
        a = jnp.moveaxis(a, da, 0)
        c = gemm(a.reshape(-1, a.shape[-1]), b, False, transpose_b, precision)
        return c.reshape(a.shape[:-1] + c.shape[-1:]), 0
    batch_first = lambda x, d: x if d is None else jnp.moveaxis(x, d, 0)
    op = lambda x, d, t: jnp.swapaxes(batch_first(x, d), -1, -2) if t else batch_first(x, d)
    spec = ("mk," if da is None else "bmk,") + ("kn" if db is None else "bkn") + "->bmn"
    product = jnp.einsum(spec, op(a, da, transpose_a).astype(precision), op(b, db, transpose_b).astype(precision),
                         preferred_element_type=jnp.float32)
    return product.astype(a.dtype), 0


batching.primitive_batchers[_gemm] = _batched_gemm


@jax.custom_jvp
def _narrowing_product(x, w):
    return x @ w


@_narrowing_product.defjvp
def _narrowing_product_jvp(primals, tangents):
    """Where d > out, the weight gradient xᵀ ∂y is computed as ((∂y)ᵀ x)ᵀ from a transposed copy
    of the narrower ∂y: XLA:CPU runs a product whose left operand is contracted over its rows
    (xᵀ ∂y) as a slower Eigen dot, ~18.5 vs ~13 ms for (4096 × 1024)ᵀ·(4096 × 256)."""
    x, w = primals
    dx, dw = tangents
    # x dw written so that its transpose (reverse mode) is ((∂y)ᵀ x)ᵀ with both transposes
    # materialised: the barriers keep XLA from folding them back into the product.
    barrier = jax.lax.optimization_barrier
    x_dw = barrier(jax.lax.dot_general(barrier(dw.T), x, (((1,), (1,)), ((), ())))).T
    return x @ w, dx @ w + x_dw
