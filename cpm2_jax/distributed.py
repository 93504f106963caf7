"""Multi-host start-up on JAX's own distributed runtime, with t5x's flags.

Every process runs the same binary with `--coordinator_address=host:port --process_count=N
--process_index=i`; each then feeds its own shard of the global batch (shard i of N). On
CPU the cross-process collectives go through gloo.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import jax

from cpm2_jax.errors import ConfigError


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (jax.distributed)")
    group.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator; enables multi-process training")
    group.add_argument("--process_count", type=int, default=None, help="number of processes")
    group.add_argument("--process_index", type=int, default=None, help="index of this process (0-based)")
    group.add_argument("--auto_distributed", action="store_true",
                       help="let JAX detect the cluster (TPU pods, SLURM, Open MPI) instead of the flags above")


def initialize(coordinator_address: Optional[str] = None, process_count: Optional[int] = None,
               process_index: Optional[int] = None, *, auto: bool = False, timeout_s: int = 300) -> bool:
    """Starts `jax.distributed` when asked; returns whether this is a multi-process run.

    Must run before anything touches a JAX backend (device lists, arrays)."""
    if not auto and coordinator_address is None:
        if (process_count or 1) > 1:
            raise ConfigError("--process_count > 1 needs --coordinator_address=HOST:PORT (or --auto_distributed)")
        return False
    if not auto:
        if process_count is None or process_index is None:
            raise ConfigError("--coordinator_address needs --process_count and --process_index")
        if not 0 <= process_index < process_count:
            raise ConfigError(f"--process_index {process_index} is not in [0, {process_count})")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(coordinator_address, process_count, process_index,
                                   initialization_timeout=timeout_s)
    return jax.process_count() > 1


def _cpu_only() -> bool:
    """True when no accelerator plugin is installed (checked without starting a backend)."""
    import importlib.util

    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def initialize_from_args(args) -> bool:
    return initialize(getattr(args, "coordinator_address", None), getattr(args, "process_count", None),
                      getattr(args, "process_index", None), auto=getattr(args, "auto_distributed", False))
