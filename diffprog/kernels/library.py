"""The C++ kernel library: compiled on first use, registered with `jax.ffi`, and the one decision
of where a fast path runs (`on_cpu`, `disabled`)."""
from __future__ import annotations

import ctypes
import contextlib
import functools
import threading
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

HERE = Path(__file__).parent
SOURCES = [HERE / "attention.cc", HERE / "lstm.cc", HERE / "ssm.cc"]
HEADERS = [HERE / "cpu.h"]
# -march=native: the kernels' vectors take this CPU's width (cpu.h's `simd`: AVX-512 or AVX2).
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-pthread"]
LINK_FLAGS = ["-shared", "-pthread"]


def _cpuinfo(key) -> str:
    """The first line of /proc/cpuinfo that starts with `key` ("" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((l for l in lines if l.startswith(key)), "")


def _this_cpu() -> bytes:
    """What -march=native compiles for: the CPU's model and flags (one cache entry per CPU kind)."""
    return "\n".join(_cpuinfo(key) for key in ("model name", "flags")).encode()


def cache_dir() -> Path:
    root = os.environ.get("DIFFPROG_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffprog"
    return Path(root)


def build(sources=SOURCES, flags=()) -> Path:
    """Compile `sources` (+ `flags`: -I folders for the compiler, anything else — a library to
    link — for the linker) into one shared library, once per sources, flags, jaxlib version and
    CPU; returns its path. Each source compiles in its own compiler process, side by side (the
    cores build them at once), then one link. The library is written to a temporary name and
    renamed, so concurrent builds are safe."""
    compile_flags = [*FLAGS, f"-I{jax.ffi.include_dir()}", *(f for f in flags if f.startswith("-I"))]
    link_flags = [*LINK_FLAGS, *(f for f in flags if not f.startswith("-I"))]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources + HEADERS)
                            + " ".join(compile_flags + link_flags).encode()
                            + jax.lib.__version__.encode() + _this_cpu()).hexdigest()[:16]
    library = cache_dir() / f"kernels-{digest}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        objects = [Path(scratch) / f"{path.stem}.o" for path in sources]
        jobs = [subprocess.Popen([compiler, "-c", str(path), *compile_flags, "-o", str(obj)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for path, obj in zip(sources, objects)]
        errors = [job.communicate()[1] for job in jobs]
        partial = Path(scratch) / library.name
        failed = next((e for job, e in zip(jobs, errors) if job.returncode), None)
        if failed is None:
            result = subprocess.run([compiler, *map(str, objects), *link_flags, "-o", str(partial)], capture_output=True, text=True)
            failed = result.stderr if result.returncode else None
        if failed is not None:
            raise RuntimeError(f"{compiler} could not build {', '.join(path.name for path in sources)}:\n{failed[-2000:]}")
        os.replace(partial, library)
    return library


TARGETS = ("diffprog_attention_forward", "diffprog_attention_backward",
           "diffprog_attention_forward_bf16", "diffprog_attention_backward_bf16",
           "diffprog_projected_attention_forward", "diffprog_projected_attention_backward",
           "diffprog_lstm_forward", "diffprog_lstm_forward_from_table", "diffprog_lstm_backward",
           "diffprog_selective_forward", "diffprog_selective_backward")


def _users_line() -> int:
    """`warnings.warn`'s stacklevel, called from the function that calls this, of the innermost
    frame outside diffprog and jax: the user's line that built or traced the model."""
    inside = (str(HERE.parent), str(Path(jax.__file__).parent))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


@functools.cache
def available() -> bool:
    """True when the C++ kernels are built and registered for the CPU."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"diffprog: the C++ kernels are not available ({error}); self-attention, the "
                      "LSTM and the selective scan on the CPU use their jax.numpy paths", stacklevel=_users_line())
        return False
    if not library.diffprog_cpu_supported():
        return False
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    return True


@functools.cache
def amx_attention() -> bool:
    """Whether the attention kernel's bfloat16 handlers run here: the kernels built with AMX
    (-march=native on a CPU that has it) and AMX's tile state granted to this process."""
    return available() and bool(ctypes.CDLL(str(build())).diffprog_attention_bfloat16())


@functools.cache
def bfloat16_hardware() -> bool:
    """Whether this CPU computes in bfloat16 (AMX or AVX512-BF16); False where the kernels are not built."""
    return available() and bool(ctypes.CDLL(str(build())).diffprog_bfloat16_hardware())


@functools.cache
def bfloat16_in_float32():
    """Say once that bfloat16 runs as float32 here (see `on_cpu`)."""
    warnings.warn("diffprog: this CPU has neither AMX nor AVX512-BF16: on bfloat16 values the matrix products, "
                  "kernels, recurrent scans, position-wise layers, Attention and SelectiveSSM run in float32 (faster here "
                  "than emulated bfloat16)", stacklevel=_users_line())


def _mkl_files() -> tuple[Path, Path] | None:
    """MKL's header folder and runtime library, from the PyPI packages `mkl-include` and `mkl`."""
    try:
        headers = [f.locate() for f in importlib.metadata.files("mkl-include") or () if f.name == "mkl.h"]
        runtimes = [f.locate() for f in importlib.metadata.files("mkl") or () if f.name.startswith("libmkl_rt.so")]
    except importlib.metadata.PackageNotFoundError:
        return None
    return (Path(os.path.normpath(headers[0])).parent, Path(os.path.normpath(runtimes[0]))) if headers and runtimes else None


@functools.cache
def vendor_blas() -> dict | None:
    """MKL's matrix products (gemm.cc), built and registered for the CPU, and handed to the
    kernels' own per-step products: {"packed": MKL's packed GEMMs (the addresses of
    cblas_sgemm_{pack_get_size, pack, compute} and of cblas_gemm_bf16bf16f32_{the same}),
    "shallow": gemm.cc's switch of `use_vendor_sgemm`, "paired": whether gemm.cc runs bfloat16
    Aᵀ B by cpu.h's micro-kernel on AVX512-BF16's pairs — where MKL runs narrower than the CPU
    (`mkl_at_full_width`) and the kernels have AVX512-BF16}; its bfloat16 products have hardware
    under them where `bfloat16_hardware()`. None where MKL is not installed
    (it is a dependency on x86-64 Linux), the CPU lacks AVX2, or the build fails — then `product`
    stays with XLA's dot and the kernels with cpu.h's micro-kernel."""
    files = _mkl_files()
    if files is None or not available():
        return None
    include, runtime = files
    try:
        library = ctypes.CDLL(str(build([HERE / "gemm.cc"], [f"-I{include}", str(runtime), f"-Wl,-rpath,{runtime.parent}"])))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"diffprog: MKL's products are not available ({error}); matrix products on the CPU use XLA's dot",
                      stacklevel=_users_line())
        return None
    library.diffprog_gemm_setup()
    blas = {"packed": tuple(ctypes.cast(getattr(library, f"cblas_{gemm}_{name}"), ctypes.c_void_p)
                            for gemm in ("sgemm", "gemm_bf16bf16f32") for name in ("pack_get_size", "pack", "compute")),
            "shallow": library.diffprog_gemm_shallow_by_micro_kernel,
            "paired": not mkl_at_full_width() and bool(library.diffprog_gemm_transposed_bf16_by_pairs(1))}
    for name in ("diffprog_gemm_f32", "diffprog_gemm_bf16", "diffprog_relu_affine_f32"):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    _use_sgemm(blas, float32_by_mkl())
    return blas


@functools.cache
def mkl_at_full_width() -> bool:
    """Whether MKL runs code as wide as the kernels' vectors here: on Intel's CPUs, and on AVX2
    ones; not on AMD's AVX-512 CPUs (Zen 4, Zen 5), where it runs its AVX2 code — on the AMD EPYC
    (Zen 5) measured, 190–220 GFLOP/s in float32 and in bfloat16 against XLA's dot's 370–490
    (float32; 930 bfloat16 into float32) and cpu.h's micro-kernel's 460–480 (benchmarks/README).
    Where False, gemm.cc runs only what its micro-kernel takes (`products.runs_on_mkl`)."""
    return available() and (ctypes.CDLL(str(build())).diffprog_vector_lanes() == 8
                            or _cpuinfo("vendor_id").endswith("GenuineIntel"))


def float32_by_mkl() -> bool:
    """The default for the float32 products where MKL and cpu.h's micro-kernel are both at hand —
    the LSTM kernel's per-step ones (a thread's rows of h by W_h, ∂z by W_hᵀ) and gemm.cc's of depth
    ≤ 256 with A not transposed (x W of `Dense` and its kin at width ≤ 256): MKL's where the kernels
    are built for AVX-512 and MKL runs at that width (`mkl_at_full_width`: Intel's CPUs; its packed
    sgemm the faster there, measured on the Intel Xeon at f164b1a; the bfloat16 products of
    `autocast` need it, and their hardware comes with AVX-512), the micro-kernel elsewhere: on
    AVX2 cores (on the AMD EPYC, Zen 3, where MKL runs its generic path: the LSTM step 1.15–1.2×
    and the Transformer's forward pass 1.05× faster; MKL repacks each step's rows, and zeroes C
    before a product) and on AMD's AVX-512 ones (Zen 5: the micro-kernel at twice MKL's rate)."""
    return available() and ctypes.CDLL(str(build())).diffprog_vector_lanes() == 16 and mkl_at_full_width()


def use_vendor_sgemm(on: bool):
    """Whether the float32 products of `float32_by_mkl` call MKL (on, where `vendor_blas()` found
    it) or cpu.h's micro-kernel; the default is `float32_by_mkl()`. Switching takes effect at the
    next call, not at tracing (the kernels read it as they run)."""
    blas = vendor_blas()
    if blas is not None:
        _use_sgemm(blas, on)


def _use_sgemm(blas, on):
    ctypes.CDLL(str(build())).diffprog_use_sgemm(*(blas["packed"] if on else (None,) * 6))
    blas["shallow"](int(not on))


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
    With `kernel` (a C++ kernel, float32: the default), also only where the library is built and
    every floating-point arg is float32 — or bfloat16 (float32 beside it allowed): then fast runs
    on the args in float32 and its results are rounded to the dtypes of reference's, its
    products bfloat16 × bfloat16 → float32 (`autocast`) where the CPU has bfloat16 hardware
    (`bfloat16_hardware`) and float32 where it emulates bfloat16 (a warning says so once).
    XLA:CPU runs bfloat16's element-wise operations and sums one conversion at a time on every
    x86 CPU (AVX512-BF16 and AMX only multiply): on an AMD EPYC, Zen 5, with AVX512-BF16, the
    bfloat16 definitions took 1.9× (the LSTM's forward pass), 2.8× (the SimpleRNN's), 43×
    (Mamba's) and 1.9× (the Transformer's step) as long as this. `fast` may be `reference` itself:
    see `in_float32_on_cpu`. Inside `disabled()`, always reference(*args). Both must compute the
    same function."""
    if not enabled():
        return reference(*args)
    if kernel:
        floats = {a.dtype for a in jax.tree.leaves(args) if jnp.issubdtype(a.dtype, jnp.floating)}
        if not available() or not floats or not floats <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}:
            return reference(*args)
        if jnp.dtype(jnp.bfloat16) in floats:
            if not bfloat16_hardware():
                bfloat16_in_float32()
            fast = _in_float32(fast, jax.eval_shape(reference, *args))
    if fast is reference:
        return reference(*args)
    return jax.lax.platform_dependent(*args, cpu=fast, default=reference)


def in_float32_on_cpu(definition, *args):
    """definition(*args) — on the CPU in float32 on bfloat16 args, its products in bfloat16 where
    the CPU has the hardware, its results rounded back to the dtypes the definition gives (see
    `on_cpu`), as written everywhere else: `on_cpu` with the definition as its own fast path. For
    layers whose bfloat16 definitions XLA:CPU runs slowly (sums over all positions: biases,
    scales; a scan's steps; element-wise chains)."""
    return on_cpu(definition, definition, *args)


def _in_float32(f, out):
    """f on its bfloat16 args as float32 (inside `autocast(bfloat16)` where the CPU has bfloat16
    hardware), its results rounded to the dtypes of `out` (a tree of ShapeDtypeStructs)."""
    def run(*args):
        from .products import autocast  # products.py imports this module
        args = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, args)
        with autocast() if bfloat16_hardware() else contextlib.nullcontext():
            results = f(*args)
        return jax.tree.map(lambda y, o: y.astype(o.dtype), results, out)
    return run


def require(name):
    """Make the kernels ready (built, registered, MKL's products handed over where installed)."""
    if not available():
        raise RuntimeError(f"{name}: the C++ kernels could not be built here (see the warning); "
                           "the layers fall back to jax.numpy by themselves")
    vendor_blas()


