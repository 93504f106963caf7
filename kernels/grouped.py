"""Grouped matmul kernels: gmm (rows times their group's matrix) and tgmm (the per-group
weight gradient), joined by a custom_vjp, over the TPU (Mosaic) or GPU (Triton) lowering.

    gmm:  out[r] = lhs[r] @ rhs[g(r)]                   rows r of group g, zero for rows in no group
    tgmm: out[g] = sum_{r in g} lhs[r]^T grad[r]        zero for an empty group
    d lhs = gmm(grad, rhs^T),  d rhs = tgmm(lhs, grad)   (the vjp; rhs^T read in place)

Group g holds rows [offsets[g], offsets[g+1]) of lhs with offsets the running sum of
`group_sizes` (lax.ragged_dot's layout, its reference). With `group_offset`, rhs holds only
the groups group_offset .. group_offset + rhs.shape[0] - 1 (one shard's experts), and the rows
of the other groups come out as zeros (summed over shards by the caller).

Operands are zero-padded to whole blocks (a no-op for the model's shapes, whose dimensions
are multiples of the blocks); block sizes are a `Blocks` per lowering, clamped to the
problem. On a CPU the kernels run in Pallas interpret mode (slow: tests and smoke runs only).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from cpm2_jax.kernels import gpu, tpu
from cpm2_jax.kernels.metadata import local_offsets, tile_visits

LOWERINGS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes: rows (tm), contraction (tk) and output columns (tn); GPU also warps, pipeline
    stages and the steps swept together over the n tiles (group_m, for L2 reuse)."""

    tm: int
    tk: int
    tn: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


# Defaults per lowering. Not tuned on a device in this project (no TPU/GPU was available to the
# session that wrote them): TPU 512-blocks keep lhs, rhs, out and the f32 accumulator double-
# buffered within ~4 MiB of VMEM; GPU 128 x 64 x 128 is Triton's usual bf16 matmul tile on
# A100/H100. benchmarks/kernels_gpu.py and kernels_tpu.py take other sizes on the command line.
DEFAULT_BLOCKS = {"tpu": Blocks(512, 512, 512), "gpu": Blocks(128, 64, 128, num_warps=4, num_stages=3)}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How to run the kernels: lowering, blocks, interpret mode (static, hashable)."""

    lowering: str
    blocks: Blocks
    interpret: bool


def kernel_config(lowering: Optional[str] = None, blocks: Optional[Blocks] = None,
                  interpret: Optional[bool] = None, platform: Optional[str] = None) -> KernelConfig:
    """Fills the defaults: the platform's lowering (TPU -> tpu, else gpu), interpret mode on a
    platform with no Pallas lowering (CPU)."""
    platform = platform or jax.default_backend()
    if lowering is None:
        lowering = "tpu" if platform == "tpu" else "gpu"
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown Pallas lowering {lowering!r}; known: {', '.join(LOWERINGS)}")
    if interpret is None:
        interpret = platform not in ("tpu", "gpu", "cuda", "rocm")
    return KernelConfig(lowering, blocks or DEFAULT_BLOCKS[lowering], bool(interpret))


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def _block(size: int, dim: int, lowering: str, rows: bool) -> int:
    """`size` clamped to the (rounded-up) dimension: a power of two for Triton; a multiple of
    16 rows / 128 columns for Mosaic's (sublane, lane) tiling."""
    if lowering == "gpu":
        return min(size, max(16, 1 << (max(dim, 1) - 1).bit_length()))
    return min(size, _round_up(dim, 16 if rows else 128))


def _pad_to(x: jax.Array, shape) -> jax.Array:
    pads = [(0, t - s) for s, t in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _offset(group_offset) -> jax.Array:
    return jnp.zeros((), jnp.int32) if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())


