"""Moving tokens to their experts and back: the three ways, one per grouped-matmul layout.

- sort (ragged backends): all kept assignments of all groups sorted by expert -> rows [M, d]
  and group sizes [E]; back by the inverse permutation. With `pallas` and token-major routing
  (top-k, balanced: k choices per token) the gather and the weighted combine are the Pallas
  kernels of `cpm2_jax.kernels.permutation` (`permute_kernels`, on by default; each the
  other's gradient, no scatter); experts-choose routing has no fixed k and keeps jnp.take;
- slots (`padded`): assignment a goes to slot expert*C + position of its group's buffer
  [G, E, C, d] by a gather (empty slots read a zero row);
- one-hot (`einsum`, GShard / flaxformer): dispatch tensor D [G, S, E*C] in {0, 1},
  rows = D^T x, out = (D * weight)^T y: simple and shardable, O(S E C d) work.
Combining: y_token = sum_a weight_a y_a over the token's assignments.

The slot gathers of `padded` are permutations (each token fills at most k slots, each slot
holds at most one assignment), so their transposes are gathers too (`take_rows`): autodiff
would scatter-add into a zeroed buffer instead, ~2x the memory traffic on CPU.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from cpm2_jax.moe.grouped_matmul import RAGGED_BACKENDS
from cpm2_jax.moe.routing import Routing


@flax.struct.dataclass
class ExpertRows:
    """Token rows in expert layout: ragged [M, d] (+ group_sizes, row_expert, inverse order)
    or batched [G, E, C, d]."""

    rows: jax.Array
    group_sizes: Optional[jax.Array] = None  # ragged: [E]
    row_expert: Optional[jax.Array] = None  # ragged: [M] expert of each row (E for dropped rows)
    inverse: Optional[jax.Array] = None  # ragged: [G*A] row of each assignment; padded: [G, E*C] assignment of each slot
    # pallas permutation kernels: token (of G*S; G*S if dropped) of each row [M], and the rows
    # of each token's k choices [G*S, k] (M if dropped); from_experts combines with them.
    token_of_row: Optional[jax.Array] = None
    rows_of_token: Optional[jax.Array] = None


@jax.custom_vjp
def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """y[g, m] = x[g, index[g, m]] (zero where index[g, m] >= N) for x [G, N, d], index [G, M].

    `inverse` [G, J, N] lists the rows of y that read each row n of x (M where fewer than J
    do): the transpose dx[g, n] = sum_j dy[g, inverse[g, j, n]] is then J gathers, no scatter.
    """
    return _gather(x, index)


def _gather(x, index):
    return jnp.take_along_axis(x, index[..., None], axis=1, mode="fill", fill_value=0)


def _take_rows_fwd(x, index, inverse):
    return _gather(x, index), (index, inverse)


def _take_rows_bwd(res, dy):
    index, inverse = res
    dx = _gather(dy, inverse[:, 0])
    for j in range(1, inverse.shape[1]):
        dx = dx + _gather(dy, inverse[:, j])
    return dx, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _slots(routing: Routing) -> jax.Array:
    """Slot of every assignment in the [E*C] buffer of its group; E*C (out of range) if dropped."""
    ec = routing.num_experts * routing.capacity
    return jnp.where(routing.kept, routing.expert * routing.capacity + routing.position, ec)


def _weighted_sum_over_tokens(y_assign: jax.Array, routing: Routing) -> jax.Array:
    """[G*A, d] assignment outputs -> [G, S, d]: y_s = sum_a weight_a y_a.

    The weighting runs on the 2-D [G*A, d] view: its gradient w.r.t. the weights is then a
    row reduction that XLA:CPU vectorises (on a [G, A, d] view it was ~40x slower).
    """
    g, a = routing.token.shape
    d, s = y_assign.shape[-1], routing.group_size
    y_assign = (y_assign * routing.weight.reshape(g * a, 1).astype(y_assign.dtype)).reshape(g, a, d)
    if routing.token_major:
        return jnp.sum(y_assign.reshape(g, a // s, s, d), axis=1)
    return jax.vmap(lambda y, t: jax.ops.segment_sum(y, t, num_segments=s))(y_assign, routing.token)


def _one_hot_dispatch(routing: Routing, dtype) -> tuple[jax.Array, jax.Array]:
    """(D, D * weight), both [G, S, E*C]."""
    g, a = routing.token.shape
    s, ec = routing.group_size, routing.num_experts * routing.capacity
    if routing.token_major:
        k = a // s
        hot = jax.nn.one_hot(_slots(routing).reshape(g, k, s), ec, dtype=dtype)  # dropped -> all-zero row
        weight = routing.weight.reshape(g, k, s, 1).astype(dtype)
        return jnp.sum(hot, axis=1), jnp.sum(hot * weight, axis=1)
    # Experts-choose: assignment a is slot a; its token is routing.token[a].
    hot = jnp.swapaxes(jax.nn.one_hot(routing.token, s, dtype=dtype) * routing.kept[..., None], 1, 2)
    return hot, hot * routing.weight[:, None, :].astype(dtype)


def _token_major(values: jax.Array, g: int, s: int) -> jax.Array:
    """[G*A] per assignment (A = k*S, choice-major) -> [G*S, k] per token."""
    return jnp.swapaxes(values.reshape(g, -1, s), 1, 2).reshape(g * s, -1)


def to_experts(x: jax.Array, routing: Routing, backend: str, permute_kernels: bool = True) -> ExpertRows:
    """x [G, S, d] -> the rows every expert processes, in `backend`'s layout; `permute_kernels`:
    with `pallas` and token-major routing, gather (and later combine) with the Pallas kernels."""
    g, s, d = x.shape
    e, c = routing.num_experts, routing.capacity
    if backend in RAGGED_BACKENDS:
        key = jnp.where(routing.kept, routing.expert, e).reshape(-1)
        order = jnp.argsort(key, stable=True)
        flat_token = (routing.token + s * jnp.arange(g, dtype=jnp.int32)[:, None]).reshape(-1)
        group_sizes = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        if backend == "pallas" and permute_kernels and routing.token_major:
            from cpm2_jax.kernels.permutation import permute  # Pallas: only when this backend runs

            kept = routing.kept.reshape(-1)
            token_of_row = jnp.where(kept, flat_token, g * s)[order].astype(jnp.int32)
            rows_of_token = _token_major(jnp.where(kept, inverse, order.shape[0]), g, s).astype(jnp.int32)
            rows = permute(x.reshape(g * s, d), token_of_row, rows_of_token)
            return ExpertRows(rows=rows, group_sizes=group_sizes, row_expert=key[order], inverse=inverse,
                              token_of_row=token_of_row, rows_of_token=rows_of_token)
        rows = jnp.take(x.reshape(g * s, d), flat_token[order], axis=0)
        return ExpertRows(rows=rows, group_sizes=group_sizes, row_expert=key[order], inverse=inverse)
    if backend == "padded":
        slots = _slots(routing)
        a = slots.shape[1]
        # Assignment in every slot (A where empty); empty slots read the zero row past x's end.
        slot_assign = jax.vmap(lambda sl: jnp.full((e * c,), a, jnp.int32).at[sl].set(
            jnp.arange(a, dtype=jnp.int32), mode="drop"))(slots)
        if routing.token_major:  # assignment a is choice a // S of token a % S
            slot_token = jnp.where(slot_assign < a, slot_assign % s, s)
            rows = take_rows(x, slot_token, slots.reshape(g, a // s, s))
        else:
            slot_token = jnp.where(slot_assign < a, jnp.take_along_axis(
                routing.token, jnp.minimum(slot_assign, a - 1), axis=1), s)
            rows = jnp.take_along_axis(x, slot_token[..., None], axis=1, mode="fill", fill_value=0)
        return ExpertRows(rows=rows.reshape(g, e, c, d), inverse=slot_assign)
    if backend == "einsum":
        dispatch, _ = _one_hot_dispatch(routing, x.dtype)
        return ExpertRows(rows=jnp.einsum("gsf,gsd->gfd", dispatch, x).reshape(g, e, c, d))
    raise ValueError(f"no dispatch for backend {backend!r}")


def from_experts(y: ExpertRows, routing: Routing, backend: str) -> jax.Array:
    """Expert outputs (same layout as `to_experts`) -> [G, S, d]: y_s = sum_a weight_a y_a."""
    g, a = routing.token.shape
    if y.rows_of_token is not None:  # pallas permutation kernels (to_experts)
        from cpm2_jax.kernels.permutation import combine

        s = routing.group_size
        out = combine(y.rows, _token_major(routing.weight.reshape(-1), g, s), y.rows_of_token, y.token_of_row)
        return out.reshape(g, s, -1)
    if backend in RAGGED_BACKENDS:
        return _weighted_sum_over_tokens(jnp.take(y.rows, y.inverse, axis=0), routing)
    e, c, d = y.rows.shape[-3:]
    if backend == "padded":
        flat = y.rows.reshape(g, e * c, d)
        # Per group (shardable); dropped assignments hold the out-of-range slot E*C and read zeros.
        y_assign = take_rows(flat, _slots(routing), y.inverse[:, None, :])
        return _weighted_sum_over_tokens(y_assign.reshape(g * a, d), routing)
    flat = y.rows.reshape(g, e * c, d)
    if backend == "einsum":
        _, combine = _one_hot_dispatch(routing, flat.dtype)
        return jnp.einsum("gsf,gfd->gsd", combine, flat)
    raise ValueError(f"no combine for backend {backend!r}")
