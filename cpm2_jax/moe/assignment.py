"""Balanced assignment (BASE layers, CPM2_FACTS "Mixture of experts"), solved on-device.

Given affinities a[s, e] of S tokens for E experts, find the assignment with every expert
taking exactly C = S / E tokens that maximises the total affinity:

    max_x  sum_{s,e} a[s,e] x[s,e]   s.t.  sum_e x[s,e] = 1,  sum_s x[s,e] = C,  x in {0, 1}.

Solved in three fixed-shape steps (jit- and vmap-friendly, no host round trip):
1. Sinkhorn iterations on the entropic relaxation give near-equilibrium expert prices
   g[e] (the duals of the column constraints):  f_s = tau lse_e((a_se - g_e)/tau),
   g_e = tau lse_s((a_se - f_s)/tau) - tau log C.
2. A Jacobi auction (Bertsekas) from those prices: every unassigned token bids for its best
   expert e1 at p[e1] + (v1 - v2) + eps (v = a[s,:] - p); each expert keeps its C highest
   bids and its price becomes the lowest bid it holds. Run to completion, the total is within
   S * eps of the optimum (eps-complementary slackness); optional eps-scaling phases.
3. A round budget bounds the cost; tokens still unassigned then fill the free slots, so the
   loads are always exactly C.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from cpm2_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AuctionSettings:
    """eps schedule relative to the affinities' spread, and the round budget of each phase."""

    sinkhorn_iterations: int = 20
    sinkhorn_temperature: float = 1e-2  # times (max - min) of the affinities
    eps_schedule: Sequence[float] = (1e-2,)  # times (max - min) of the affinities
    max_rounds_per_phase: int = 32


# The packed sort key (below) gives the bid at least this many bits, else the exact two-key sort.
_MIN_BID_BITS = 10


def _bits(n: int) -> int:
    """Bits to hold the values 0 .. n-1."""
    return max(1, (n - 1).bit_length())


def _rank_order(key_owner, bid, num_experts):
    """(sorted owner, token order): tokens grouped by owner (E = none last), best bid first.

    XLA:CPU sorts one integer operand ~8x faster than several operands with a float key, so
    when it fits, the sort key is one uint32: owner | quantised bid (descending) | token. The
    bid keeps >= _MIN_BID_BITS bits over this round's bid range, so two bids closer than
    range / 2^bits may be ranked by token instead: a perturbation of the bids far below the
    auction's eps (which is the guarantee's only tolerance), with deterministic ties.
    """
    s = key_owner.shape[0]
    owner_bits, token_bits = _bits(num_experts + 1), _bits(s)
    bid_bits = 32 - owner_bits - token_bits
    if bid_bits < _MIN_BID_BITS:  # exact: sort by (owner, -bid) carrying the token index
        sorted_owner, _, order = jax.lax.sort((key_owner, -bid, jnp.arange(s, dtype=jnp.int32)), num_keys=2)
        return sorted_owner, order
    bid_bits = min(bid_bits, 20)
    live = key_owner < num_experts
    top = jnp.max(jnp.where(live, bid, -jnp.inf))
    span = jnp.maximum(top - jnp.min(jnp.where(live, bid, jnp.inf)), 1e-30)
    levels = (1 << bid_bits) - 1
    q = jnp.where(live, jnp.clip(jnp.floor((top - bid) / span * levels), 0, levels), 0).astype(jnp.uint32)
    key = ((key_owner.astype(jnp.uint32) << (bid_bits + token_bits)) | (q << token_bits)
           | jnp.arange(s, dtype=jnp.uint32))
    key = jax.lax.sort(key)
    order = (key & ((1 << token_bits) - 1)).astype(jnp.int32)
    return (key >> (bid_bits + token_bits)).astype(jnp.int32), order


