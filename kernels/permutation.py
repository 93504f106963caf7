"""Token permutation around the grouped matmul, as Pallas kernels with their gradients:

    permute:  rows[i] = x[token_of_row[i]]                        (sort by expert; 0 if >= T)
    combine:  out[t]  = sum_j weights[t, j] * y[rows_of_token[t, j]]   (weighted sum; 0 if >= M)

The two maps are inverse to each other (each row is one (token, choice) assignment; dropped
assignments point past the end), so each kernel's input gradient is the other kernel:
    d x = combine(d rows, rows_of_token, 1)
    d y[i] = weights[t(i), j(i)] * d out[t(i)]  = permute(d out, token_of_row) scaled per row
    d weights[t, j] = <d out[t], y[rows_of_token[t, j]]>
No scatter-add: every output row is written by one program.

These are the straightforward kernels (one row per grid step on TPU, a loop over a block of
rows per program on GPU), kept separate from gmm rather than fused into its prologue and
epilogue; which is faster on a device is for benchmarks/kernels_gpu.py to measure (`--permute`),
no device being available to the session that wrote them. The choice stays a parameter
(`use_kernels`) of `permute`/`combine`; the XLA path is jnp.take and a weighted sum.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from cpm2_jax.kernels.grouped import KernelConfig, kernel_config

_F32 = jnp.float32
GPU_ROWS, GPU_COLS = 16, 512  # rows per program, columns per program (power of two) on GPU


def _gpu_cols(d: int) -> int:
    return min(GPU_COLS, 1 << (max(d, 1) - 1).bit_length())


def gather_rows(x, index, scale=None, *, config: KernelConfig):
    """out[i] = scale[i] * x[index[i]] ([M, d] from x [T, d]); zero where index[i] >= T."""
    scale = jnp.ones(index.shape, _F32) if scale is None else scale
    return combine_rows(x, index[:, None], scale[:, None], config=config)


def combine_rows(y, rows, weights, *, config: KernelConfig):
    """out[t] = sum_j weights[t, j] * y[rows[t, j]] ([T, d] from y [M, d], rows/weights [T, k]);
    terms with rows[t, j] >= M are zero. Accumulates in float32. (gather_rows is k = 1.)"""
    m, d = y.shape
    t, k = rows.shape
    valid = rows.astype(jnp.int32) < m
    src = jnp.where(valid, rows, 0).astype(jnp.int32).reshape(-1)
    w = jnp.where(valid, weights.astype(_F32), 0.0).reshape(-1)
    name = "cpm2_permute" if k == 1 else "cpm2_combine"
    if config.lowering == "tpu":  # grid (token, choice): one row DMA per step, the output revisited over j
        def kernel(src_ref, w_ref, y_ref, out_ref, acc_ref):
            tok, j = pl.program_id(0), pl.program_id(1)

            @pl.when(j == 0)
            def _():
                acc_ref[...] = jnp.zeros_like(acc_ref)

            acc_ref[...] += y_ref[...].astype(_F32) * w_ref[tok * k + j]

            @pl.when(j == k - 1)
            def _():
                out_ref[...] = acc_ref[...].astype(out_ref.dtype)

        out = pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((t, 1, d), y.dtype),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2, grid=(t, k),
                in_specs=[pl.BlockSpec((None, 1, d), lambda i, j, src_ref, w_ref: (src_ref[i * k + j], 0, 0))],
                out_specs=pl.BlockSpec((None, 1, d), lambda i, j, *_: (i, 0, 0)),
                scratch_shapes=[pltpu.VMEM((1, d), _F32)]),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
            interpret=config.interpret, name=name)(src, w, y.reshape(m, 1, d))
        return out.reshape(t, d)
    # GPU: a program per (GPU_ROWS output rows, td columns), looping over its rows.
    td = _gpu_cols(d)
    dp, tp = -(-d // td) * td, -(-t // GPU_ROWS) * GPU_ROWS
    yp = jnp.pad(y, ((0, 0), (0, dp - d))) if dp != d else y
    src_p, w_p = jnp.pad(src, (0, (tp - t) * k)), jnp.pad(w, (0, (tp - t) * k))

    def kernel(src_ref, w_ref, y_ref, out_ref):
        i, jd = pl.program_id(0), pl.program_id(1)
        cols = pl.ds(pl.multiple_of(jd * td, td), td)

        def body(r, carry):
            tok = i * GPU_ROWS + r
            acc = jnp.zeros((1, td), _F32)
            for j in range(k):
                a = tok * k + j
                acc += plgpu.load(y_ref.at[pl.ds(src_ref[a], 1), cols]).astype(_F32) * w_ref[a]
            plgpu.store(out_ref.at[pl.ds(tok, 1), cols], acc.astype(out_ref.dtype))
            return carry

        jax.lax.fori_loop(0, GPU_ROWS, body, 0)

    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((tp, dp), y.dtype), grid=(tp // GPU_ROWS, dp // td),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=config.interpret, name=name)(src_p, w_p, yp)
    return out[:t, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute(x, token_of_row, rows_of_token, config):
    return gather_rows(x, token_of_row, config=config)


def _permute_fwd(x, token_of_row, rows_of_token, config):
    return _permute(x, token_of_row, rows_of_token, config), (token_of_row, rows_of_token)


def _permute_bwd(config, res, d_rows):
    token_of_row, rows_of_token = res
    ones = jnp.ones(rows_of_token.shape, _F32)
    return combine_rows(d_rows, rows_of_token, ones, config=config), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _combine(y, weights, rows_of_token, token_of_row, config):
    return combine_rows(y, rows_of_token, weights, config=config)


def _combine_fwd(y, weights, rows_of_token, token_of_row, config):
    out = combine_rows(y, rows_of_token, weights, config=config)
    return out, (y, weights, rows_of_token, token_of_row)


def _combine_bwd(config, res, d_out):
    y, weights, rows_of_token, token_of_row = res
    t, k = rows_of_token.shape
    m = y.shape[0]
    # Row i is choice j(i) of token t(i): d y[i] = weights[t(i), j(i)] * d out[t(i)].
    choice_of_row = jnp.full((m,), 0, jnp.int32).at[rows_of_token.reshape(-1)].set(
        jnp.tile(jnp.arange(k, dtype=jnp.int32), t), mode="drop")
    row_weight = weights.reshape(-1)[jnp.minimum(token_of_row, t - 1) * k + choice_of_row]
    d_y = gather_rows(d_out, token_of_row, row_weight, config=config)
    y_of_choice = gather_rows(y, rows_of_token.reshape(-1), config=config).reshape(t, k, -1)
    d_w = jnp.einsum("tkd,td->tk", y_of_choice.astype(_F32), d_out.astype(_F32))
    return d_y, d_w.astype(weights.dtype), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def inverse_maps(token_of_row: jax.Array, num_tokens: int, k: int, choice_of_row: jax.Array) -> jax.Array:
    """rows_of_token [T, k] from the token (T if dropped) and choice of every row: M where a
    token's choice has no row (dropped)."""
    m = token_of_row.shape[0]
    flat = jnp.where(token_of_row < num_tokens, token_of_row * k + choice_of_row, num_tokens * k)
    return jnp.full((num_tokens * k,), m, jnp.int32).at[flat].set(jnp.arange(m, dtype=jnp.int32),
                                                                  mode="drop").reshape(num_tokens, k)


def permute(x: jax.Array, token_of_row: jax.Array, rows_of_token: jax.Array, *, use_kernels: bool = True,
            config: KernelConfig | None = None) -> jax.Array:
    """rows[i] = x[token_of_row[i]] (zero where token_of_row[i] >= T), differentiable in x."""
    if not use_kernels:
        return jnp.take(x, token_of_row, axis=0, mode="fill", fill_value=0)
    return _permute(x, token_of_row.astype(jnp.int32), rows_of_token.astype(jnp.int32), config or kernel_config())


def combine(y: jax.Array, weights: jax.Array, rows_of_token: jax.Array, token_of_row: jax.Array, *,
            use_kernels: bool = True, config: KernelConfig | None = None) -> jax.Array:
    """out[t] = sum_j weights[t, j] * y[rows_of_token[t, j]], differentiable in y and weights."""
    if not use_kernels:
        taken = jnp.take(y, rows_of_token, axis=0, mode="fill", fill_value=0)
        return jnp.einsum("tkd,tk->td", taken.astype(_F32), weights.astype(_F32)).astype(y.dtype)
    return _combine(y, weights, rows_of_token.astype(jnp.int32), token_of_row.astype(jnp.int32),
                    config or kernel_config())
