"""Import from and export to transformers' `SwitchTransformersForConditionalGeneration`.

Switch is the T5 v1.0 layout with MoE feed-forward blocks in every `sparse_step`-th layer
(layer i is sparse when step == 1 or i % step == 1). The project runs it with these
ModelConfig switches (the rest as CPM-2): ffn_activation="relu" (wi, wo), moe_expert_norm=False
(one shared pre-norm before router and experts), moe_router="top_k" with k=1, a fixed
moe_expert_capacity per sequence (dropped tokens pass through the residual only), an optional
router bias, and tie_word_embeddings (logits = (x * d_model**-0.5) . shared^T) when tied.

    encoder.block.{i}.layer.1.mlp.router.classifier.{weight [E, d], bias [E]}
        -> encoder/layers_i/moe/router/{kernel [d, E], bias [E]}
    encoder.block.{i}.layer.1.mlp.experts.expert_{j}.{wi [ff, d], wo [d, ff]}
        -> encoder/layers_i/moe/experts/{wi [E, d, ff], wo [E, ff, d]}  (row j)
    encoder.block.{i}.layer.1.mlp.{wi, wo} (dense layers) -> encoder/layers_i/mlp/{wi, wo}
    encoder.block.{i}.layer.1.layer_norm -> encoder/layers_i/pre_mlp_layer_norm/scale
(decoder: `layer.2`). The table machinery is `hf_checkpoint`'s.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Any, Mapping, Optional

import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.convert.hf_checkpoint import (EMBEDDING_COPIES, SHARED, HFTensor, load_directory,
                                            params_from_state_dict, params_to_state_dict, save_directory,
                                            t5_tensor_map)
from cpm2_jax.convert.hf_checkpoint import project_shapes as _table_shapes
from cpm2_jax.errors import ConfigError

MODEL_TYPE = "switch_transformers"


def _feed_forward(prefix: str, path: tuple[str, ...], c: ModelConfig, stack: str, layer: int) -> list[HFTensor]:
    d, ff, e = c.d_model, c.d_ff, c.num_experts
    out = []
    if c.is_moe_layer(stack, layer):
        router = f"{prefix}.mlp.router.classifier"
        out.append(HFTensor(f"{router}.weight", path + ("moe", "router", "kernel"), "transpose", (e, d), layer))
        if c.moe_router_bias:
            out.append(HFTensor(f"{router}.bias", path + ("moe", "router", "bias"), "copy", (e,), layer))
        for j in range(e):
            expert = f"{prefix}.mlp.experts.expert_{j}"
            out += [HFTensor(f"{expert}.wi.weight", path + ("moe", "experts", "wi"), "transpose", (ff, d), layer, j),
                    HFTensor(f"{expert}.wo.weight", path + ("moe", "experts", "wo"), "transpose", (d, ff), layer, j)]
    else:
        out += [HFTensor(f"{prefix}.mlp.wi.weight", path + ("mlp", "wi"), "transpose", (ff, d), layer),
                HFTensor(f"{prefix}.mlp.wo.weight", path + ("mlp", "wo"), "transpose", (d, ff), layer)]
    out.append(HFTensor(f"{prefix}.layer_norm.weight", path + ("pre_mlp_layer_norm", "scale"), "copy", (d,), layer))
    return out


def tensor_map(config: ModelConfig) -> list[HFTensor]:
    """Every tensor of a SwitchTransformersForConditionalGeneration with `config`'s sizes, in
    HF state-dict order (no `lm_head.weight` when the head is tied)."""
    check_switch(config)
    return t5_tensor_map(config, _feed_forward)


def project_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every parameter, in `config`'s layout."""
    return _table_shapes(tensor_map(config), config)


