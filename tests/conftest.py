"""Test set-up: 8 fake CPU devices (so sharding tests can build meshes) and shared paths.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""
import json
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
# Cheap compilation for the whole test session: the suite is compile-bound (tiny models, a
# few steps each), and XLA:CPU's LLVM optimisation is most of a compile (-40% CPU on the MoE
# tests). This is jax's own switch (LLVM -O0, no expensive passes; the HLO passes, hence
# sharding, fusion and buffer assignment, are unchanged). Set through the environment so
# every `cpm2`/`python -m cpm2_jax.*` subprocess a test spawns inherits it; benchmarks and
# user runs never see it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

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


# `make test` runs `-n 2 --dist loadfile`: a whole file goes to one worker, and the run ends
# when the last file does. xdist's default hands out files by number of tests (most first),
# which leaves heavy files with few tests (subprocess runs, compiled models) for the end;
# longest-first is what balances two workers. tests/durations.json holds each file's seconds in
# a measured full run (regenerate it with tests/update_durations.py from the run's junit
# report); files it does not list keep their order after the listed ones.
DURATIONS = json.loads((REPO / "tests" / "durations.json").read_text())


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep the collection order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -DURATIONS.get(item.nodeid.split("::")[0], 0.0))  # stable: files stay whole


@pytest.fixture(autouse=True)
def _restore_task_settings():
    """Each test starts from the process's task settings (data dir, vocabulary, per-dataset dirs,
    malformed-line policy): an in-process `cpm2` run configures them through gin, and without
    this they leaked into later tests of the same xdist worker (a 51,968-id vocabulary from
    tests/inheritance/test_stages.py reached tests/test_train.py and tests/prompts/test_eval.py)."""
    import sys

    settings = sys.modules.get("cpm2_jax.tasks.settings")
    before = (dict(settings._overrides), dict(settings._task_dirs)) if settings else None
    yield
    settings = sys.modules.get("cpm2_jax.tasks.settings")
    if settings is None:
        return
    overrides, task_dirs = before or ({key: None for key in settings._overrides}, {})
    if overrides != settings._overrides or task_dirs != settings._task_dirs:
        settings._overrides.clear()
        settings._overrides.update(overrides)
        settings._task_dirs.clear()
        settings._task_dirs.update(task_dirs)
        settings._vocabulary_at.cache_clear()
