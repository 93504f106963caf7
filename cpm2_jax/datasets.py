"""What the train and eval binaries need from data: a gin-configurable dataset config and
a per-process batch iterator built from it (t5x's DatasetConfig / get_dataset_fn).

An iterator yields dicts of numpy arrays with t5x feature names (encoder_input_tokens,
decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, optional
*_segment_ids / *_positions), holding this process's rows of the global batch, and has
`state()` -> a JSON-serialisable dict with the number of batches consumed under "step".
`get_dataset_fn(config, shard_index=, num_shards=, start_step=)` builds one; restarting at
`start_step` must continue exactly where the saved run was (exact resume).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Optional, Protocol

import gin
import numpy as np

from cpm2_jax.errors import ConfigError


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
                start_step: int = 0) -> BatchSource:
    """This process's deterministic batches of a registered SeqIO task/mixture (cpm2_jax.tasks)."""
    with gin.unlock_config():  # the task modules register gin configurables on first import
        from cpm2_jax.tasks import settings
        from cpm2_jax.tasks.pipeline import get_batch_iterator
    settings.configure()  # applies gin bindings of cpm2_jax.tasks.settings.configure, if any

    return get_batch_iterator(config.mixture_or_task_name, split=config.split,
                              feature_lengths=dict(config.task_feature_lengths),
                              batch_size=local_batch_size(config.batch_size, num_shards), seed=config.seed,
                              shard_index=shard_index, num_shards=num_shards, start_step=start_step,
                              pack=config.pack, shuffle=config.shuffle, num_epochs=config.num_epochs)


def batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Token positions processed by one batch (encoder + decoder, padding included)."""
    return int(sum(batch[k].size for k in ("encoder_input_tokens", "decoder_input_tokens") if k in batch))
