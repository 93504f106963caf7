"""Dense -> MoE upcycling (CPM2_FACTS "Knowledge inheritance", MoE stage): every expert of every
MoE layer starts as a copy of the dense feed-forward block, its RMSNorm included, and the
router starts fresh, so at step 0 the MoE model computes what the dense one did (for the
balanced router, whose combine weight is 1).

    layers_i/pre_mlp_layer_norm/scale [d]  ->  layers_i/moe/experts/norm_scale [E, d]
    layers_i/mlp/{wi_0, wi_1, wo}          ->  layers_i/moe/experts/{wi_0, wi_1, wo} [E, ...]
    (new)                                  ->  layers_i/moe/router/{centroids | kernel}

Scanned checkpoints (`layers/...` with a leading layer axis) keep that axis first. Only the
MoE layers of the config change (`is_moe_layer`); with moe_expert_norm=False (Switch) the
norm stays shared in `pre_mlp_layer_norm` and the experts copy the FFN weights alone.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax.config import FFN_WEIGHTS, ModelConfig
from cpm2_jax.convert.native import flatten_params, nest_params
from cpm2_jax.errors import CheckpointError, ConfigError


def _is_moe_field(name: str) -> bool:
    """Fields an upcycled config may set differently from its dense source: every `moe_*` switch."""
    return name == "num_experts" or name.startswith("moe_")


_NORM = ("pre_mlp_layer_norm", "scale")


def _layer_of(prefix: tuple[str, ...]) -> tuple[str, int]:
    """(stack, index) of a layer prefix `(stack, "layers_i")`; index 0 for a scanned `layers`."""
    name = prefix[-1]
    return prefix[0], (0 if name == "layers" else int(name.split("_")[-1]))


def _dense_ffn_layers(flat) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Layer prefix -> path of its dense `mlp/wo`, for every layer with a dense FFN."""
    return {p[:-2]: p for p in flat if p[-2:] == ("mlp", "wo")}


def check_compatible(dense: ModelConfig, moe: ModelConfig) -> None:
    """The MoE config must be the dense one plus MoE fields."""
    if dense.is_moe:
        raise ConfigError(f"dense-to-moe: the source config already has num_experts={dense.num_experts}")
    if not moe.is_moe:
        raise ConfigError("dense-to-moe: the target config needs num_experts > 0")
    different = [f.name for f in dataclasses.fields(ModelConfig)
                 if not _is_moe_field(f.name) and getattr(dense, f.name) != getattr(moe, f.name)]
    if different:
        name = different[0]
        raise ConfigError(f"dense-to-moe: the MoE config differs from the dense one in {', '.join(different)} "
                          f"(e.g. {name}: {getattr(dense, name)!r} vs {getattr(moe, name)!r}); only MoE fields may change")


def check_params_fit(params, config: ModelConfig) -> None:
    """A clear error when dense params meet an MoE config or MoE params meet a dense config
    (e.g. an MoE checkpoint restored into a dense model), before any shape mismatch deep in Flax."""
    flat = flatten_params(params)
    moe_paths = [p for p in flat if "moe" in p]
    if moe_paths and not config.is_moe:
        experts = next((flat[p].shape[-3] for p in moe_paths if p[-1] == "wo"), "?")
        raise CheckpointError(f"the checkpoint is an MoE model ({experts} experts; e.g. parameter "
                              f"{'/'.join(moe_paths[0])!r}) but the config is dense (num_experts=0); restore it "
                              f"with the MoE config (num_experts={experts}), or use a dense checkpoint")
    dense_in_moe = [p for prefix, p in _dense_ffn_layers(flat).items() if config.is_moe_layer(*_layer_of(prefix))]
    if dense_in_moe:
        raise CheckpointError(f"the checkpoint is a dense model (e.g. parameter {'/'.join(dense_in_moe[0])!r}) but the "
                              f"config has num_experts={config.num_experts} in that layer; upcycle it first with "
                              "`cpm2 convert dense-to-moe`")
    for path, value in flat.items():
        if path[-1] == "wo" and "experts" in path and value.shape[-3] != config.num_experts:
            raise CheckpointError(f"parameter {'/'.join(path)!r} holds {value.shape[-3]} experts but the config "
                                  f"has num_experts={config.num_experts}")


def _fresh_router(config: ModelConfig, rng: jax.Array, layers: int, scanned: bool):
    """Router parameters of one layer (or `layers` stacked ones when scanned), newly initialised."""
    import flax.linen as nn

    from cpm2_jax.moe.routing import Router

    e = config.num_experts
    probe = jnp.zeros((1, e, config.d_model), jnp.float32)  # S = E tokens: a valid balanced group

    def init(key):
        return nn.unbox(Router(config=config).init(key, probe))["params"]

    if not scanned:
        return jax.tree.map(np.asarray, init(rng))
    return jax.tree.map(np.asarray, jax.vmap(init)(jax.random.split(rng, layers)))


def upcycle_params(dense_params, dense_config: ModelConfig, moe_config: ModelConfig,
                   rng: jax.Array | int = 0) -> dict:
    """MoE params (numpy, host) from dense params: in every MoE layer (moe_config.is_moe_layer)
    the experts copy the dense FFN, and its norm unless the norm stays shared (moe_expert_norm=False)."""
    check_compatible(dense_config, moe_config)
    check_params_fit(dense_params, dense_config)
    rng = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    flat = {p: np.asarray(jax.device_get(v)) for p, v in flatten_params(dense_params).items()}
    layer_prefixes = sorted(_dense_ffn_layers(flat))
    if not layer_prefixes:
        raise CheckpointError("dense-to-moe: no dense feed-forward block (mlp/wo ...) found in the params")
    e, out = moe_config.num_experts, dict(flat)
    moved = [("mlp", name) for name in FFN_WEIGHTS[moe_config.ffn_activation]]
    if moe_config.moe_expert_norm:
        moved.append(_NORM)
    for i, prefix in enumerate(layer_prefixes):
        if not moe_config.is_moe_layer(*_layer_of(prefix)):
            continue
        scanned = prefix[-1] == "layers"
        missing = [k for k in moved if prefix + k not in flat]
        if missing:
            raise CheckpointError(f"dense-to-moe: layer {'/'.join(prefix)!r} lacks {'/'.join(missing[0])!r}")
        for key in moved:
            value = out.pop(prefix + key)
            axis = 1 if scanned else 0  # the expert axis goes after the scanned layer axis
            name = "norm_scale" if key == _NORM else key[-1]
            out[prefix + ("moe", "experts", name)] = np.repeat(np.expand_dims(value, axis), e, axis=axis)
        wo = flat[prefix + ("mlp", "wo")]
        router = _fresh_router(moe_config, jax.random.fold_in(rng, i), wo.shape[0] if scanned else 1, scanned)
        for rpath, value in flatten_params(router).items():
            out[prefix + ("moe", "router") + rpath] = value.astype(wo.dtype)
    return nest_params(out)
