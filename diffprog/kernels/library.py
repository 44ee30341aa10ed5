"""The C++ kernel library: compiled on first use, registered with `jax.ffi`, and the one decision
of where a fast path runs (`on_cpu`, `disabled`)."""
from __future__ import annotations

import ctypes
import contextlib
import functools
import threading
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

HERE = Path(__file__).parent
SOURCES = [HERE / "attention.cc", HERE / "lstm.cc", HERE / "ssm.cc"]
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


TARGETS = ("diffprog_attention_forward", "diffprog_attention_backward",
           "diffprog_lstm_forward", "diffprog_lstm_backward",
           "diffprog_selective_forward", "diffprog_selective_backward")


@functools.cache
def available() -> bool:
    """True when the C++ kernels are built and registered for the CPU."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"diffprog: the C++ kernels are not available ({error}); self-attention, the "
                      "LSTM and the selective scan on the CPU use their jax.numpy paths", stacklevel=2)
        return False
    if not library.diffprog_cpu_supported():
        return False
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    return True


_switch = threading.local()


@contextlib.contextmanager
def disabled():
    """Trace the reference paths only: no C++ kernel and no CPU-only rewrite is chosen for what
    is traced inside the block (`with dp.kernels.disabled(): jax.export.export(...)`), so a model
    exports for CPU serving (XLA's own ops only) and can be checked against its definition.
    The choice is made when a function is traced: a function jit-compiled before keeps its
    compiled program."""
    before = getattr(_switch, "off", False)
    _switch.off = True
    try:
        yield
    finally:
        _switch.off = before


def enabled() -> bool:
    """False inside `disabled()`."""
    return not getattr(_switch, "off", False)


def on_cpu(fast, reference, *args, kernel=True):
    """fast(*args) where it runs on the CPU, reference(*args) elsewhere — chosen per platform at
    lowering by `lax.platform_dependent`, so an accelerator program never holds a CPU kernel.
    With `kernel` (a C++ kernel: the default), also only when every floating-point arg is float32
    and the library is built. Inside `disabled()`, always reference(*args). Both must compute
    the same function."""
    if not enabled():
        return reference(*args)
    if kernel:
        floats = {a.dtype for a in jax.tree.leaves(args) if jnp.issubdtype(a.dtype, jnp.floating)}
        if floats != {jnp.dtype(jnp.float32)} or not available():
            return reference(*args)
    return jax.lax.platform_dependent(*args, cpu=fast, default=reference)


def require(name):
    if not available():
        raise RuntimeError(f"{name}: the C++ kernels could not be built here (see the warning); "
                           "the layers fall back to jax.numpy by themselves")


