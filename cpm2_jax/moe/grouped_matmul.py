"""One grouped matmul, y_rows = x_rows @ W[expert(row)], behind interchangeable backends.

Two layouts of the token rows (built by `moe.dispatch`):
- ragged:  lhs [M, K], rows sorted by expert, `group_sizes` [E] (rows past their sum are
  zero); backends `xla` (alias `ragged_dot`: jax.lax.ragged_dot, dropless, no padding) and
  `pallas` (the grouped-matmul kernels of `cpm2_jax.kernels`: Mosaic on TPU, Triton on GPU,
  interpret mode on CPU; under an `expert` mesh axis one kernel per device through
  shard_map: its local experts, its chunk of the rows, outputs summed over the expert shards);
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

`auto` picks per platform (benchmarks/moe_dispatch.py; the CPU figures of issue 5:
ragged_dot 1.03 s vs padded 0.059 s vs dense 0.034 s for 8,192 x 512 -> 1024 over 32
experts): ragged_dot on GPU/TPU, the padded layout on CPU, falling back to the ragged layout
when padding would waste most of the work. It does not pick `pallas`: the kernels have run
only in interpret mode so far (their Mosaic/Triton compilation is untested on a device);
benchmarks/kernels_gpu.py prints whether they should become the default.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.errors import ConfigError, closest
from cpm2_jax.moe.expert_loop import looped_matmul

BACKENDS = ("ragged_dot", "padded", "einsum", "pallas")
# Other names of the same backends (moe_backend accepts both; select_backend returns the key's value).
ALIASES = {"xla": "ragged_dot"}
RAGGED_BACKENDS = ("ragged_dot", "pallas")
# Default per platform. CPU: XLA's ragged_dot lowers to a slow loop, a padded batched matmul is
# within 2x of a dense one (and Pallas has no CPU lowering, only the slow interpret mode).
# GPU/TPU: ragged_dot (native grouped-matmul lowerings, no padding). The Pallas kernels
# (kernels/) stay opt-in (moe_backend="pallas") until a device run of benchmarks/kernels_gpu.py
# or kernels_tpu.py shows that they compile there and beat ragged_dot (none has yet).
AUTO_BACKEND = {"cpu": "padded", "gpu": "ragged_dot", "cuda": "ragged_dot", "rocm": "ragged_dot",
                "tpu": "ragged_dot"}
# `auto` avoids the padded layout when padded slots would exceed this multiple of routed rows
# (e.g. the argmax fallback of the balanced router, which needs capacity S per expert).
MAX_PADDING_RATIO = 2.0


def check_backend(name: str) -> None:
    known = BACKENDS + tuple(ALIASES)
    if name != "auto" and name not in known:
        raise ConfigError(f"unknown moe_backend {name!r}{closest(name, known + ('auto',))}; "
                          f"known: auto, {', '.join(known)}")


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
        return ALIASES.get(name, name)
    platform = platform or jax.default_backend()
    if expert_sharded is None:
        expert_sharded = expert_axis_sharded()
    choice = "padded" if expert_sharded else AUTO_BACKEND.get(platform, "padded")
    if choice == "padded" and padded_rows > MAX_PADDING_RATIO * routed_rows:
        choice = "ragged_dot"
    return choice


def expert_mesh_axes() -> tuple[str, ...]:
    """The axes of the mesh in scope (jax.set_mesh) of size > 1 that split the `expert` logical
    axis under the flax logical-axis rules in scope."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    spec = nn.logical_to_mesh_axes(("expert",))
    axes = spec[0] if len(spec) else None
    if axes is None:
        return ()
    axes = axes if isinstance(axes, tuple) else (axes,)
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def expert_axis_sharded() -> bool:
    """Whether the mesh in scope splits the `expert` logical axis."""
    return bool(expert_mesh_axes())


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
    backend = ALIASES.get(backend, backend)
    if backend in RAGGED_BACKENDS and group_sizes is None:
        raise ValueError(f"the {backend} backend needs group_sizes")
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
    if backend == "pallas":
        return pallas_grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32))
    if backend in ("padded", "einsum"):
        if lhs.ndim != 3 or lhs.shape[0] != rhs.shape[0]:
            raise ValueError(f"batched grouped_matmul needs lhs [E, M, K] with E = {rhs.shape[0]} "
                             f"experts, got {lhs.shape}")
        return looped_matmul(lhs, rhs) if expert_loop else _batched_dot(lhs, rhs)
    check_backend(backend)
    raise ConfigError(f"moe_backend {backend!r} must be resolved with select_backend first")


