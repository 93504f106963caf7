"""The project's own params on disk, for the convert CLI: `model_config.json` + an orbax tree.

Deliberately minimal (the trainer's `cpm2_jax/checkpoints.py` owns training checkpoints):
    DIR/model_config.json   every ModelConfig field
    DIR/params/             orbax StandardCheckpointer tree of host (numpy) arrays
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from typing import Any, Mapping

import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.convert.atomic import atomic_directory
from cpm2_jax.errors import CheckpointError, ConfigError

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def flatten_params(params) -> dict[tuple[str, ...], Any]:
    """Path tuple -> leaf of a params tree (boxed or not, frozen or not, or a `{"params": ...}`
    variables dict)."""
    import flax.linen as nn
    from flax import traverse_util

    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if hasattr(params, "unfreeze"):
        params = params.unfreeze()
    return {tuple(str(k) for k in path): leaf for path, leaf in traverse_util.flatten_dict(params).items()}


def nest_params(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """The nested params tree of a {path tuple: leaf} dict (inverse of `flatten_params`)."""
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat))


def config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n"


def config_from_json(text: str, *, source: str = "model config") -> ModelConfig:
    """ModelConfig from `config_to_json` output; an unknown field names itself."""
    try:
        fields = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{source} must hold a JSON object of ModelConfig fields")
    return ModelConfig().replace(**fields)


def save_params(params, config: ModelConfig, path: os.PathLike | str, *, overwrite: bool = False) -> pathlib.Path:
    """Writes params (gathered to host) and config to `path`, all-or-nothing."""
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nn.unbox(params))
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config_to_json(config))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, host)
        checkpointer.wait_until_finished()
        checkpointer.close()
    return pathlib.Path(path)


def load_params(path: os.PathLike | str) -> tuple[dict, ModelConfig]:
    """(params as numpy arrays, config) from a directory written by `save_params`."""
    import jax
    import orbax.checkpoint as ocp

    directory = pathlib.Path(path).expanduser().absolute()
    config_file, params_dir = directory / CONFIG_FILE, directory / PARAMS_DIR
    if not config_file.is_file() or not params_dir.is_dir():
        raise CheckpointError(f"{str(directory)!r} is not a converted checkpoint: expected {CONFIG_FILE} and "
                              f"{PARAMS_DIR}/ inside it")
    config = config_from_json(config_file.read_text(), source=str(config_file))
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(params_dir).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        params = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot restore params from {str(params_dir)!r}: {err}") from None
    finally:
        checkpointer.close()
    return params, config
