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

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (real bilingual text); tests that need it skip nowhere: CI has it."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"../shared/data not found at {SHARED_DATA}; CI lays it beside the clone")
    return SHARED_DATA