def pallas_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """cpm2_jax.kernels.gmm (differentiable); under an `expert` mesh axis one kernel per shard
    (`per_expert_shard`)."""
    from cpm2_jax.kernels import gmm  # the kernels import Pallas: only when this backend runs

    return per_expert_shard(lambda rows, w, sizes, offset: gmm(rows, *w, sizes, group_offset=offset),
                            lhs, (rhs,), group_sizes)


def pallas_gated_ffn(lhs: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array,
                     group_sizes: jax.Array) -> jax.Array:
    """The fused expert block (gelu(x wi_0) * (x wi_1)) wo of cpm2_jax.kernels.ffn
    (differentiable), per expert shard like `pallas_grouped_matmul`."""
    from cpm2_jax.kernels.ffn import gated_ffn

    return per_expert_shard(lambda rows, w, sizes, offset: gated_ffn(rows, *w, sizes, group_offset=offset),
                            lhs, (wi_0, wi_1, wo), group_sizes)


def per_expert_shard(kernel, lhs: jax.Array, weights: tuple, group_sizes: jax.Array) -> jax.Array:
    """kernel(rows, weights, group_sizes, group_offset) on all rows, or under an `expert` mesh
    axis once per shard through shard_map. The rows are split in contiguous chunks over the
    other mesh axes, the experts (leading axis of every weight) over the expert axes: each device
    runs its chunk's rows of its local experts (group sizes cut to the chunk, group_offset =
    expert shard x local experts), zeros the rest, and the expert shards' outputs are summed (a
    reduce over the expert axes, as XLA partitions ragged_dot). The weight gradients sum over
    the row chunks (shard_map's transpose)."""
    axes = expert_mesh_axes()
    if not axes:
        return kernel(lhs, weights, group_sizes, None)
    mesh = jax.sharding.get_abstract_mesh()
    shards = math.prod(mesh.shape[a] for a in axes)
    num_experts = weights[0].shape[0]
    if num_experts % shards:
        raise ConfigError(f"num_experts {num_experts} is not divisible by the {shards} shards of mesh "
                          f"axes {axes} that split the `expert` axis")
    local = num_experts // shards
    row_axes = tuple(a for a in mesh.axis_names if a not in axes and mesh.shape[a] > 1)
    chunks = math.prod(mesh.shape[a] for a in row_axes)
    m = lhs.shape[0]
    padded = -(-m // chunks) * chunks
    if padded != m:  # rows past sum(group_sizes) are in no group: zero rows, sliced off below
        lhs = jnp.pad(lhs, ((0, padded - m), (0, 0)))
    spec = jax.sharding.PartitionSpec
    rows_spec = spec(row_axes) if row_axes else spec()

    def per_shard(rows, shard_weights, sizes):
        size = rows.shape[0]
        first = jax.lax.axis_index(row_axes) * size if row_axes else 0
        ends = jnp.cumsum(sizes)
        in_chunk = jnp.clip(ends, first, first + size) - jnp.clip(ends - sizes, first, first + size)
        offset = jax.lax.axis_index(axes) * local
        return jax.lax.psum(kernel(rows, shard_weights, in_chunk.astype(jnp.int32), offset), axes)

    out = jax.shard_map(per_shard, in_specs=(rows_spec, (spec(axes),) * len(weights), spec()),
                        out_specs=rows_spec, check_vma=False)(lhs, tuple(weights), group_sizes)
    return out[:m]