def _price_and_holdings(owner, bid, floor, num_experts, capacity):
    """Keeps each expert's `capacity` highest bids; returns (owner, price): price[e] is the
    lowest bid expert e holds when it is full, else its floor (the price of a free slot)."""
    s = owner.shape[0]
    key_owner = jnp.where(owner < 0, num_experts, owner)
    # Each expert's candidates become one contiguous run, best first.
    sorted_owner, order = _rank_order(key_owner, bid, num_experts)
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[key_owner].add(1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(s, dtype=jnp.int32) - starts[sorted_owner]
    keep_sorted = (rank < capacity) & (sorted_owner < num_experts)
    keep = jnp.zeros((s,), jnp.bool_).at[order].set(keep_sorted)
    owner = jnp.where(keep, owner, -1)
    held = jnp.minimum(counts[:num_experts], capacity)
    last = jnp.clip(starts[:num_experts] + held - 1, 0, s - 1)
    lowest_held = bid[order[last]]
    price = jnp.where(held >= capacity, lowest_held, floor)
    return owner, price


# Up to this many experts, the best and second-best values come from an unrolled elementwise
# tournament over expert rows (one fused pass, ~5x faster on CPU than argmax + masked max).
_TOURNAMENT_MAX_EXPERTS = 64


def best_two(values_t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(argmax, max, second max) over experts of values_t [E, S]; ties go to the lower expert,
    and a tie for the max makes the second max equal to it (as argmax + masked max would)."""
    e = values_t.shape[0]
    if e > _TOURNAMENT_MAX_EXPERTS:
        best = jnp.argmax(values_t, axis=0)
        v1 = jnp.max(values_t, axis=0)
        v2 = jnp.max(jnp.where(jnp.arange(e)[:, None] == best[None, :], -jnp.inf, values_t), axis=0)
        return best.astype(jnp.int32), v1, v2
    v1, best, v2 = values_t[0], jnp.zeros(values_t.shape[1:], jnp.int32), jnp.full(values_t.shape[1:], -jnp.inf)
    for i in range(1, e):
        v = values_t[i]
        better = v > v1
        v2 = jnp.where(better, v1, jnp.maximum(v2, v))
        best = jnp.where(better, i, best)
        v1 = jnp.where(better, v, v1)
    return best, v1, v2


def _auction_phase(scores, price, eps, capacity, max_rounds):
    """One eps phase from `price` (free-slot floors): rounds of bidding until every token
    holds a slot or the round budget is spent. Returns (owner [S], price [E], rounds)."""
    s, e = scores.shape
    floor = price
    scores_t = scores.T  # [E, S]: the per-token maxima become elementwise over expert rows

    def bidding(state):
        owner, bid, price, rounds = state
        best, v1, v2 = best_two(scores_t - price[:, None])
        v2 = jnp.where(jnp.isfinite(v2), v2, v1)  # a single expert: no second choice
        new_bid = price[best] + (v1 - v2) + eps
        free = owner < 0
        owner = jnp.where(free, best.astype(jnp.int32), owner)
        bid = jnp.where(free, new_bid, bid)
        owner, price = _price_and_holdings(owner, bid, floor, e, capacity)
        return owner, bid, price, rounds + 1

    def unfinished(state):
        owner, _, _, rounds = state
        return jnp.any(owner < 0) & (rounds < max_rounds)

    init = (jnp.full((s,), -1, jnp.int32), jnp.zeros((s,), scores.dtype), price, jnp.int32(0))
    owner, _, price, rounds = jax.lax.while_loop(unfinished, bidding, init)
    return owner, price, rounds


def _complete(owner, num_experts, capacity):
    """Gives every still-unassigned token a free slot (in token order), so loads are exact
    even when the round budget ran out."""
    s = owner.shape[0]
    free = owner < 0
    load = jnp.zeros((num_experts,), jnp.int32).at[jnp.where(free, num_experts, owner)].add(1, mode="drop")
    room = capacity - load
    # The k-th free slot (over experts in order) belongs to the expert whose cumulative room passes k.
    slot_expert = jnp.searchsorted(jnp.cumsum(room), jnp.arange(s, dtype=jnp.int32), side="right")
    k = jnp.cumsum(free.astype(jnp.int32)) - 1
    return jnp.where(free, slot_expert[jnp.clip(k, 0, s - 1)].astype(jnp.int32), owner)


def sinkhorn_prices(scores: jax.Array, capacity: int, temperature, iterations: int) -> jax.Array:
    """Expert prices g [E] of the entropic balanced assignment (log-domain Sinkhorn, step 1)."""
    tau = temperature

    def step(_, g):
        f = tau * jax.nn.logsumexp((scores - g[None, :]) / tau, axis=1)
        return tau * jax.nn.logsumexp((scores - f[:, None]) / tau, axis=0) - tau * jnp.log(capacity)

    g = jax.lax.fori_loop(0, iterations, step, jnp.zeros((scores.shape[1],), scores.dtype))
    return g - jnp.min(g)


def balanced_assignment(scores: jax.Array, settings: AuctionSettings = AuctionSettings()):
    """expert index [S] with every expert taking exactly S / E tokens, maximising total affinity.

    scores: [S, E] (float32). Returns (expert_index [S] int32, rounds used in total).
    """
    s, e = scores.shape
    if s % e:
        raise ConfigError(f"balanced routing needs the tokens per routing group ({s}) to be a multiple of "
                          f"the number of experts ({e})")
    capacity = s // e
    scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
    spread = jnp.maximum(jnp.max(scores) - jnp.min(scores), 1e-6)
    if settings.sinkhorn_iterations:
        price = sinkhorn_prices(scores, capacity, settings.sinkhorn_temperature * spread,
                                settings.sinkhorn_iterations)
    else:
        price = jnp.zeros((e,), jnp.float32)
    owner = jnp.full((s,), -1, jnp.int32)
    total_rounds = jnp.int32(0)
    for scale in settings.eps_schedule:
        owner, price, rounds = _auction_phase(scores, price, scale * spread, capacity,
                                              settings.max_rounds_per_phase)
        total_rounds = total_rounds + rounds
    return _complete(owner, e, capacity), total_rounds
