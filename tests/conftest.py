"""Test set-up: 8 fake CPU devices (so sharding tests can build meshes) and shared paths.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""
import os
import pathlib

# The collective timeouts: XLA:CPU aborts the process when the threads of a cross-device
# collective do not all arrive within its termination timeout, which a starved 2-core
# machine running 8 fake devices (plus subprocess tests) can exceed; raise it well above.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8"
                      " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                      " --xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent JAX compilation cache per test session: a fresh directory (never the user's
# cache), made by the xdist controller (or a plain run) and inherited through the environment
# by both workers and every `cpm2`/`python -m cpm2_jax.*` subprocess a test spawns, so the
# tiny models each compile once per session instead of once per process and per test.
# A cached executable is the compiled program itself: results are unchanged.
if "PYTEST_XDIST_WORKER" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    _JAX_CACHE = tempfile.mkdtemp(prefix="cpm2-test-jax-cache-")
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_JAX_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (real bilingual text); tests that need it skip nowhere: CI has it."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"../shared/data not found at {SHARED_DATA}; CI lays it beside the clone")
    return SHARED_DATA
