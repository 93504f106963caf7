"""The MoE feed-forward block of CPM-2-MoE: y = sum_a w_a Expert_{e_a}(x), each expert the dense
pre-norm gated-GELU block with its own RMSNorm (CPM2_FACTS "Mixture of experts").

    (training, balanced router) groups refilled with tokens of all groups (moe.shuffle, BASE)
    n = x / rms(x)                       (token-wise part of every expert's RMSNorm)
    routing = Router(n)                  (moe.routing; float32)
    rows = dispatch(n)                   (moe.dispatch; layout of the backend)
    h = gelu((rows*s_e) W0_e) * ((rows*s_e) W1_e);  out_e = h Wo_e   (moe.grouped_matmul)
    y = combine(out)                     (weighted sum over each token's experts; unshuffled)

Switch layout (moe_expert_norm=False, ffn_activation="relu"): the caller applies one shared
pre-norm, n is its output, and each expert is relu(n Wi_e) Wo_e. The caller adds the residual: x + dropout(y). Parameters carry the `expert` logical axis, so
with an `expert` mesh axis the batched buffers [G, E, C, d] move from batch-sharded to
expert-sharded through sharding constraints (XLA's all-to-all), never hand-written exchange.
Aux losses (weighted) are sown into `aux_loss`; diagnostics into `intermediates`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import FFN_WEIGHTS, ModelConfig, dtype_of
from cpm2_jax.errors import ConfigError
from cpm2_jax.model.feedforward import gelu
from cpm2_jax.moe.dispatch import ExpertRows, from_experts, to_experts
from cpm2_jax.moe.expert_loop import looped_gated_gelu
from cpm2_jax.moe.grouped_matmul import (RAGGED_BACKENDS, check_backend, grouped_matmul, pallas_gated_ffn,
                                         select_backend, use_expert_loop)
from cpm2_jax.moe.routing import Router, Routing
from cpm2_jax.moe.shuffle import can_shuffle, make_shuffle, shuffle, unshuffle

# Logical axes of the batched expert buffers: before the exchange (split like the batch) and
# during expert computation (experts split over `expert`, groups over the remaining data axis).
_BATCH_SIDE = ("batch", None, None, "embed")
_EXPERT_SIDE = ("expert_replicas", "expert", None, "embed")


def routing_groups(batch: int, length: int, group_size: int) -> tuple[int, int]:
    """(G, S): `group_size` tokens per routing group when it divides batch*length, else one
    group per sequence (e.g. single-token decoding steps)."""
    tokens = batch * length
    if group_size > 0 and tokens % group_size == 0:
        return tokens // group_size, group_size
    return batch, length


def expert_ffn(rows: ExpertRows, weights: dict, *, activation: str = "gated_gelu", backend: str, dtype,
               dropout=None, expert_loop: bool = False, fused: bool = False) -> ExpertRows:
    """Every row through its expert: scale by s_e (the rest of the expert's RMSNorm, when the
    experts hold `norm_scale`), then the expert FFN (feedforward.feed_forward's arithmetic) with
    grouped matmuls. Batched buffers [G, E, C, d] run expert-major as [E, G*C, d] (free when
    G = 1) so every expert is one matrix of rows. `fused` (backend pallas, gated GELU, no
    dropout): the whole block as one fused kernel pair (kernels.ffn, ModelConfig.moe_fused_ffn)."""
    ragged = backend in RAGGED_BACKENDS
    sizes = rows.group_sizes if ragged else None
    h_in = rows.rows
    if not ragged:
        g, e, c, d = h_in.shape
        h_in = jnp.moveaxis(h_in, 1, 0).reshape(e, g * c, d) if g > 1 else h_in.reshape(e, c, d)
    if (expert_loop and not ragged and activation == "gated_gelu" and dropout is None
            and "norm_scale" in weights):
        # CPU, experts on one device: the whole block per expert (moe.expert_loop).
        out = looped_gated_gelu(h_in, weights["norm_scale"],
                                *(weights[n].astype(dtype) for n in ("wi_0", "wi_1", "wo")))
        return rows.replace(rows=_from_expert_major(out, g, e, c, d))
    if "norm_scale" in weights:
        norm_scale = weights["norm_scale"].astype(jnp.float32)
        if ragged:
            scale = jnp.take(norm_scale, jnp.minimum(rows.row_expert, norm_scale.shape[0] - 1), axis=0)
        else:
            scale = norm_scale[:, None, :]  # [E, 1, d] over [E, M, d]
        h_in = h_in.astype(jnp.float32) * scale
    h_in = h_in.astype(dtype)
    if fused and backend == "pallas" and activation == "gated_gelu" and dropout is None:
        out = pallas_gated_ffn(h_in, *(weights[n].astype(dtype) for n in ("wi_0", "wi_1", "wo")), sizes)
        return rows.replace(rows=out)

    def matmul(lhs, name):
        return grouped_matmul(lhs, weights[name], sizes, backend=backend, dtype=dtype, expert_loop=expert_loop)

    if activation == "gated_gelu":
        h = gelu(matmul(h_in, "wi_0")) * matmul(h_in, "wi_1")
    else:
        h = jax.nn.relu(matmul(h_in, "wi"))
    if dropout is not None:
        h = dropout(h)
    out = matmul(h, "wo")
    return rows.replace(rows=out if ragged else _from_expert_major(out, g, e, c, d))


def _from_expert_major(out, g, e, c, d):
    """[E, G*C, d] -> the dispatch layout [G, E, C, d]."""
    out = out.reshape(e, g, c, d)
    return jnp.moveaxis(out, 0, 1) if g > 1 else out.reshape(g, e, c, d)


class Experts(nn.Module):
    """The expert parameters: per-expert RMSNorm scale [E, d] (unless moe_expert_norm=False) and
    FFN weights [E, ...] (the dense block's `pre_mlp_layer_norm/scale` and `mlp/*`, one per expert)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, d_model: int) -> dict:
        c = self.config
        e, pdtype = c.num_experts, dtype_of(c.param_dtype)
        normal = nn.initializers.normal(c.init_std)

        def weight(name, shape, axes, init):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdtype)

        out = {}
        if c.moe_expert_norm:
            out["norm_scale"] = weight("norm_scale", (e, d_model), ("expert", "embed"), nn.initializers.ones)
        for name in FFN_WEIGHTS[c.ffn_activation][:-1]:
            out[name] = weight(name, (e, d_model, c.d_ff), ("expert", "embed", "mlp"), normal)
        out["wo"] = weight("wo", (e, c.d_ff, d_model), ("expert", "mlp", "embed"), normal)
        return out


class MoeBlock(nn.Module):
    """Router + `num_experts` experts (each with its RMSNorm scale) on [B, L, d]; with
    moe_expert_norm=False the input is already normalised (Switch's shared pre-norm)."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if not c.is_moe:
            raise ConfigError("MoeBlock needs num_experts > 0")
        check_backend(c.moe_backend)
        b, length, d = x.shape
        e, dtype = c.num_experts, dtype_of(c.dtype)
        g, s = routing_groups(b, length, c.moe_group_size)
        xg = nn.with_logical_constraint(x.reshape(g, s, d), ("batch", "length", "embed"))
        plan = None
        if (c.moe_router == "balanced" and c.moe_shuffle_tokens and not self.deterministic
                and can_shuffle(g, s) and self.has_rng("dropout")):
            plan = make_shuffle(self.make_rng("dropout"), g, s)
            xg = nn.with_logical_constraint(shuffle(xg, plan), ("batch", "length", "embed"))
        x32 = xg.astype(jnp.float32)
        normed, inv_rms = x32, None
        if c.moe_expert_norm:
            inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + c.layer_norm_epsilon)
            normed = x32 * inv_rms  # read by the dispatch gather (fused there, not stored)

        routing: Routing = Router(config=c, deterministic=self.deterministic, name="router")(x32, inv_rms)

        experts = Experts(config=c, name="experts")(d)
        routed = int(routing.kept.size)
        backend = select_backend(c.moe_backend, routed_rows=routed, padded_rows=g * e * routing.capacity)
        rows = to_experts(normed, routing, backend, permute_kernels=c.moe_permute_kernels)
        batched = backend not in RAGGED_BACKENDS
        if batched:
            rows = rows.replace(rows=nn.with_logical_constraint(
                nn.with_logical_constraint(rows.rows, _BATCH_SIDE), _EXPERT_SIDE))
        dropout = None
        if c.dropout_rate > 0 and not self.deterministic:
            dropout = nn.Dropout(c.dropout_rate, deterministic=False)
        out = expert_ffn(rows, experts, activation=c.ffn_activation, backend=backend, dtype=dtype,
                         dropout=dropout, expert_loop=batched and use_expert_loop(), fused=c.moe_fused_ffn)
        if batched:
            out = out.replace(rows=nn.with_logical_constraint(
                nn.with_logical_constraint(out.rows, _EXPERT_SIDE), _BATCH_SIDE))
        y = from_experts(out, routing, backend)
        if plan is not None:
            y = unshuffle(y, plan)
        self._sow(routing)
        return y.reshape(b, length, d).astype(dtype)

    def _sow(self, routing: Routing) -> None:
        c = self.config
        if c.moe_router == "top_k" and c.moe_aux_loss_weight:
            self.sow("aux_loss", "load_balancing_loss", c.moe_aux_loss_weight * routing.aux_loss)
        if c.moe_router != "balanced" and c.moe_z_loss_weight:
            self.sow("aux_loss", "router_z_loss", c.moe_z_loss_weight * routing.z_loss)
        self.sow("intermediates", "expert_load", routing.expert_load())
        self.sow("intermediates", "fraction_dropped", routing.fraction_dropped())
        self.sow("intermediates", "router_entropy", routing.entropy)
