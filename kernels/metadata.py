"""Tile metadata of a grouped matmul: which (group, row tile) each grid step works on.

The rows of lhs [m, k] are sorted by group: group g holds rows [offsets[g], offsets[g+1]).
With row tiles of `tm` rows a tile can hold rows of several groups; it is then visited once
per group, consecutively, each visit storing only its group's rows (a masked store). The
visits are ordered so that an output block is revisited only on consecutive steps (Mosaic
keeps a block resident until its index changes, then writes it back).

Two visit lists, one per kernel:
- gmm (output [m, n] by row tile): every non-empty local group's tiles, plus one zero-fill
  visit for each tile no local group touches, so rows outside the local groups (past
  sum(group_sizes), or of another shard's experts) are written as zeros, never left
  uninitialised (the combine multiplies them by 0, and NaN * 0 is NaN). Empty groups are
  skipped.
- tgmm (output [E, k, n] by group): every local group's tiles, and one visit for each empty
  group, which writes its zero block.

Local groups are `num_groups` groups starting at `group_offset` (the experts of this shard
under expert parallelism); offsets stay in rows of the full lhs.

The number of steps is at most m_tiles + num_groups - 1 (each group adds at most one tile
shared with its predecessor); the grid has that static size and the steps past the real
ones repeat the last visit with nothing to do.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TileVisits(NamedTuple):
    """Per-step metadata, int32 arrays (scalar-prefetched on TPU, read from memory on GPU)."""

    offsets: jax.Array  # [G + 1] first row of each local group, then the end of the last
    group: jax.Array  # [S] local group of the step
    tile: jax.Array  # [S] row tile of the step
    active: jax.Array  # [S] 1: multiply and store the group's rows; 0: zero-fill or padding
    first: jax.Array  # [S] 1 at the first visit of the step's output block
    last: jax.Array  # [S] 1 at the last visit of the step's output block


def num_steps(m_tiles: int, num_groups: int) -> int:
    """Static bound on the visits of either list (module docstring)."""
    return m_tiles + max(num_groups, 1) - 1


def local_offsets(group_sizes: jax.Array, group_offset, num_groups: int) -> jax.Array:
    """[num_groups + 1] row bounds of groups group_offset .. group_offset + num_groups - 1."""
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    local_starts = jax.lax.dynamic_slice_in_dim(starts, group_offset, num_groups)
    local_sizes = jax.lax.dynamic_slice_in_dim(sizes, group_offset, num_groups)
    return jnp.concatenate([local_starts, local_starts[-1:] + local_sizes[-1:]])


def tile_visits(group_sizes: jax.Array, *, m_tiles: int, tm: int, num_groups: int, group_offset=0,
                for_tgmm: bool = False) -> TileVisits:
    """The visit list of gmm (`for_tgmm=False`) or tgmm (module docstring)."""
    offsets = local_offsets(group_sizes, group_offset, num_groups)
    lo, hi = offsets[:-1], offsets[1:]
    nonempty = hi > lo
    first_tile = lo // tm
    last_tile = (hi - 1) // tm
    if for_tgmm:  # an empty group visits the tile its start falls in, to write its zeros
        counts = jnp.where(nonempty, last_tile - first_tile + 1, 1)
        start_tile = jnp.minimum(first_tile, m_tiles - 1)
        before = after = jnp.zeros((), jnp.int32)
        after_start = jnp.zeros((), jnp.int32)
    else:  # zero-fill the tiles before the first and after the last local row
        counts = jnp.where(nonempty, last_tile - first_tile + 1, 0)
        start_tile = first_tile
        any_rows = offsets[-1] > offsets[0]
        covered_first = jnp.where(any_rows, offsets[0] // tm, m_tiles)
        covered_last = jnp.where(any_rows, (offsets[-1] - 1) // tm, m_tiles - 1)
        before, after_start = covered_first, covered_last + 1
        after = m_tiles - after_start
    # Segments in step order: [zero tiles before] [group 0] ... [group G-1] [zero tiles after].
    seg_counts = jnp.concatenate([before[None], counts, after[None]]).astype(jnp.int32)
    seg_ends = jnp.cumsum(seg_counts)
    seg_starts = seg_ends - seg_counts
    seg_tile0 = jnp.concatenate([jnp.zeros((1,), jnp.int32), start_tile, after_start[None]]).astype(jnp.int32)
    total = seg_ends[-1]
    steps = num_steps(m_tiles, num_groups)
    step = jnp.arange(steps, dtype=jnp.int32)
    valid = step < total
    real = jnp.minimum(step, total - 1)  # padding steps repeat the last visit
    seg = jnp.minimum(jnp.searchsorted(seg_ends, real, side="right"), num_groups + 1).astype(jnp.int32)
    tile = seg_tile0[seg] + real - seg_starts[seg]
    in_group = (seg >= 1) & (seg <= num_groups)
    group = jnp.clip(seg - 1, 0, num_groups - 1)
    active = valid & in_group & nonempty[group]
    block = group if for_tgmm else tile  # the output block of the step
    prev_block = jnp.concatenate([jnp.full((1,), -1, jnp.int32), block[:-1]])
    next_block = jnp.concatenate([block[1:], jnp.full((1,), -1, jnp.int32)])
    first = valid & (block != prev_block)
    last = valid & ((step == total - 1) | (block != next_block))
    as_int = lambda b: b.astype(jnp.int32)
    return TileVisits(offsets=offsets.astype(jnp.int32), group=group, tile=tile.astype(jnp.int32),
                      active=as_int(active), first=as_int(first), last=as_int(last))
