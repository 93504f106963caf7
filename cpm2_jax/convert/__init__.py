"""Checkpoint conversion: transformers MT5 / SwitchTransformers <-> project params, and the
project's own param files."""
from cpm2_jax.convert.hf_checkpoint import read_hf_state_dict  # noqa: F401
from cpm2_jax.convert.hf_mt5 import (config_from_hf, config_to_hf, load_hf_checkpoint,  # noqa: F401
                                     params_from_hf_state_dict, params_to_hf_state_dict, save_hf_checkpoint)
from cpm2_jax.convert.native import flatten_params, load_params, nest_params, save_params  # noqa: F401

# transformers `model_type` -> the converter module (each has config_from_hf / load_hf_checkpoint /
# save_hf_checkpoint); MT5 also reads gated-GELU, untied T5 v1.1 checkpoints.
HF_CONVERTERS = {"mt5": "hf_mt5", "t5": "hf_mt5", "switch_transformers": "hf_switch"}


def hf_converter(model_type: str):
    """The converter module for a transformers `model_type` (from config.json)."""
    import importlib

    from cpm2_jax.errors import ConfigError, closest

    if model_type not in HF_CONVERTERS:
        raise ConfigError(f"HF model_type {model_type!r} is not supported{closest(model_type, HF_CONVERTERS)}; "
                          f"supported: {', '.join(HF_CONVERTERS)}")
    return importlib.import_module(f"cpm2_jax.convert.{HF_CONVERTERS[model_type]}")


def hf_converter_for(config):
    """The converter that exports `config`: SwitchTransformers for MoE models, else MT5."""
    return hf_converter("switch_transformers" if config.is_moe else "mt5")
