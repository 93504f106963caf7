"""The project's own checkpoints for the convert commands: thin names over `cpm2_jax.checkpoints`.

`cpm2 convert` writes and reads the one checkpoint format (a params-only step directory:
`state/`, `config/`, `vocabulary/`); these wrappers keep the converters' tuple-keyed trees.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Optional

from cpm2_jax import param_paths
from cpm2_jax.config import ModelConfig


def flatten_params(params) -> dict[tuple[str, ...], Any]:
    """Path tuple -> leaf of a params tree (boxed or not, or a `{"params": ...}` variables dict)."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if hasattr(params, "unfreeze"):
        params = params.unfreeze()
    return param_paths.flatten_tuples(params)


def nest_params(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """The nested params tree of a {path tuple: leaf} dict (inverse of `flatten_params`)."""
    return param_paths.nest(flat)


def save_params(params, config: ModelConfig, path: os.PathLike | str, *, overwrite: bool = False,
                vocabulary=None) -> pathlib.Path:
    """Writes params (gathered to host), config and vocabulary as a checkpoint step directory."""
    from cpm2_jax import checkpoints

    return checkpoints.save_params(params, config, path, overwrite=overwrite, vocabulary=vocabulary)


def load_params(path: os.PathLike | str, config: Optional[ModelConfig] = None) -> tuple[dict, ModelConfig]:
    """(params as numpy arrays, config) of any checkpoint reference (see `checkpoints.load_params`)."""
    from cpm2_jax import checkpoints

    return checkpoints.load_params(path, config)
