"""Checkpoint conversion: transformers MT5 <-> project params, and the project's own param files."""
from cpm2_jax.convert.hf_mt5 import (config_from_hf, config_to_hf, load_hf_checkpoint,  # noqa: F401
                                     params_from_hf_state_dict, params_to_hf_state_dict,
                                     read_hf_state_dict, save_hf_checkpoint)
from cpm2_jax.convert.native import load_params, save_params  # noqa: F401
