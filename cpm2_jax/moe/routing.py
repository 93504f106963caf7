"""Routers: which expert(s) each token goes to, with what weight (CPM2_FACTS "Mixture of experts").

Every router maps the normalised tokens n = RMSNorm(x) of one routing group [G, S, d] to a
`Routing`: a flat list of A (token, expert, slot position, weight, kept) assignments per
group, plus its aux losses and diagnostics. Routing math is float32 whatever the model dtype.

- `balanced` (BASE layers / CPM-2): affinity a = n . centroid_e, centroids orthogonal with a
  small gain and never trained; every expert takes exactly S / E tokens maximising sum a
  (`assignment.balanced_assignment`); weight 1, no aux loss, nothing dropped. At inference
  (optionally) plain argmax.
- `top_k` tokens-choose (Switch k=1, GShard k=2): p = softmax(n W); the k best experts per
  token; capacity C = ceil(cf k S / E); first choices have priority, then token order;
  load-balancing loss E sum_e f_e P_e and router z-loss mean(lse(logits)^2).
- `experts_choose` (Zhou et al. 2022): every expert takes its C = ceil(cf S / E) tokens of
  highest p[s, e]; weight p[s, e]; a token may get 0..E experts.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError, closest
from cpm2_jax.moe.assignment import AuctionSettings, balanced_assignment

ROUTERS = ("balanced", "top_k", "experts_choose")
CENTROID_GAIN = 0.1  # BASE layers: orthogonal centroids with a small gain


@flax.struct.dataclass
class Routing:
    """A routers' decision for G groups of S tokens: A assignments per group.

    `token_major` (static): assignment a is choice a // S of token a % S (top-k and balanced),
    so combining is a reshape and a sum; otherwise (experts-choose) a scatter-add.
    `capacity` (static): slots per expert per group, so that the padded layout never drops
    anything the router kept.
    """

    token: jax.Array  # [G, A] int32, token within its group
    expert: jax.Array  # [G, A] int32
    position: jax.Array  # [G, A] int32, slot in the expert's buffer (priority order)
    weight: jax.Array  # [G, A] float32 combine weight, 0 where dropped
    kept: jax.Array  # [G, A] bool
    aux_loss: jax.Array  # scalar load-balancing loss (unweighted; 0 when the router has none)
    z_loss: jax.Array  # scalar router z-loss (unweighted; 0 when the router has none)
    entropy: jax.Array  # scalar mean entropy of the router's distribution over experts
    num_experts: int = flax.struct.field(pytree_node=False)
    capacity: int = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)  # S, tokens per routing group
    token_major: bool = flax.struct.field(pytree_node=False, default=True)
    uniform: bool = flax.struct.field(pytree_node=False, default=False)  # every expert exactly `capacity`

    def expert_load(self) -> jax.Array:
        """Fraction of kept assignments per expert [E] (the expert load histogram)."""
        onehot = jax.nn.one_hot(self.expert, self.num_experts, dtype=jnp.float32) * self.kept[..., None]
        return jnp.sum(onehot, axis=(0, 1)) / jnp.maximum(jnp.sum(self.kept), 1)

    def fraction_dropped(self) -> jax.Array:
        return 1.0 - jnp.mean(self.kept.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Pure routing math
# ---------------------------------------------------------------------------------------------

def capacity_for(tokens_per_group: int, num_experts: int, capacity_factor: float, k: int = 1,
                 expert_capacity: int = 0) -> int:
    """C = ceil(cf * k * S / E) (or a fixed `expert_capacity` > 0, Switch's), at least 1 and at
    most S (an expert takes a token once)."""
    if expert_capacity > 0:
        return int(min(tokens_per_group, expert_capacity))
    if capacity_factor <= 0:
        raise ConfigError(f"moe_capacity_factor must be > 0, got {capacity_factor}")
    return int(min(tokens_per_group, max(1, math.ceil(capacity_factor * k * tokens_per_group / num_experts))))


def positions_in_expert(expert: jax.Array, num_experts: int) -> jax.Array:
    """Slot of every assignment in its expert's queue, in assignment order: [G, A] -> [G, A]."""
    onehot = jax.nn.one_hot(expert, num_experts, dtype=jnp.int32)
    return jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
    """Switch / GShard: E * sum_e f_e * P_e per group, averaged over groups.

    probs [G, S, E]; expert_index [G, S, K]; f_e = fraction of tokens with e among their K
    choices (before capacity), P_e = mean router probability of e.
    """
    e = probs.shape[-1]
    chosen = jnp.max(jax.nn.one_hot(expert_index, e, dtype=jnp.float32), axis=-2)  # [G, S, E]
    f = jnp.mean(chosen, axis=1)
    p = jnp.mean(probs.astype(jnp.float32), axis=1)
    return jnp.mean(jnp.sum(f * p, axis=-1)) * e


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def mean_entropy(logits: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def _zero() -> jax.Array:
    return jnp.zeros((), jnp.float32)


def route_top_k(logits: jax.Array, k: int, capacity_factor: float, expert_capacity: int = 0) -> Routing:
    """Tokens choose their k best experts, dropped beyond capacity (first choices first, then
    token order: transformers' Switch drops the same tokens)."""
    g, s, e = logits.shape
    if not 1 <= k <= e:
        raise ConfigError(f"moe_top_k must be between 1 and num_experts ({e}), got {k}")
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    gates, index = jax.lax.top_k(probs, k)  # [G, S, K]
    if k > 1:  # GShard: the k gates renormalised to sum to 1
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    capacity = capacity_for(s, e, capacity_factor, k, expert_capacity)
    # Choice-major order (all first choices, then all second ones...): priority for first choices.
    expert = jnp.swapaxes(index, 1, 2).reshape(g, k * s).astype(jnp.int32)
    weight = jnp.swapaxes(gates, 1, 2).reshape(g, k * s)
    position = positions_in_expert(expert, e)
    kept = position < capacity
    token = jnp.broadcast_to(jnp.tile(jnp.arange(s, dtype=jnp.int32), k), (g, k * s))
    return Routing(token=token, expert=expert, position=jnp.where(kept, position, 0),
                   weight=jnp.where(kept, weight, 0.0), kept=kept,
                   aux_loss=load_balancing_loss(probs, index), z_loss=router_z_loss(logits),
                   entropy=mean_entropy(logits), num_experts=e, capacity=capacity, token_major=True, group_size=s)


def route_experts_choose(logits: jax.Array, capacity_factor: float, expert_capacity: int = 0) -> Routing:
    """Every expert takes its C tokens of highest probability (softmax over experts)."""
    g, s, e = logits.shape
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    capacity = capacity_for(s, e, capacity_factor, expert_capacity=expert_capacity)
    gates, token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [G, E, C]
    expert = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[:, None], (g, e, capacity)).reshape(g, e * capacity)
    position = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (g, e, capacity)).reshape(g, e * capacity)
    return Routing(token=token.reshape(g, e * capacity).astype(jnp.int32), expert=expert, position=position,
                   weight=gates.reshape(g, e * capacity), kept=jnp.ones((g, e * capacity), jnp.bool_),
                   aux_loss=_zero(), z_loss=router_z_loss(logits), entropy=mean_entropy(logits),
                   num_experts=e, capacity=capacity, token_major=False, uniform=True, group_size=s)


