"""The Pallas TPU (Mosaic) lowering of gmm and tgmm: the visit metadata of `kernels.metadata`
is scalar-prefetched into SMEM (PrefetchScalarGridSpec), and the index maps read it to pick
each step's lhs tile and expert matrix; the f32 accumulator lives in VMEM.

gmm grid (n tiles, steps, k tiles): out[tile, n] = lhs[tile, :] @ rhs[group, :, n] stored on the
rows of the step's group (zeros on the first visit of a tile for the other rows).
tgmm grid (k tiles, n tiles, steps): out[group, k, n] += lhs[tile, k]^T @ grad[tile, n] over the
group's rows, the accumulator reset at the group's first visit and stored at its last.
Operands arrive padded to whole blocks (kernels.grouped), so no block is ragged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cpm2_jax.kernels.metadata import TileVisits

_F32 = jnp.float32


def _row_mask(visits, step, tm: int, width: int):
    """[tm, width] True on the rows of the step's tile that belong to its group (if active)."""
    offsets, group, tile, active = visits[0], visits[1], visits[2], visits[3]
    g = group[step]
    rows = tile[step] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
    return (rows >= offsets[g]) & (rows < offsets[g + 1]) & (active[step] == 1)


def gmm(lhs, rhs, visits: TileVisits, *, tm: int, tk: int, tn: int, transpose_rhs: bool,
        out_dtype, interpret: bool, up=None, activation=None):
    """lhs [M, K] x rhs [G, K, N] (or [G, N, K] when `transpose_rhs`) -> [M, N]; M, K, N whole blocks.
    With `up` [G, K, N] (gated: one lhs tile read for both products, two accumulators):
    out = activation(lhs @ rhs) * (lhs @ up), computed in float32 before the store."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    n_tiles, k_tiles, steps = n // tn, k // tk, visits.group.shape[0]
    weights = (rhs,) if up is None else (rhs, up)
    count = len(weights)

    def kernel(offsets, group, tile, active, first, last, lhs_ref, *refs):
        del last
        rhs_refs, out_ref, acc_refs = refs[:count], refs[count], refs[count + 1:]
        step, kk = pl.program_id(1), pl.program_id(2)

        @pl.when(kk == 0)
        def _():
            for acc_ref in acc_refs:
                acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active[step] == 1)
        def _():
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            x = lhs_ref[...]
            for rhs_ref, acc_ref in zip(rhs_refs, acc_refs):
                acc_ref[...] += jax.lax.dot_general(x, rhs_ref[...], dims, preferred_element_type=_F32)

        @pl.when(kk == k_tiles - 1)
        def _():
            mask = _row_mask((offsets, group, tile, active), step, tm, tn)
            value = acc_refs[0][...] if count == 1 else activation(acc_refs[0][...]) * acc_refs[1][...]

            @pl.when(first[step] == 1)
            def _():
                out_ref[...] = jnp.where(mask, value, 0.0).astype(out_ref.dtype)

            @pl.when(first[step] == 0)
            def _():
                out_ref[...] = jnp.where(mask, value, out_ref[...].astype(_F32)).astype(out_ref.dtype)

    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, s, kk, off, g, t, *_: (g[s], j, kk))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, s, kk, off, g, t, *_: (g[s], kk, j))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(visits),
        grid=(n_tiles, steps, k_tiles),
        in_specs=[pl.BlockSpec((tm, tk), lambda j, s, kk, off, g, t, *_: (t[s], kk))] + [rhs_spec] * count,
        out_specs=pl.BlockSpec((tm, tn), lambda j, s, kk, off, g, t, *_: (t[s], j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), _F32)] * count,
    )
    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret, name="cpm2_gmm" if count == 1 else "cpm2_gated_gmm",
        cost_estimate=pl.CostEstimate(flops=2 * count * m * k * n, transcendentals=m * n * (count - 1),
                                      bytes_accessed=(m * k + count * rhs.size + m * n) * lhs.dtype.itemsize))
    return call(*visits, lhs, *weights)


def tgmm(lhs, grad, visits: TileVisits, *, num_groups: int, tm: int, tk: int, tn: int, out_dtype,
         interpret: bool):
    """lhs [M, K], grad [M, N] -> [G, K, N]: per group, its rows of lhs transposed times grad's."""
    m, k = lhs.shape
    n = grad.shape[1]
    k_tiles, n_tiles, steps = k // tk, n // tn, visits.group.shape[0]

    def kernel(offsets, group, tile, active, first, last, lhs_ref, grad_ref, out_ref, acc_ref):
        step = pl.program_id(2)

        @pl.when(first[step] == 1)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active[step] == 1)
        def _():
            meta = (offsets, group, tile, active)
            x = jnp.where(_row_mask(meta, step, tm, tk), lhs_ref[...], 0)
            dy = jnp.where(_row_mask(meta, step, tm, tn), grad_ref[...], 0)
            acc_ref[...] += jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=_F32)

        @pl.when(last[step] == 1)
        def _():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(visits),
        grid=(k_tiles, n_tiles, steps),
        in_specs=[pl.BlockSpec((tm, tk), lambda i, j, s, off, g, t, *_: (t[s], i)),
                  pl.BlockSpec((tm, tn), lambda i, j, s, off, g, t, *_: (t[s], j))],
        out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, s, off, g, t, *_: (g[s], i, j)),
        scratch_shapes=[pltpu.VMEM((tk, tn), _F32)],
    )
    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype), grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="cpm2_tgmm",
        cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                                      bytes_accessed=(m * k + m * n) * lhs.dtype.itemsize
                                      + num_groups * k * n * jnp.dtype(out_dtype).itemsize))
    return call(*visits, lhs, grad)