def check_switch(config: ModelConfig) -> None:
    """The config must be one that SwitchTransformers can express."""
    c = config
    wrong = [f"{name}={getattr(c, name)!r} (Switch: {want})" for name, ok, want in (
        ("num_experts", c.is_moe, "> 0"), ("moe_router", c.moe_router == "top_k", "'top_k'"),
        ("moe_top_k", c.moe_top_k == 1, "1"), ("ffn_activation", c.ffn_activation == "relu", "'relu'"),
        ("moe_expert_norm", not c.moe_expert_norm, "False"),
        ("moe_group_size", c.moe_group_size == 0, "0, one routing group per sequence"),
        ("moe_expert_capacity", c.moe_expert_capacity > 0, "> 0")) if not ok]
    if wrong:
        raise ConfigError("the config is not a SwitchTransformers model: " + "; ".join(wrong))


def _describe(c: ModelConfig) -> str:
    return (f"vocab {c.vocab_size}, d_model {c.d_model}, d_ff {c.d_ff}, {c.num_heads}x{c.head_dim} heads, "
            f"{c.num_encoder_layers}+{c.num_decoder_layers} layers, {c.num_experts} experts every "
            f"{c.moe_encoder_sparse_step}/{c.moe_decoder_sparse_step} layers, "
            f"{'tied' if c.tie_word_embeddings else 'untied'} head")


def _aliases(config: ModelConfig) -> dict[str, str]:
    aliases = {alias: SHARED for alias in EMBEDDING_COPIES}
    if config.tie_word_embeddings:  # transformers keeps the tied head in state_dict()
        aliases["lm_head.weight"] = SHARED
    return aliases


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: ModelConfig) -> dict:
    """The project's params (nested numpy arrays in `config.param_dtype`) from a Switch state dict;
    every missing, unexpected or wrong-shaped key is named in one `CheckpointError`."""
    return params_from_state_dict(state_dict, tensor_map(config), config, aliases=_aliases(config),
                                  describe=_describe(config))


def params_to_hf_state_dict(params, config: ModelConfig, *, dtype: Optional[str] = None) -> dict[str, np.ndarray]:
    """Switch state dict (contiguous numpy arrays, HF key order) from the project's params.

    Untied, transformers 5.x keeps `{encoder,decoder}.embed_tokens` as parameters of their own
    (tied to `shared` only with tie_word_embeddings), so they are written too, as copies.
    """
    state = params_to_state_dict(params, tensor_map(config), config, dtype=dtype, describe=_describe(config))
    if config.tie_word_embeddings:
        return state
    out = {}
    for key, value in state.items():
        if key == "encoder.block.0.layer.0.SelfAttention.q.weight":
            out["encoder.embed_tokens.weight"] = state[SHARED].copy()
        if key == "decoder.block.0.layer.0.SelfAttention.q.weight":
            out["decoder.embed_tokens.weight"] = state[SHARED].copy()
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def _sparse_step(hf: Mapping[str, Any], stack: str, layers: int) -> int:
    """transformers' rule: step = layers // num_sparse_layers (layers when that is 0)."""
    key = f"{stack}_sparse_step"
    if hf.get(key) is not None:
        return int(hf[key])
    sparse = int(hf.get(f"num_sparse_{stack}_layers", 3))
    return layers // sparse if sparse > 0 else layers


