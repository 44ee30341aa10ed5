"""Settings for the whole suite, made before JAX starts (the test processes and every subprocess
a test starts inherit them through the environment):

- 4 host CPU devices, so the data-parallel and sharding tests run in-process;
- XLA:CPU compiles with LLVM at optimisation level 0 and its classic elemental emitters: the
  suite's programs are small, and compiling them is most of its time (about 3× less this way).
  The values a program computes do not depend on either setting, and what the tests check of
  the compiled programs (custom calls, collectives, fusions of the HLO) is decided before LLVM;
- JAX's persistent compilation cache off (JAX_ENABLE_COMPILATION_CACHE=false, unless set): each
  test process compiles its own ~2,500 programs, and with the cache on each paid a lookup and a
  write (~20 ms) while the ~700 found (the other worker's) saved no compile time (JAX's own count
  over a whole run: -0.6 s); four test files ran 4–7 % faster without it. The tests of the cache
  switch it on; its folder is a temporary one for the run (never the checkout or the home
  folder), removed at the end.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4",
                                    "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process (pytest, or xdist's controller)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffprog-tests-jax-cache-")
    os.environ["DIFFPROG_TESTS_OWN_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import jax  # noqa: E402
import jax.monitoring  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_unconfigure(config):
    if os.environ.get("DIFFPROG_TESTS_OWN_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event) if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)


@pytest.fixture
def compiles():
    """The programs this process has lowered for XLA so far (each a jit cache miss; a hit in the
    persistent cache is still counted), a list that grows as they are."""
    return _COMPILES


@pytest.fixture
def key():
    return jax.random.key(0)
