"""One grouped matmul, y_rows = x_rows @ W[expert(row)], behind interchangeable backends.

Two layouts of the token rows (built by `moe.dispatch`):
- ragged:  lhs [M, K], rows sorted by expert, `group_sizes` [E] (rows past their sum are
  zero); backends `ragged_dot` (jax.lax.ragged_dot: dropless, no padding) and, later,
  `pallas` (the grouped-matmul kernel of `cpm2_jax.kernels`);
- batched: lhs [..., E, C, K], C slots per expert; backends `padded` and `einsum` (both a
  batched matmul here; they differ in how `dispatch` fills the slots).

`auto` picks per platform by measurement (benchmarks/moe_dispatch.py; the CPU figures of
issue 5: ragged_dot 1.03 s vs padded 0.059 s vs dense 0.034 s for 8,192 x 512 -> 1024 over
32 experts), falling back to the ragged layout when padding would waste most of the work.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from cpm2_jax.errors import ConfigError, closest

BACKENDS = ("ragged_dot", "padded", "einsum", "pallas")
RAGGED_BACKENDS = ("ragged_dot", "pallas")
# Default per platform. CPU: XLA's ragged_dot lowers to a slow loop, a padded batched matmul is
# within 2x of a dense one. GPU/TPU: ragged_dot has native grouped-matmul lowerings (no padding).
AUTO_BACKEND = {"cpu": "padded", "gpu": "ragged_dot", "cuda": "ragged_dot", "rocm": "ragged_dot",
                "tpu": "ragged_dot"}
# `auto` avoids the padded layout when padded slots would exceed this multiple of routed rows
# (e.g. the argmax fallback of the balanced router, which needs capacity S per expert).
MAX_PADDING_RATIO = 2.0


def check_backend(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ConfigError(f"unknown moe_backend {name!r}{closest(name, BACKENDS + ('auto',))}; "
                          f"known: auto, {', '.join(BACKENDS)}")


def select_backend(name: str, *, routed_rows: int, padded_rows: int, platform: Optional[str] = None) -> str:
    """`name`, or for `auto` the measured default of the platform (see AUTO_BACKEND)."""
    check_backend(name)
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    choice = AUTO_BACKEND.get(platform, "padded")
    if choice == "padded" and padded_rows > MAX_PADDING_RATIO * routed_rows:
        choice = "ragged_dot"
    return choice


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: Optional[jax.Array] = None, *,
                   backend: str, dtype=None) -> jax.Array:
    """lhs rows times their expert's matrix rhs [E, K, N] (layouts in the module docstring)."""
    dtype = dtype or lhs.dtype
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    if backend == "ragged_dot":
        if group_sizes is None:
            raise ValueError("the ragged_dot backend needs group_sizes")
        return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
    if backend in ("padded", "einsum"):
        # [..., E, C, K] x [E, K, N] -> [..., E, C, N]: one batched matmul over experts.
        return jnp.einsum("...eck,ekn->...ecn", lhs, rhs)
    if backend == "pallas":
        raise ConfigError("moe_backend 'pallas' needs the grouped-matmul kernel of cpm2_jax.kernels, "
                          "which is not built yet; use ragged_dot, padded or einsum")
    check_backend(backend)
    raise ConfigError(f"moe_backend {backend!r} must be resolved with select_backend first")