def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> ModelConfig:
    """ModelConfig from a SwitchTransformers config dict or `PretrainedConfig`; `overrides` set
    project-only fields (scan_layers, param_dtype, moe_backend, ...)."""
    hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ConfigError(f"HF config model_type {hf['model_type']!r} is not {MODEL_TYPE!r}")
    if hf.get("dense_act_fn", "relu") != "relu":
        raise ConfigError(f"SwitchTransformers dense_act_fn {hf['dense_act_fn']!r} is not supported: only 'relu'")
    if hf.get("router_dtype", "float32") != "float32":
        raise ConfigError(f"router_dtype {hf['router_dtype']!r} is not supported: routing runs in float32")
    missing = [k for k in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_experts",
                           "expert_capacity") if k not in hf]
    if missing:
        raise ConfigError(f"SwitchTransformers config lacks field(s) {', '.join(missing)}")
    enc_layers = int(hf["num_layers"])
    dec_layers = int(hf.get("num_decoder_layers") or enc_layers)
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), d_ff=int(hf["d_ff"]),
        num_heads=int(hf["num_heads"]), head_dim=int(hf["d_kv"]), num_encoder_layers=enc_layers,
        num_decoder_layers=dec_layers,
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        ffn_activation="relu", tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        num_experts=int(hf["num_experts"]), moe_router="top_k", moe_top_k=1, moe_group_size=0,
        moe_expert_capacity=int(hf["expert_capacity"]), moe_expert_norm=False,
        moe_router_bias=bool(hf.get("router_bias", False)), moe_jitter=float(hf.get("router_jitter_noise", 0.01)),
        moe_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)),
        moe_z_loss_weight=float(hf.get("router_z_loss_coef", 0.001)),
        moe_encoder_sparse_step=_sparse_step(hf, "encoder", enc_layers),
        moe_decoder_sparse_step=_sparse_step(hf, "decoder", dec_layers),
    )
    fields.update(overrides)
    return ModelConfig().replace(**fields)


def _num_sparse(step: int, layers: int, stack: str) -> int:
    """num_sparse_*_layers whose transformers step (layers // n) is `step`."""
    for n in range(1, layers + 1):
        if layers // n == step:
            return n
    raise ConfigError(f"moe_{stack}_sparse_step={step} with {layers} layers cannot be written as "
                      f"SwitchTransformers' num_sparse_{stack}_layers (step = layers // num_sparse)")


def config_to_hf(config: ModelConfig, *, dtype: Optional[str] = None) -> dict[str, Any]:
    """The `config.json` dict of an equivalent SwitchTransformersForConditionalGeneration."""
    check_switch(config)
    c = config
    return {
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.head_dim, "d_ff": c.d_ff,
        "num_layers": c.num_encoder_layers, "num_decoder_layers": c.num_decoder_layers, "num_heads": c.num_heads,
        "num_experts": c.num_experts, "expert_capacity": c.moe_expert_capacity,
        "num_sparse_encoder_layers": _num_sparse(c.moe_encoder_sparse_step, c.num_encoder_layers, "encoder"),
        "num_sparse_decoder_layers": _num_sparse(c.moe_decoder_sparse_step, c.num_decoder_layers, "decoder"),
        "router_bias": c.moe_router_bias, "router_jitter_noise": c.moe_jitter, "router_dtype": "float32",
        "router_ignore_padding_tokens": False,
        "router_z_loss_coef": c.moe_z_loss_weight, "router_aux_loss_coef": c.moe_aux_loss_weight,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "dropout_rate": c.dropout_rate, "layer_norm_epsilon": c.layer_norm_epsilon, "initializer_factor": 1.0,
        "dense_act_fn": "relu", "tie_word_embeddings": c.tie_word_embeddings, "is_encoder_decoder": True,
        "use_cache": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "dtype": dtype or c.param_dtype,
    }


def load_hf_checkpoint(path: os.PathLike | str, **config_overrides) -> tuple[dict, ModelConfig]:
    """(params, config) from a transformers SwitchTransformers directory."""
    return load_directory(path, sys.modules[__name__], **config_overrides)


def save_hf_checkpoint(params, config: ModelConfig, path: os.PathLike | str, *, overwrite: bool = False,
                       dtype: Optional[str] = None, max_shard_bytes: Optional[int] = None) -> pathlib.Path:
    """Writes a directory loadable by `SwitchTransformersForConditionalGeneration.from_pretrained`
    (all-or-nothing, as `hf_mt5.save_hf_checkpoint`)."""
    return save_directory(params, config, path, sys.modules[__name__], overwrite=overwrite, dtype=dtype,
                          max_shard_bytes=max_shard_bytes)
