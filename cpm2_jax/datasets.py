"""What the train and eval binaries need from data: a gin-configurable dataset config and
a per-process batch iterator built from it (t5x's DatasetConfig / get_dataset_fn).

An iterator yields dicts of numpy arrays with t5x feature names (encoder_input_tokens,
decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, optional
*_segment_ids / *_positions), holding this process's rows of the global batch, and has
`state()` -> a JSON-serialisable dict with the number of batches consumed under "step".
`get_dataset_fn(config, shard_index=, num_shards=, start_step=)` builds one; restarting at
`start_step` must continue exactly where the saved run was (exact resume).

`get_dataset` also takes `data_state=` (the dict a checkpoint saved from `state()`): its
"positions" (one per process, gathered from every process when the state is taken)
resume the pipeline in constant time instead of replaying `start_step` batches.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import gin
import numpy as np

from cpm2_jax.errors import ConfigError

log = logging.getLogger(__name__)
POSITIONS_KEY = "positions"
# What must be equal for a saved position to apply (the per-process batch size may change).
_POSITION_FIELDS = ("name", "split", "feature_lengths", "seed", "num_shards", "pack", "shuffle", "num_epochs")


@gin.configurable(module="cpm2_jax.datasets")
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """A SeqIO task or mixture, its feature lengths and the global batch size."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    pack: bool = True
    num_epochs: Optional[int] = None  # None: repeat forever (training, fixed-size eval)


class BatchSource(Protocol):
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def state(self) -> dict[str, Any]: ...


def local_batch_size(global_batch_size: int, num_shards: int) -> int:
    """This process's rows; the global batch must split evenly over the processes."""
    if global_batch_size % num_shards:
        raise ConfigError(f"global batch size {global_batch_size} is not divisible by the number of "
                          f"processes {num_shards}")
    return global_batch_size // num_shards


def get_dataset(config: DatasetConfig, *, shard_index: int = 0, num_shards: int = 1,
                start_step: int = 0, data_state: Optional[Mapping[str, Any]] = None) -> BatchSource:
    """This process's deterministic batches of a registered SeqIO task/mixture (cpm2_jax.tasks).

    With `data_state` (a saved `state()` of the same task, lengths, seed and process count)
    the pipeline continues from its saved position; otherwise it replays `start_step` batches.
    """
    with gin.unlock_config():  # the task modules register gin configurables on first import
        from cpm2_jax.tasks import settings
        from cpm2_jax.tasks.pipeline import get_batch_iterator
    settings.configure()  # applies gin bindings of cpm2_jax.tasks.settings.configure, if any

    position = saved_position(data_state, num_shards, config, start_step)
    iterator = get_batch_iterator(config.mixture_or_task_name, split=config.split,
                                  feature_lengths=dict(config.task_feature_lengths),
                                  batch_size=local_batch_size(config.batch_size, num_shards), seed=config.seed,
                                  shard_index=shard_index, num_shards=num_shards, start_step=start_step,
                                  pack=config.pack, shuffle=config.shuffle, num_epochs=config.num_epochs,
                                  position=None if position is None else position[shard_index])
    return ProcessBatches(iterator, num_shards)


def saved_position(data_state: Optional[Mapping[str, Any]], num_shards: int, config: DatasetConfig,
                   start_step: int) -> Optional[list]:
    """Every process's saved pipeline position, or None when they cannot apply (then: replay)."""
    if not data_state or POSITIONS_KEY not in data_state:
        return None
    saved = {k: data_state.get(k) for k in _POSITION_FIELDS}
    wanted = {"name": config.mixture_or_task_name, "split": config.split,
              "feature_lengths": dict(config.task_feature_lengths), "seed": config.seed, "num_shards": num_shards,
              "pack": config.pack, "shuffle": config.shuffle, "num_epochs": config.num_epochs}
    saved["feature_lengths"] = dict(saved["feature_lengths"] or {})
    positions = data_state[POSITIONS_KEY]
    differing = [f"{k}={saved[k]!r} (now {wanted[k]!r})" for k in _POSITION_FIELDS if saved[k] != wanted[k]]
    if differing or len(positions) != num_shards or int(data_state.get("step", -1)) != start_step:
        log.warning("the saved data position does not apply (%s); replaying %d batches instead",
                    ", ".join(differing) or "another step or process count", start_step)
        return None
    return list(positions)


class ProcessBatches:
    """This process's batch iterator; `state()` carries every process's position.

    The checkpoint's data item is written by one process, so taking the state gathers the
    positions of all processes (an all-gather: every process calls `state()` when saving).
    """

    def __init__(self, iterator, num_shards: int, gather: Optional[Callable[[bytes], list[bytes]]] = None):
        self._iterator, self._num_shards = iterator, num_shards
        self._gather = gather or _allgather_bytes

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def __getattr__(self, name):  # step, stats(), records_read(), close(), closed, config ...
        return getattr(self._iterator, name)

    def state(self) -> dict[str, Any]:
        state = self._iterator.state()
        position = state.pop("position")
        mine = json.dumps(position, separators=(",", ":")).encode()
        everyone = [mine] if self._num_shards == 1 else self._gather(mine)
        state.pop("shard_index", None)
        state[POSITIONS_KEY] = [json.loads(p) for p in everyone]
        return state


def _allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's `payload`, in process order (jax multihost all-gather of padded bytes)."""
    from jax.experimental import multihost_utils

    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(payload)], np.int32))).reshape(-1)
    buffer = np.zeros(int(lengths.max()), np.uint8)
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(lengths), -1)
    return [bytes(row[:n]) for row, n in zip(gathered, lengths)]


def batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Token positions processed by one batch (encoder + decoder, padding included)."""
    return int(sum(batch[k].size for k in ("encoder_input_tokens", "decoder_input_tokens") if k in batch))
