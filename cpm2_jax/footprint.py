"""Parameter count and bytes per device, from `jax.eval_shape` alone (nothing is allocated).

Given a config, a mesh shape and an optimizer, the abstract parameter and optimizer-state
trees are traced, every leaf gets its mesh PartitionSpec from the rules, and the bytes a
device holds are summed. Works for any mesh size on any machine (the mesh is never built).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ShardingError
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.optim import make_optimizer
from cpm2_jax.partitioning import (MESH_AXES, check_divisible, logical_specs, mesh_specs,
                                   optimizer_state_specs, rules_for_mesh)


def abstract_variables(config: ModelConfig, *, input_length: int = 8, target_length: int = 8):
    """The boxed abstract variables of the model (ShapeDtypeStructs with logical axes)."""
    model = EncoderDecoder(config)
    enc = jnp.ones((1, input_length), jnp.int32)
    dec = jnp.ones((1, target_length), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec))


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _group(path: str) -> str:
    """Breakdown bucket of a parameter: embedding, output, and per-stack attention/mlp/norm/relpos."""
    parts = path.split("/")
    if parts[0] in ("token_embedder", "prompt"):
        return parts[0]
    if "logits_dense" in parts:
        return "logits_dense"
    stack = parts[0]
    if "relpos_bias" in parts:
        return f"{stack}/relpos_bias"
    if "experts" in parts:  # MoE experts, their per-expert norms included
        return f"{stack}/experts"
    if any(p.endswith("norm") for p in parts):
        return f"{stack}/norms"
    for kind in ("self_attention", "encoder_decoder_attention", "attention", "mlp", "moe"):
        if kind in parts:
            return f"{stack}/{kind}"
    return f"{stack}/other"


def per_device_bytes(shapes, specs, mesh_shape: Mapping[str, int]) -> int:
    """Bytes one device holds: each leaf's bytes divided by the ways its spec splits it."""
    total = 0

    def add(shape, spec):
        nonlocal total
        ways = 1
        for target in tuple(spec) if spec is not None else ():
            targets = target if isinstance(target, tuple) else ((target,) if target else ())
            ways *= math.prod(mesh_shape.get(t, 1) for t in targets)
        total += math.prod(shape.shape) * np.dtype(shape.dtype).itemsize // ways

    jax.tree_util.tree_map(add, shapes, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return total


def footprint(config: ModelConfig, mesh_shape: Optional[Mapping[str, int]] = None,
              optimizer: str = "adamw") -> dict:
    """The report printed by `cpm2 params`: exact total, breakdown, bytes per device."""
    mesh_shape = dict(mesh_shape or {"data": 1})
    unknown = [a for a in mesh_shape if a not in MESH_AXES]
    if unknown:
        raise ShardingError(f"unknown mesh axis {unknown[0]!r}; mesh axes are {', '.join(MESH_AXES)}")
    rules = rules_for_mesh(mesh_shape)
    boxed = abstract_variables(config)["params"]
    shapes = nn.unbox(boxed)
    specs = mesh_specs(logical_specs(boxed), rules)
    check_divisible(shapes, specs, mesh_shape)

    breakdown: "OrderedDict[str, int]" = OrderedDict()
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        group = _group(_path(path))
        breakdown[group] = breakdown.get(group, 0) + math.prod(leaf.shape)
    total = sum(breakdown.values())

    report = {
        "config": {k: getattr(config, k) for k in ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim",
                                                     "num_encoder_layers", "num_decoder_layers", "num_experts")},
        "total": int(total),
        "breakdown": dict(breakdown),
        "mesh": mesh_shape,
        "devices": math.prod(mesh_shape.values()),
        "param_dtype": config.param_dtype,
        "optimizer": optimizer,
        "per_device_bytes": {"params": per_device_bytes(shapes, specs, mesh_shape)},
    }
    if optimizer and optimizer != "none":
        tx = make_optimizer(optimizer, 1e-3)
        state = jax.eval_shape(tx.init, shapes)
        state_specs = optimizer_state_specs(state, shapes, specs)
        report["per_device_bytes"]["optimizer_state"] = per_device_bytes(state, state_specs, mesh_shape)
    if config.prompt is not None:
        # Prompt tuning trains the prompt table alone (CPM2_FACTS: 100 x 4096 = 409.6K for 11B).
        prompt = breakdown.get("prompt", 0)
        report["trainable"] = {"parameters": int(prompt), "pattern": "prompt",
                               "percent_of_backbone": round(100.0 * prompt / (total - prompt), 6)}
    report["per_device_bytes"]["total"] = sum(report["per_device_bytes"].values())
    report["per_device_gib"] = {k: round(v / 2**30, 3) for k, v in report["per_device_bytes"].items()}
    return report
