"""MoE routing diagnostics as scalar metrics, from what the MoE layers sow.

Every MoE layer (`moe/layer.py`) sows into `intermediates` its `expert_load` (the fraction of
kept assignments per expert, [E]), `fraction_dropped` and `router_entropy`, and into
`aux_loss` its weighted `load_balancing_loss` / `router_z_loss` (the routers that have
them). Scanned layers stack them on a leading layers axis. Each metric is the mean over
the MoE layers of both stacks:

    load_max_over_mean = E * max_e load_e        (1: perfectly balanced; E: one expert takes all)
    expert_utilization = |{e : load_e > 0}| / E  (the share of experts given any token)
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

PREFIX = "moe/"


def _by_name(tree) -> dict[str, list[jax.Array]]:
    """Sown leaves grouped by their sow name (the last string key of their path)."""
    out: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
        if names:
            out.setdefault(names[-1], []).append(jnp.asarray(leaf, jnp.float32))
    return out


def _mean(arrays) -> jax.Array:
    return jnp.mean(jnp.concatenate([a.ravel() for a in arrays]))


def layer_metrics(sown: Mapping) -> dict[str, jax.Array]:
    """{'moe/<name>': scalar} averaged over MoE layers, from the `intermediates` and
    `aux_loss` collections of one forward pass ({} for a dense model)."""
    out = {}
    for name, arrays in _by_name(sown.get("intermediates", {})).items():
        if name == "expert_load":
            load = jnp.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays])  # [layers, E]
            out["load_max_over_mean"] = jnp.mean(jnp.max(load, axis=-1) * load.shape[-1])
            out["expert_utilization"] = jnp.mean((load > 0).astype(jnp.float32))
        else:
            out[name] = _mean(arrays)
    for name, arrays in _by_name(sown.get("aux_loss", {})).items():
        out[name] = _mean(arrays)
    return {PREFIX + k: v for k, v in sorted(out.items())}
