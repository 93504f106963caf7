"""Import from and export to transformers' `MT5ForConditionalGeneration` (CPM-2 is the mT5 layout).

The tensor table (`tensor_map`) is the T5 skeleton of `hf_checkpoint` with mT5's gated-GELU
feed-forward (`DenseReluDense.wi_0/wi_1/wo`; T5 v1.0's ReLU `wi/wo` too) and an untied
`lm_head`; `hf_checkpoint` reads, reshapes, checks and writes from it.

A tied checkpoint (transformers 5 saves every MT5 tied: no `lm_head.weight`) imports as the
untied CPM-2 head with the output matrix taken from `shared`, times the factor transformers
applies to the decoder output before a tied head (`tied_head_scale`):

    logits = (s * h) . shared^T = h . (s * shared)^T,   lm_head := s * shared
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Any, Mapping, Optional

import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.convert.hf_checkpoint import (EMBEDDING_COPIES, SHARED, HFTensor, params_from_state_dict,
                                            params_to_state_dict, read_hf_state_dict, save_directory,
                                            t5_tensor_map)
from cpm2_jax.convert.hf_checkpoint import project_shapes as _table_shapes
from cpm2_jax.errors import ConfigError

# ModelConfig.ffn_activation <-> transformers' feed_forward_proj.
_FEED_FORWARD_PROJ = {"gated_gelu": "gated-gelu", "relu": "relu"}
# HF keeps this unused tensor in some checkpoints and skips it on load; so do we.
_IGNORED_HF_KEYS = frozenset({"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"})


def _feed_forward(prefix: str, path: tuple[str, ...], c: ModelConfig, stack: str, layer: int) -> list[HFTensor]:
    del stack
    inputs = ("wi_0", "wi_1") if c.ffn_activation == "gated_gelu" else ("wi",)
    return [*(HFTensor(f"{prefix}.DenseReluDense.{w}.weight", path + ("mlp", w), "transpose", (c.d_ff, c.d_model),
                       layer) for w in inputs),
            HFTensor(f"{prefix}.DenseReluDense.wo.weight", path + ("mlp", "wo"), "transpose", (c.d_model, c.d_ff), layer),
            HFTensor(f"{prefix}.layer_norm.weight", path + ("pre_mlp_layer_norm", "scale"), "copy", (c.d_model,), layer)]


def tensor_map(config: ModelConfig) -> list[HFTensor]:
    """Every tensor of an MT5ForConditionalGeneration with `config`'s sizes, in HF state-dict order."""
    return t5_tensor_map(config, _feed_forward)


def project_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every parameter, in `config`'s layout (scanned layers stacked on axis 0)."""
    return _table_shapes(tensor_map(config), config)


def _check_dense(config: ModelConfig) -> None:
    if config.is_moe:
        raise ConfigError("MT5ForConditionalGeneration is a dense model; convert with num_experts=0 "
                          "(dense-to-moe upcycling is a separate step)")
    if config.ffn_activation not in _FEED_FORWARD_PROJ or config.tie_word_embeddings:
        raise ConfigError("MT5ForConditionalGeneration is exported with a gated-GELU or ReLU FFN and an untied head; "
                          f"the config has ffn_activation={config.ffn_activation!r}, "
                          f"tie_word_embeddings={config.tie_word_embeddings}")


def _describe(c: ModelConfig) -> str:
    return (f"vocab {c.vocab_size}, d_model {c.d_model}, d_ff {c.d_ff}, {c.num_heads}x{c.head_dim} heads, "
            f"{c.num_encoder_layers}+{c.num_decoder_layers} layers")


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: ModelConfig) -> dict:
    """The project's params (nested dict of numpy arrays in `config.param_dtype`) from an HF state dict.

    Every missing, unexpected or wrong-shaped key is reported in one `CheckpointError` naming
    the key, the expected and the found shape.
    """
    _check_dense(config)
    return params_from_state_dict(state_dict, tensor_map(config), config,
                                  aliases={alias: SHARED for alias in EMBEDDING_COPIES},
                                  ignored=_IGNORED_HF_KEYS, describe=_describe(config))


