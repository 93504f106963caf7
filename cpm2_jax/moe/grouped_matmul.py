"""One grouped matmul, y_rows = x_rows @ W[expert(row)], behind interchangeable backends.

Two layouts of the token rows (built by `moe.dispatch`):
- ragged:  lhs [M, K], rows sorted by expert, `group_sizes` [E] (rows past their sum are
  zero); backends `ragged_dot` (jax.lax.ragged_dot: dropless, no padding) and, later,
  `pallas` (the grouped-matmul kernel of `cpm2_jax.kernels`);
- batched: lhs [E, M, K], M slots per expert (expert-major: `layer.expert_ffn` moves the
  [G, E, C, K] buffers of `moe.dispatch` to [E, G*C, K]); backends `padded` and `einsum`
  (both a batched matmul here; they differ in how `dispatch` fills the slots).

The batched product has two implementations of the same arithmetic: one batched dot (any
mesh), and, where the experts are not split over devices, a loop over experts of 2-D matmuls
whose weight gradient is still one batched dot (`expert_loop`, moe.expert_loop): on XLA:CPU
the 2-D matmuls of the loop ran ~25% faster than the batched dot for the forward and
input-gradient products (33 vs 42 ms and 23 vs 30 ms for 32 x [256, 512] x [512, 1024],
2 cores), while for the weight gradient neither form won. Under an expert-sharded mesh a
loop would slice a sharded axis, so the batched dot is used there.

`auto` picks per platform by measurement (benchmarks/moe_dispatch.py; the CPU figures of
issue 5: ragged_dot 1.03 s vs padded 0.059 s vs dense 0.034 s for 8,192 x 512 -> 1024 over
32 experts), falling back to the ragged layout when padding would waste most of the work.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.errors import ConfigError, closest
from cpm2_jax.moe.expert_loop import looped_matmul

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


def select_backend(name: str, *, routed_rows: int, padded_rows: int, platform: Optional[str] = None,
                   expert_sharded: Optional[bool] = None) -> str:
    """`name`, or for `auto` the measured default of the platform (see AUTO_BACKEND).

    Under expert parallelism (`expert_sharded`, by default read from the mesh in scope) `auto`
    takes `padded`: its [G, E, C, d] buffers move between batch and expert shards by one
    all-to-all, while the ragged layout's global sort is partitioned by XLA into an all-reduce
    of every token's output on every device (no ragged all-to-all here yet).
    """
    check_backend(name)
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    if expert_sharded is None:
        expert_sharded = expert_axis_sharded()
    choice = "padded" if expert_sharded else AUTO_BACKEND.get(platform, "padded")
    if choice == "padded" and padded_rows > MAX_PADDING_RATIO * routed_rows:
        choice = "ragged_dot"
    return choice


def expert_axis_sharded() -> bool:
    """Whether the mesh in scope (jax.set_mesh) splits the `expert` logical axis under the
    flax logical-axis rules in scope."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    spec = nn.logical_to_mesh_axes(("expert",))
    axes = spec[0] if len(spec) else None
    if axes is None:
        return False
    axes = axes if isinstance(axes, tuple) else (axes,)
    return any(mesh.shape.get(a, 1) > 1 for a in axes)


def use_expert_loop(platform: Optional[str] = None) -> bool:
    """The per-expert loop on CPU when the experts are not split over devices (module docstring)."""
    return (platform or jax.default_backend()) == "cpu" and not expert_axis_sharded()


def _batched_dot(lhs, rhs):
    """[E, M, K] x [E, K, N] -> [E, M, N]."""
    return jax.lax.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))))


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: Optional[jax.Array] = None, *,
                   backend: str, dtype=None, expert_loop: bool = False) -> jax.Array:
    """lhs rows times their expert's matrix rhs [E, K, N] (layouts in the module docstring);
    `expert_loop` picks the loop form of the batched product (`use_expert_loop`)."""
    dtype = dtype or lhs.dtype
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    if backend == "ragged_dot":
        if group_sizes is None:
            raise ValueError("the ragged_dot backend needs group_sizes")
        return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
    if backend in ("padded", "einsum"):
        if lhs.ndim != 3 or lhs.shape[0] != rhs.shape[0]:
            raise ValueError(f"batched grouped_matmul needs lhs [E, M, K] with E = {rhs.shape[0]} "
                             f"experts, got {lhs.shape}")
        return looped_matmul(lhs, rhs) if expert_loop else _batched_dot(lhs, rhs)
    if backend == "pallas":
        raise ConfigError("moe_backend 'pallas' needs the grouped-matmul kernel of cpm2_jax.kernels, "
                          "which is not built yet; use ragged_dot, padded or einsum")
    check_backend(backend)
    raise ConfigError(f"moe_backend {backend!r} must be resolved with select_backend first")
