"""The Pallas GPU (Triton) lowering of gmm and tgmm, for Hopper and older GPUs.

Triton programs write straight to global memory, so nothing is revisited: gmm's program
(step, n tile; in Triton's grouped order) multiplies its visit's row tile by its group's matrix (a static loop over k
blocks) and stores the group's rows with a masked store; the first visit of a tile also stores
zeros on the tile's rows outside every local group. tgmm's program (group, k tile, n tile)
walks its group's row tiles (a loop with a data-dependent trip count: zero for an empty
group, whose block is then stored as zeros). The metadata arrays are read from memory.
Operands arrive padded to whole blocks (kernels.grouped), so every load is in bounds;
block sizes must be powers of two (Triton).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cpm2_jax.kernels.metadata import TileVisits

_F32 = jnp.float32


def _swizzle(pid, steps: int, n_tiles: int, group_m: int):
    """(step, n tile) of program `pid` in Triton's grouped order: `group_m` consecutive steps
    sweep all n tiles together, so a wave of programs reuses their lhs tiles and one group's
    rhs columns from L2 instead of streaming either from memory once per tile of the other."""
    per_group = group_m * n_tiles
    first = (pid // per_group) * group_m
    rows = jnp.minimum(steps - first, group_m)
    within = pid % per_group
    return first + within % rows, within // rows


def gmm(lhs, rhs, visits: TileVisits, *, tm: int, tk: int, tn: int, transpose_rhs: bool, out_dtype,
        interpret: bool, num_warps: int = 4, num_stages: int = 3, group_m: int = 8, up=None, activation=None):
    """lhs [M, K] x rhs [G, K, N] (or [G, N, K] when `transpose_rhs`) -> [M, N]; M, K, N whole blocks.
    With `up` [G, K, N] (gated: one lhs tile load for both products, two accumulators):
    out = activation(lhs @ rhs) * (lhs @ up), computed in float32 before the store."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    num_groups = rhs.shape[0]
    k_tiles, steps, n_tiles = k // tk, visits.group.shape[0], n // tn
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    weights = (rhs,) if up is None else (rhs, up)
    count = len(weights)

    def kernel(offsets, group, tile, active, first, last, lhs_ref, *refs):
        del last
        rhs_refs, out_ref = refs[:count], refs[count]
        step, j = _swizzle(pl.program_id(0), steps, n_tiles, group_m)
        g, t, is_active = group[step], tile[step], active[step] == 1
        row0 = pl.multiple_of(t * tm, tm)
        col0 = pl.multiple_of(j * tn, tn)

        def body(kk, accs):
            k0 = pl.multiple_of(kk * tk, tk)
            x = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)])
            out = []
            for rhs_ref, acc in zip(rhs_refs, accs):
                if transpose_rhs:
                    w = plgpu.load(rhs_ref.at[g, pl.ds(col0, tn), pl.ds(k0, tk)])
                else:
                    w = plgpu.load(rhs_ref.at[g, pl.ds(k0, tk), pl.ds(col0, tn)])
                out.append(acc + jax.lax.dot_general(x, w, dims, preferred_element_type=_F32))
            return tuple(out)

        zeros = (jnp.zeros((tm, tn), _F32),) * count
        accs = jax.lax.cond(is_active, lambda: jax.lax.fori_loop(0, k_tiles, body, zeros), lambda: zeros)
        value = accs[0] if count == 1 else activation(accs[0]) * accs[1]
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        in_group = (rows >= offsets[g]) & (rows < offsets[g + 1]) & is_active
        outside = (rows < offsets[0]) | (rows >= offsets[num_groups])
        store = in_group | (outside & (first[step] == 1))
        plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)],
                    jnp.where(in_group, value, 0.0).astype(out_ref.dtype), mask=store)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(steps * n_tiles,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="cpm2_gmm" if count == 1 else "cpm2_gated_gmm",
        cost_estimate=pl.CostEstimate(flops=2 * count * m * k * n, transcendentals=m * n * (count - 1),
                                      bytes_accessed=(m * k + count * rhs.size + m * n) * lhs.dtype.itemsize),
    )(*visits, lhs, *weights)


def tgmm(lhs, grad, offsets, *, tm: int, tk: int, tn: int, out_dtype, interpret: bool,
         num_warps: int = 4, num_stages: int = 3):
    """lhs [M, K], grad [M, N], offsets [G + 1] (kernels.metadata.local_offsets) -> [G, K, N]."""
    m, k = lhs.shape
    n = grad.shape[1]
    num_groups = offsets.shape[0] - 1

    def kernel(offsets_ref, lhs_ref, grad_ref, out_ref):
        # k tiles vary fastest, then n tiles: a wave of programs shares one group's rows in L2.
        i, j, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        lo, hi = offsets_ref[g], offsets_ref[g + 1]
        k0, n0 = pl.multiple_of(i * tk, tk), pl.multiple_of(j * tn, tn)
        first_tile = lo // tm
        end_tile = jnp.where(hi > lo, (hi + tm - 1) // tm, first_tile)

        def body(t, acc):
            row0 = pl.multiple_of(t * tm, tm)
            rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
            mine = (rows >= lo) & (rows < hi)
            x = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)])
            dy = plgpu.load(grad_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)])
            x = jnp.where(mine, x, jnp.zeros_like(x))
            dy = jnp.where(mine, dy, jnp.zeros_like(dy))
            return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=_F32)

        acc = jax.lax.fori_loop(first_tile, end_tile, body, jnp.zeros((tk, tn), _F32))
        out_ref[g, pl.ds(k0, tk), pl.ds(n0, tn)] = acc.astype(out_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(k // tk, n // tn, num_groups),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="cpm2_tgmm",
        cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                                      bytes_accessed=(m * k + m * n) * lhs.dtype.itemsize
                                      + num_groups * k * n * jnp.dtype(out_dtype).itemsize),
    )(offsets, lhs, grad)