def params_to_hf_state_dict(params, config: ModelConfig, *, dtype: Optional[str] = None) -> dict[str, np.ndarray]:
    """HF state dict (contiguous numpy arrays, HF key order) from the project's params.

    `dtype` ("float32", "bfloat16", "float16") casts the output; default: the params' own dtype.
    A params tree that does not match `config` raises `CheckpointError` naming the path.
    """
    _check_dense(config)
    return params_to_state_dict(params, tensor_map(config), config, dtype=dtype, describe=_describe(config))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> ModelConfig:
    """ModelConfig from an MT5 (or gated-GELU, untied T5 v1.1) config dict or `PretrainedConfig`.

    `overrides` set project-only fields (scan_layers, param_dtype, dtype, remat_policy, ...).
    """
    hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    model_type = hf.get("model_type", "mt5")
    if model_type not in ("mt5", "t5"):
        raise ConfigError(f"HF config model_type {model_type!r} is not supported; expected 'mt5' "
                          "(or a gated-gelu 't5' v1.1)")
    activations = {v: k for k, v in _FEED_FORWARD_PROJ.items()}
    proj = hf.get("feed_forward_proj", "gated-gelu")
    if proj not in activations:
        raise ConfigError(f"HF config feed_forward_proj {proj!r} is not supported: CPM-2 uses 'gated-gelu' "
                          f"(T5 v1.0's 'relu' also converts)")
    missing = [k for k in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers") if k not in hf]
    if missing:
        raise ConfigError(f"HF config lacks field(s) {', '.join(missing)}")
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), d_ff=int(hf["d_ff"]),
        num_heads=int(hf["num_heads"]), head_dim=int(hf["d_kv"]), num_encoder_layers=int(hf["num_layers"]),
        num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        dropout_rate=float(hf.get("dropout_rate", 0.0)),
        ffn_activation=activations[proj],
    )
    fields.update(overrides)
    return ModelConfig().replace(**fields)


def config_to_hf(config: ModelConfig, *, dtype: Optional[str] = None) -> dict[str, Any]:
    """The `config.json` dict of an equivalent MT5ForConditionalGeneration (untied output head)."""
    _check_dense(config)
    c = config
    return {
        "architectures": ["MT5ForConditionalGeneration"],
        "model_type": "mt5",
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.head_dim,
        "d_ff": c.d_ff,
        "num_layers": c.num_encoder_layers,
        "num_decoder_layers": c.num_decoder_layers,
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "dropout_rate": c.dropout_rate,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": _FEED_FORWARD_PROJ[c.ffn_activation],
        "dense_act_fn": "gelu_new" if c.ffn_activation == "gated_gelu" else "relu",
        "is_gated_act": c.ffn_activation == "gated_gelu",
        "tie_word_embeddings": False,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dtype": dtype or c.param_dtype,
    }


def tied_head_scale(hf_config: Mapping[str, Any]) -> float:
    """The factor transformers multiplies the decoder output by before a tied `lm_head`:
    T5 (and any config with `scale_decoder_outputs`) d_model**-0.5 when that is set; MT5 1.0
    from transformers 5 on, d_model**-0.5 before (read from config.json's transformers_version)."""
    d = int(hf_config["d_model"])
    if "scale_decoder_outputs" in hf_config:
        return d ** -0.5 if hf_config["scale_decoder_outputs"] else 1.0
    if hf_config.get("model_type", "mt5") == "t5":
        return d ** -0.5
    version = str(hf_config.get("transformers_version") or "5")
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 5
    return 1.0 if major >= 5 else d ** -0.5


def untie_head(state: Mapping[str, Any], hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict with an explicit `lm_head.weight`: for a tied model (config.json's
    tie_word_embeddings, true when absent, as transformers reads it) `shared` times
    `tied_head_scale`; an untied model must hold its own."""
    from cpm2_jax.convert.hf_checkpoint import to_numpy
    from cpm2_jax.errors import CheckpointError

    state = dict(state)
    tied = bool(hf_config.get("tie_word_embeddings", True))
    if not tied:
        if "lm_head.weight" not in state and SHARED in state:
            raise CheckpointError("missing key 'lm_head.weight': config.json sets tie_word_embeddings=false, so the "
                                  "output matrix must be stored; if the model was saved tied (transformers 5 saves "
                                  "MT5 tied), set tie_word_embeddings=true in config.json")
        return state
    if SHARED not in state:
        raise CheckpointError(f"missing key {SHARED!r}: a tied model (tie_word_embeddings=true) takes its output "
                              f"matrix from it")
    shared = to_numpy(state[SHARED])
    scale = tied_head_scale(hf_config)
    state["lm_head.weight"] = shared if scale == 1.0 else (shared.astype(np.float32) * np.float32(scale)).astype(
        shared.dtype)
    return state


def load_hf_checkpoint(path: os.PathLike | str, **config_overrides) -> tuple[dict, ModelConfig]:
    """(params, config) from a transformers MT5 directory, tied or not; `config_overrides` as in
    `config_from_hf`."""
    state, hf_config = read_hf_state_dict(path)
    config = config_from_hf(hf_config, **config_overrides)
    return params_from_hf_state_dict(untie_head(state, hf_config), config), config


def save_hf_checkpoint(params, config: ModelConfig, path: os.PathLike | str, *, overwrite: bool = False,
                       dtype: Optional[str] = None, max_shard_bytes: Optional[int] = None) -> pathlib.Path:
    """Writes `config.json` + `model.safetensors` (or shards + index when larger than
    `max_shard_bytes`), loadable by `MT5ForConditionalGeneration.from_pretrained`.

    Written to a temp directory and renamed, so a failure leaves nothing behind; an existing
    non-empty `path` is replaced only with `overwrite=True`.
    """
    return save_directory(params, config, path, sys.modules[__name__], overwrite=overwrite, dtype=dtype,
                          max_shard_bytes=max_shard_bytes)
