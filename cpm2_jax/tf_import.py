"""Imports TensorFlow (pulled in by seqio) without its C++ start-up chatter on stderr, and
keeps accelerator probes that cannot succeed from printing errors.

TensorFlow's native libraries log "oneDNN custom operations are on" and "Could not find
cuda drivers" through absl before any Python setting can silence them (TF_CPP_MIN_LOG_LEVEL
does not reach them), and the first listing of its devices calls cuInit, which on a machine
without a GPU logs "failed call to cuInit" as an error. The input pipeline hides every GPU
from TensorFlow anyway (JAX owns the accelerators), so `quiet_tensorflow_import()` imports
TensorFlow and hides its GPUs once, with file descriptor 2 pointed at /dev/null for just
that; whatever TensorFlow logs afterwards reaches stderr as before. Likewise a JAX CUDA
plugin installed on a machine with no NVIDIA device would log cuInit errors at the first
JAX call: `default_jax_platforms()` then initialises only the CPU (and a TPU, if present),
unless JAX_PLATFORMS is set. The `cpm2` binaries call both first. Import errors still
surface unchanged.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.abc
import importlib.util
import os
import sys

_NVIDIA_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia")
_TPU_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*")
_JAX_CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow_import() -> None:
    """Imports tensorflow once and hides its GPUs, with file descriptor 2 pointed at /dev/null."""
    quiet_tensorflow_on_import()
    import tensorflow  # noqa: F401  (through the hook: quietly, GPUs hidden)


class _QuietLoader:
    """TensorFlow's own loader, its module executed with fd 2 on /dev/null and its GPUs hidden."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _stderr_to_devnull():
            self._loader.exec_module(module)
            try:
                module.config.set_visible_devices([], "GPU")
            except (RuntimeError, AttributeError):
                pass

    def __getattr__(self, name):  # resource readers and the like: the real loader's
        return getattr(self._loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the other finders do (once; then it leaves sys.meta_path) and
    hands its import to `_QuietLoader`."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_on_import() -> None:
    """`quiet_tensorflow_import`'s effect, deferred to the moment something imports TensorFlow:
    a command that never reads data (convert, offload on token ids, params, doctor) never pays
    for it (importing TensorFlow is ~8 s of every `cpm2` start on a 2-core machine)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def jax_platforms_for(env, nvidia_present: bool, tpu_present: bool, cuda_plugin: bool):
    """The JAX_PLATFORMS value to set, or None to leave JAX's own choice: only when a CUDA
    plugin is installed, no NVIDIA device exists and the user has not chosen."""
    if "JAX_PLATFORMS" in env or nvidia_present or not cuda_plugin:
        return None
    return "tpu,cpu" if tpu_present else "cpu"


def default_jax_platforms() -> None:
    """Sets JAX_PLATFORMS before JAX starts when its CUDA plugin cannot find a GPU (see above)."""
    platforms = jax_platforms_for(os.environ, any(os.path.exists(p) for p in _NVIDIA_DEVICES),
                                  any(glob.glob(p) for p in _TPU_DEVICES),
                                  any(_has_module(m) for m in _JAX_CUDA_PLUGINS))
    if platforms is not None:
        os.environ["JAX_PLATFORMS"] = platforms
        if "jax" in sys.modules:  # imported already (python -m cpm2_jax.train): its backends start lazily
            sys.modules["jax"].config.update("jax_platforms", platforms)
