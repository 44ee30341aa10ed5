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

HERE = Path(__file__).parent
SOURCES = [HERE / "causal_attention.cc", HERE / "lstm.cc"]
HEADERS = [HERE / "cpu.h"]
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]


def cache_dir() -> Path:
    root = os.environ.get("DIFFPROG_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffprog"
    return Path(root)


def build() -> Path:
    """Compile the kernel library once per sources, flags and jaxlib version; returns its path.
    The library is written to a temporary name and renamed, so concurrent builds are safe."""
    include = jax.ffi.include_dir()
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES + HEADERS) + " ".join(FLAGS).encode()
                            + include.encode() + jax.lib.__version__.encode()).hexdigest()[:16]
    library = cache_dir() / f"kernels-{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(handle)
        compiler = os.environ.get("CXX", "c++")
        result = subprocess.run([compiler, *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", partial],
                                capture_output=True, text=True)
        if result.returncode:
            os.unlink(partial)
            raise RuntimeError(f"{compiler} could not build {', '.join(path.name for path in SOURCES)}:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    return library


TARGETS = ("diffprog_causal_attention_forward", "diffprog_causal_attention_backward",
           "diffprog_lstm_forward", "diffprog_lstm_backward")


@functools.cache
def available() -> bool:
    """True when the C++ kernels are built and registered for the CPU."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"diffprog: the C++ kernels are not available ({error}); causal attention and the "
                      "LSTM on the CPU use their jax.numpy paths", stacklevel=2)
        return False
    if not library.diffprog_cpu_supported():
        return False
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    return True


def on_cpu(kernel, fallback, *args):
    """kernel(*args) when this runs on the CPU, all floating-point args are float32 and the
    kernels are built (`lax.platform_dependent`, so an accelerator lowering never sees the kernel);
    fallback(*args) otherwise. Both must compute the same function."""
    floats = {a.dtype for a in jax.tree.leaves(args) if jnp.issubdtype(a.dtype, jnp.floating)}
    if floats == {jnp.dtype(jnp.float32)} and available():
        return jax.lax.platform_dependent(*args, cpu=kernel, default=fallback)
    return fallback(*args)


def _require(name):
    if not available():
        raise RuntimeError(f"{name}: the C++ kernels could not be built here (see the warning); "
                           "the layers fall back to jax.numpy by themselves")


def _forward(q, k, v):
    if q.ndim < 3 or not q.shape == k.shape == v.shape:
        raise ValueError(f"causal_attention: expected q, k, v of one shape (..., T, heads, head_dim), "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    _require("causal_attention")
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


def lstm_forward(xw, bias, w_h, h0, c0, lengths):
    """The LSTM's T steps (see lstm.cc) on time-major float32 inputs: xw = x W_x (T, B, 4H),
    bias (4H,), w_h (H, 4H), h0 and c0 (B, H), lengths (B,) int32 (steps at and past an
    example's length keep its state and output 0). Returns hs (T, B, H), the final h and c
    (B, H), and for `lstm_backward` the gate activations (T, B, 4H) and cell states cs (T, B, H).
    Not differentiable by itself: `dp.LSTM` wraps it in its custom VJP."""
    steps, batch, gates = xw.shape
    hidden = gates // 4
    expected = {"bias": (gates,), "w_h": (hidden, gates), "h0": (batch, hidden), "c0": (batch, hidden),
                "lengths": (batch,)}
    got = {"bias": bias.shape, "w_h": w_h.shape, "h0": h0.shape, "c0": c0.shape, "lengths": lengths.shape}
    if gates % 4 or got != expected:
        raise ValueError(f"lstm_forward: for xw {xw.shape} (T, B, 4H) expected {expected}, got {got}")
    _require("lstm_forward")
    like = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    state = like(batch, hidden)
    return jax.ffi.ffi_call("diffprog_lstm_forward", (like(steps, batch, hidden), state, state, like(*xw.shape),
                                                      like(steps, batch, hidden)),
                            vmap_method="sequential")(xw, bias, w_h, h0, c0, lengths.astype(jnp.int32))


def lstm_backward(w_h, gates, cs, c0, lengths, d_hs, d_h, d_c):
    """The reverse of `lstm_forward`'s steps: from the cotangents of hs (T, B, H) and of the final
    h and c, the gradient ∂z of every step's pre-activations (T, B, 4H) and those of h0 and c0."""
    _require("lstm_backward")
    state = jax.ShapeDtypeStruct(c0.shape, jnp.float32)
    return jax.ffi.ffi_call("diffprog_lstm_backward", (jax.ShapeDtypeStruct(gates.shape, jnp.float32), state, state),
                            vmap_method="sequential")(w_h, gates, cs, c0, lengths.astype(jnp.int32), d_hs, d_h, d_c)