def gmm_forward(lhs, rhs, group_sizes, group_offset, config: KernelConfig, transpose_rhs: bool = False,
                up=None, activation=None):
    """The kernel alone (no vjp): lhs [m, k] x rhs [G, k, n] ([G, n, k] if `transpose_rhs`) -> [m, n];
    with `up` [G, k, n] the gated form activation(lhs @ rhs) * (lhs @ up) (kernels.ffn)."""
    m, k = lhs.shape
    num_groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    rhs = rhs.astype(lhs.dtype)
    b, low = config.blocks, config.lowering
    tm, tk, tn = _block(b.tm, m, low, True), _block(b.tk, k, low, False), _block(b.tn, n, low, False)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = _pad_to(lhs, (mp, kp))
    rhs_p = _pad_to(rhs, (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_))
    gated = {} if up is None else dict(up=_pad_to(up.astype(lhs.dtype), rhs_p.shape), activation=activation)
    visits = tile_visits(group_sizes, m_tiles=mp // tm, tm=tm, num_groups=num_groups,
                         group_offset=_offset(group_offset))
    kwargs = dict(tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs, out_dtype=lhs.dtype, interpret=config.interpret)
    if low == "tpu":
        out = tpu.gmm(lhs_p, rhs_p, visits, **kwargs, **gated)
    else:
        out = gpu.gmm(lhs_p, rhs_p, visits, num_warps=b.num_warps, num_stages=b.num_stages, group_m=b.group_m,
                      **kwargs, **gated)
    return out[:m, :n]


def tgmm(lhs, grad, group_sizes, *, num_groups: Optional[int] = None, group_offset=None,
         config: Optional[KernelConfig] = None, out_dtype=None):
    """lhs [m, k], grad [m, n] -> [num_groups, k, n]: out[g] = lhs[rows of g]^T grad[rows of g]
    for the groups group_offset .. group_offset + num_groups - 1 (all groups by default)."""
    config = config or kernel_config()
    m, k = lhs.shape
    n = grad.shape[1]
    num_groups = group_sizes.shape[0] if num_groups is None else num_groups
    grad = grad.astype(lhs.dtype)
    b, low = config.blocks, config.lowering
    tm, tk, tn = _block(b.tm, m, low, True), _block(b.tk, k, low, False), _block(b.tn, n, low, False)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p, grad_p = _pad_to(lhs, (mp, kp)), _pad_to(grad, (mp, np_))
    offset = _offset(group_offset)
    out_dtype = out_dtype or lhs.dtype
    if low == "tpu":
        visits = tile_visits(group_sizes, m_tiles=mp // tm, tm=tm, num_groups=num_groups,
                             group_offset=offset, for_tgmm=True)
        out = tpu.tgmm(lhs_p, grad_p, visits, num_groups=num_groups, tm=tm, tk=tk, tn=tn,
                       out_dtype=out_dtype, interpret=config.interpret)
    else:
        out = gpu.tgmm(lhs_p, grad_p, local_offsets(group_sizes, offset, num_groups), tm=tm, tk=tk, tn=tn,
                       out_dtype=out_dtype, interpret=config.interpret, num_warps=b.num_warps,
                       num_stages=b.num_stages)
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, config):
    return gmm_forward(lhs, rhs, group_sizes, group_offset, config)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, config):
    return gmm_forward(lhs, rhs, group_sizes, group_offset, config), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(config, res, grad):
    lhs, rhs, group_sizes, group_offset = res
    d_lhs = gmm_forward(grad, rhs, group_sizes, group_offset, config, transpose_rhs=True)
    d_rhs = tgmm(lhs, grad, group_sizes, num_groups=rhs.shape[0], group_offset=group_offset, config=config,
                 out_dtype=rhs.dtype)
    return d_lhs.astype(lhs.dtype), d_rhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, group_offset=None,
        lowering: Optional[str] = None, blocks: Optional[Blocks] = None, interpret: Optional[bool] = None,
        config: Optional[KernelConfig] = None) -> jax.Array:
    """lhs [m, k] (rows sorted by group) x rhs [G, k, n] -> [m, n], differentiable in lhs and rhs
    (module docstring); lax.ragged_dot(lhs, rhs, group_sizes) when group_offset is None."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"gmm needs lhs [m, k] and rhs [G, k, n], got {lhs.shape} and {rhs.shape}")
    if group_sizes.ndim != 1 or (group_offset is None and group_sizes.shape[0] != rhs.shape[0]):
        raise ValueError(f"gmm needs group_sizes [{rhs.shape[0]}] (or a group_offset), got {group_sizes.shape}")
    config = config or kernel_config(lowering, blocks, interpret)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), _offset(group_offset), config)