def route_balanced(affinity: jax.Array, *, balanced: bool = True,
                   settings: AuctionSettings = AuctionSettings()) -> Routing:
    """BASE layers: exactly S / E tokens per expert maximising total affinity, weight 1;
    `balanced=False` is the inference fallback: argmax, dropless (capacity S)."""
    g, s, e = affinity.shape
    affinity = jax.lax.stop_gradient(affinity.astype(jnp.float32))
    if balanced:
        expert, _ = jax.vmap(lambda a: balanced_assignment(a, settings))(affinity)
        capacity = s // e
    else:
        expert = jnp.argmax(affinity, axis=-1).astype(jnp.int32)
        capacity = s
    position = positions_in_expert(expert, e)
    return Routing(token=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s)), expert=expert,
                   position=position, weight=jnp.ones((g, s), jnp.float32), kept=jnp.ones((g, s), jnp.bool_),
                   aux_loss=_zero(), z_loss=_zero(), entropy=mean_entropy(affinity), num_experts=e,
                   capacity=capacity, token_major=True, uniform=balanced, group_size=s)


# ---------------------------------------------------------------------------------------------
# Router modules (parameters)
# ---------------------------------------------------------------------------------------------

class Router(nn.Module):
    """Router parameters + the routing rule named by `config.moe_router`.

    `balanced` holds `centroids` [embed, expert] (orthogonal, gain 0.1, stop_gradient: weight
    decay only rescales them, which changes no assignment); the learned routers hold a
    `kernel` [embed, expert] (and a `bias` [expert] with moe_router_bias).
    """

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, normed: jax.Array, row_scale: Optional[jax.Array] = None) -> Routing:
        """Routes `normed` [G, S, d], or, with `row_scale` [G, S, 1], the tokens normed * row_scale:
        the scale is then applied to the [G, S, E] scores ((x r) W = r (x W)), so the MoE layer
        never materialises the normalised [G, S, d] tokens for the router."""
        c = self.config
        e = c.num_experts
        if c.moe_router not in ROUTERS:
            raise ConfigError(f"unknown moe_router {c.moe_router!r}{closest(c.moe_router, ROUTERS)}; "
                              f"known: {', '.join(ROUTERS)}")
        d = normed.shape[-1]
        x = normed.astype(jnp.float32)

        def scaled(scores):
            return scores if row_scale is None else scores * row_scale.astype(jnp.float32)

        if c.moe_router == "balanced":
            centroids = self.param("centroids", nn.with_logical_partitioning(
                nn.initializers.orthogonal(scale=CENTROID_GAIN), ("embed", "unmodeled")), (d, e), jnp.float32)
            affinity = scaled(x @ jax.lax.stop_gradient(centroids.astype(jnp.float32)))
            use_balanced = not (self.deterministic and c.moe_eval_argmax)
            return route_balanced(affinity, balanced=use_balanced)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(c.init_std), ("embed", "unmodeled")), (d, e), jnp.float32)
        if c.moe_jitter > 0 and not self.deterministic:  # Switch: multiplicative input jitter
            noise = jax.random.uniform(self.make_rng("dropout"), x.shape, jnp.float32,
                                       1.0 - c.moe_jitter, 1.0 + c.moe_jitter)
            x = x * noise
        logits = scaled(x @ kernel.astype(jnp.float32))
        if c.moe_router_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("unmodeled",)),
                              (e,), jnp.float32)
            logits = logits + bias.astype(jnp.float32)
        if c.moe_router == "top_k":
            return route_top_k(logits, c.moe_top_k, c.moe_capacity_factor, c.moe_expert_capacity)
        return route_experts_choose(logits, c.moe_capacity_factor, c.moe_expert_capacity)
