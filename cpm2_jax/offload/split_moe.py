"""The MoE block split in two for offloading: route (on the device, no expert weights), then
each expert's computation with its weights passed in as arguments (InfMoE, CPM2_FACTS).

    route:    n = x / rms(x); routing = Router(n); rows = n sorted by expert (ragged layout),
              counts n_e per expert (read by the host: the schedule needs them)
    expert:   out[rows of e] += Expert_e(rows of e; W_e)    (one call per expert with tokens,
              W_e a device buffer the runner brought in; rows padded to a power of two)
    combine:  y_s = sum_a w_a out_a                          (moe.dispatch.from_experts)

Same arithmetic as `moe.layer.MoeBlock` at inference (its `Router`, `to_experts`,
`expert_ffn`, `from_experts`), so the split path equals the block (tests/offload).
`MoeBlock` and the training path are untouched: the split reads the block's parameters
(`moe/router`, `moe/experts`) as they are.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax.config import ModelConfig, dtype_of
from cpm2_jax.moe.dispatch import ExpertRows, from_experts, to_experts
from cpm2_jax.moe.layer import expert_ffn, routing_groups
from cpm2_jax.moe.routing import Router, Routing

_RAGGED = "ragged_dot"  # the sorted layout: expert e's rows are one contiguous block


@flax.struct.dataclass
class RoutedTokens:
    """One MoE layer's tokens after routing: rows sorted by expert, zero-padded at the end so
    that any expert's block can be read as a power-of-two tile; `counts` [E] rows per expert."""

    rows: jax.Array  # [M + pad, d] float32
    counts: jax.Array  # [E] int32
    inverse: jax.Array  # [G*A] row of each assignment
    routing: Routing
    shape: tuple = flax.struct.field(pytree_node=False)  # the input's [B, L, d]

    @property
    def num_rows(self) -> int:
        return int(self.inverse.shape[0])


def bucket(n: int) -> int:
    """Rows of the tile an expert with n tokens runs on: the next power of two (so a few
    compiled shapes serve every count)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("config",))
def route(config: ModelConfig, router_params: dict, x: jax.Array) -> RoutedTokens:
    """x [B, L, d] (the FFN input; already normalised when moe_expert_norm=False) -> RoutedTokens,
    as `MoeBlock` at inference: groups by `routing_groups`, affinity from the row-scaled scores."""
    c = config
    b, length, d = x.shape
    g, s = routing_groups(b, length, c.moe_group_size)
    x32 = x.reshape(g, s, d).astype(jnp.float32)
    normed, inv_rms = x32, None
    if c.moe_expert_norm:
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + c.layer_norm_epsilon)
        normed = x32 * inv_rms
    routing = Router(config=c, deterministic=True).apply({"params": router_params}, x32, inv_rms)
    rows = to_experts(normed, routing, _RAGGED)
    m = rows.rows.shape[0]
    padded = jnp.concatenate([rows.rows, jnp.zeros((bucket(m), d), rows.rows.dtype)], axis=0)
    return RoutedTokens(rows=padded, counts=rows.group_sizes, inverse=rows.inverse, routing=routing,
                        shape=(b, length, d))


def expert_apply(rows: jax.Array, weights: dict, *, activation: str, dtype) -> jax.Array:
    """One expert on its rows [n, d]: `moe.layer.expert_ffn` with E = 1 (same arithmetic as
    every expert of the block: RMSNorm scale, then the FFN), weights {name: [d, f] | [f, d] | [d]}."""
    one = ExpertRows(rows=rows[None, None])  # batched layout [G=1, E=1, n, d]
    out = expert_ffn(one, {k: v[None] for k, v in weights.items()}, activation=activation, backend="padded",
                     dtype=dtype)
    return out.rows[0, 0]


def add_expert_output(out: jax.Array, rows: jax.Array, offset, count, weights: dict, *, tile: int,
                      activation: str, dtype) -> jax.Array:
    """out[offset : offset + count] += Expert(rows[offset : offset + count]) on a `tile`-row
    window (rows past `count` belong to other experts or padding and add 0), so experts can run
    in any order into one output buffer."""
    d = rows.shape[-1]
    window = jax.lax.dynamic_slice(rows, (offset, 0), (tile, d))
    return add_rows(out, expert_apply(window, weights, activation=activation, dtype=dtype), offset, count)


def add_rows(out: jax.Array, y: jax.Array, offset, count) -> jax.Array:
    """out[offset : offset + count] += y[:count] (y [tile, d]: an expert's output on its window)."""
    tile, d = y.shape
    keep = (jnp.arange(tile) < count)[:, None]
    current = jax.lax.dynamic_slice(out, (offset, 0), (tile, d))
    return jax.lax.dynamic_update_slice(out, current + jnp.where(keep, y.astype(out.dtype), 0), (offset, 0))


@jax.jit
def empty_output(routed: RoutedTokens) -> jax.Array:
    """The zero output rows the experts add into (jitted: one dispatch, not op by op)."""
    return jnp.zeros(routed.rows.shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def combine(out: jax.Array, routed: RoutedTokens, dtype: str = "float32") -> jax.Array:
    """Expert outputs in row order -> y [B, L, d] (weighted sum over each token's experts)."""
    rows = out[:routed.num_rows]
    y = from_experts(ExpertRows(rows=rows, inverse=routed.inverse), routed.routing, _RAGGED)
    return y.reshape(routed.shape).astype(dtype_of(dtype))


def expert_weights(experts: dict, e: int) -> dict:
    """Expert e's slice of the block's stacked expert parameters {name: [E, ...]}."""
    return {k: v[e] for k, v in experts.items()}


def offsets(counts) -> np.ndarray:
    """Start row of every expert's block in the sorted layout."""
    counts = np.asarray(counts)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)


def resident_rows(config: ModelConfig, moe_params: dict, routed: RoutedTokens, out: jax.Array) -> jax.Array:
    """Every expert with tokens added into the output rows `out`, its weights sliced from the
    block's stacked parameters (the layer-stepped model's experts when nothing is offloaded)."""
    counts = np.asarray(routed.counts)
    for e, (start, n) in enumerate(zip(offsets(counts), counts)):
        if n:
            out = expert_step(out, routed.rows, start, n, expert_weights(moe_params["experts"], e),
                              tile=bucket(int(n)), activation=config.ffn_activation, dtype=config.dtype)
    return out


def moe_resident(config: ModelConfig, moe_params: dict, x: jax.Array) -> jax.Array:
    """The whole split path with every expert's weights at hand (the reference the runner is
    tested against)."""
    routed = route(config, moe_params["router"], x)
    return combine(resident_rows(config, moe_params, routed, empty_output(routed)), routed, config.dtype)


@functools.partial(jax.jit, static_argnames=("tile", "activation", "dtype"), donate_argnums=(0,))
def _expert_step(out, rows, offset, count, weights, *, tile, activation, dtype):
    return add_expert_output(out, rows, offset, count, weights, tile=tile, activation=activation,
                             dtype=dtype_of(dtype))


def expert_step(out, rows, offset, count, weights, *, tile: int, activation: str, dtype: str):
    """Jitted `add_expert_output` (the output buffer donated: updated in place)."""
    return _expert_step(out, rows, np.int32(offset), np.int32(count), weights, tile=tile,
                        activation=activation, dtype=dtype)
