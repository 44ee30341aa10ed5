"""CPU kernels that XLA does not emit well, compiled from C++ on first use and called through
`jax.ffi`. Where a kernel cannot be built (no C++ compiler, not x86-64 with AVX2 and FMA), the
callers keep their `jax.numpy` path; `available()` says which it is."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("causal_attention.cc")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]


def cache_dir() -> Path:
    root = os.environ.get("DIFFPROG_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffprog"
    return Path(root)


def build() -> Path:
    """Compile the kernel library once per source, flags and jaxlib version; returns its path.
    The library is written to a temporary name and renamed, so concurrent builds are safe."""
    include = jax.ffi.include_dir()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + include.encode()
                            + jax.lib.__version__.encode()).hexdigest()[:16]
    library = cache_dir() / f"causal_attention-{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(handle)
        compiler = os.environ.get("CXX", "c++")
        result = subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", partial],
                                capture_output=True, text=True)
        if result.returncode:
            os.unlink(partial)
            raise RuntimeError(f"{compiler} could not build {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    return library


@functools.cache
def available() -> bool:
    """True when the C++ causal attention kernel is built and registered for the CPU."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"diffprog: the C++ attention kernel is not available ({error}); "
                      "causal attention on the CPU uses jax.nn.dot_product_attention", stacklevel=2)
        return False
    if not library.diffprog_cpu_supported():
        return False
    for name in ("diffprog_causal_attention_forward", "diffprog_causal_attention_backward"):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    return True


def _forward(q, k, v):
    if q.ndim < 3 or not q.shape == k.shape == v.shape:
        raise ValueError(f"causal_attention: expected q, k, v of one shape (..., T, heads, head_dim), "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if not available():
        raise RuntimeError("causal_attention: the C++ kernel could not be built here (see the warning); "
                           "use diffprog.attention.causal_attention, which falls back to jnp")
    scale = np.float32(1 / np.sqrt(q.shape[-1]))
    lse_shape = jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)
    out, lse = jax.ffi.ffi_call("diffprog_causal_attention_forward", (jax.ShapeDtypeStruct(q.shape, q.dtype), lse_shape),
                                vmap_method="broadcast_all")(q, k, v, scale=scale)
    return out, (q, k, v, out, lse)


def _backward(residuals, d_out):
    q, k, v, out, lse = residuals
    scale = np.float32(1 / np.sqrt(q.shape[-1]))
    like = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return tuple(jax.ffi.ffi_call("diffprog_causal_attention_backward", (like, like, like),
                                  vmap_method="broadcast_all")(q, k, v, out, lse, d_out, scale=scale))


@jax.custom_vjp
def causal_attention(q, k, v):
    """softmax(q kᵀ/√D, causal) v for float32 q, k, v (..., T, H, D), on the CPU (see
    `available()`): one fused pass per (example, head), probabilities recomputed backward."""
    return _forward(q, k, v)[0]


causal_attention.defvjp(_forward, _backward)
