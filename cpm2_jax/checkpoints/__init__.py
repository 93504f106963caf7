"""Checkpoints: one format, written and read by every command (train, eval, infer, convert).

    layout     the step directory (state, config, vocabulary, data items) and finding one
    items      what a save writes (incl. the vocabulary file and per-array fingerprints)
    manager    `Checkpoints`: a training run's steps (save every N, keep K, resume the
               newest readable step)
    restore    `load_params` / `restore_partial`: parameters out of any step, in either
               layer layout, straight into target shardings
    exported   `save_params`: a params-only step directory (`cpm2 convert`)
    layers     per-layer <-> stacked (`scan_layers`) names, shapes and arrays
    integrity  fingerprints and read errors of damaged checkpoints

`from cpm2_jax import checkpoints as ckpt_lib` gives the whole public API.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import gin
import jax
import numpy as np

from cpm2_jax import param_paths
from cpm2_jax.checkpoints.exported import save_params  # noqa: F401
from cpm2_jax.checkpoints.layout import (CONFIG, ITEMS, STATE, VOCABULARY, VocabularySpec,  # noqa: F401
                                         config_record, param_shapes, read_record, resolve, saved_model_config,
                                         saved_vocabulary, step_number, task_vocabulary)
from cpm2_jax.checkpoints.manager import Checkpoints  # noqa: F401
from cpm2_jax.checkpoints.restore import (abstract_params, describe_mismatch, load_params,  # noqa: F401
                                          plan_assignment, restore_partial)
from cpm2_jax.train_state import TrainState  # noqa: F401


@gin.configurable(module="cpm2_jax.checkpoints")
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to start from.

    `period`: save every N steps (0: only at the end). `keep`: how many recent steps stay on
    disk (None: all). `restore_from`: a checkpoint (a run, checkpoints folder, step or
    `cpm2 convert` directory; scanned or not) to start from when the model dir has none yet;
    `assignment_map`: [(regex, replacement or None)] applied to each target parameter path to
    name its source (None: initialise fresh; unmatched paths load from the same path);
    `fallback_to_scratch`: parameters absent from the source are initialised fresh instead
    of failing.
    """

    period: int = 1000
    keep: Optional[int] = 3
    async_save: bool = True
    restore_from: Optional[str] = None
    assignment_map: Optional[Sequence[tuple[str, Optional[str]]]] = None
    fallback_to_scratch: bool = True


def checkpoint_param_shapes(path) -> dict[str, tuple]:
    """{param path: shape} of a checkpoint reference, read from its metadata (no array loaded)."""
    return param_shapes(resolve(path))


def params_to_numpy(params) -> dict[str, np.ndarray]:
    """Flat {path: host array} (tests and comparisons)."""
    return {k: np.asarray(jax.device_get(v)) for k, v in param_paths.flatten(params).items()}
