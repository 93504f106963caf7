"""Deterministic, resumable numpy batches of a registered task or mixture, for the trainer.

    it = get_batch_iterator("cpm2_pretrain_bilingual", split="train",
                            feature_lengths={"inputs": 512, "targets": 256},
                            batch_size=32, seed=0, shard_index=0, num_shards=1, start_step=0)
    batch = next(it)       # encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           # decoder_loss_weights (+ *_segment_ids / *_positions when packed)
    saved = it.state()     # {"step": ..., and every argument}: JSON-serialisable
    it = BatchIterator.restore(saved)   # continues with exactly the batch an uninterrupted run gives
    it.close()             # or `with get_batch_iterator(...) as it:`

`close()` releases the tf.data iterator (its prefetch thread and the Python generator
feeding it) there and then. An iterator still open when the interpreter exits is
closed by an `atexit` hook (`close_all`): a generator-backed tf.data iterator left
alive into interpreter shutdown hangs or aborts the process (its prefetch thread still
calls into the Python generator while Python tears itself down).

Batch n is a pure function of (task, split, lengths, batch size, seed, shard, n): shuffling,
mixture sampling and span-corruption noise all derive from `seed` (seqio's map seeds and
shuffle seeds); tf.data keeps element order deterministic. Restoring at step N replays
the pipeline's first N batches (cheap next to training; no randomness is re-drawn).
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import weakref
from typing import Any, Mapping

import numpy as np
import seqio
import tensorflow as tf

from cpm2_jax.errors import ConfigError, DataError, closest
from cpm2_jax.tasks import registry, truncation

# The input pipeline runs on the host CPU; keep TensorFlow off the accelerators JAX uses.
tf.config.set_visible_devices([], "GPU")


def get_provider(name: str | seqio.DatasetProviderBase) -> seqio.DatasetProviderBase:
    """A registered task/mixture by name, with a did-you-mean on a typo."""
    if isinstance(name, seqio.DatasetProviderBase):
        return name
    registry.register_all()
    names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    if name not in names:
        raise ConfigError(f"unknown task or mixture {name!r}{closest(name, names)}")
    return seqio.get_mixture_or_task(name)


def task_dataset(provider: seqio.DatasetProviderBase, split: str, feature_lengths: Mapping[str, int],
                 seed: int, shuffle: bool, num_epochs: int | None,
                 shard_index: int = 0, num_shards: int = 1) -> tf.data.Dataset:
    """Preprocessed task features (inputs/targets + truncation flags), before conversion."""
    if split not in provider.splits:
        raise ConfigError(f"{provider.name!r} has no split {split!r}; it has {sorted(provider.splits)}")
    shard = seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None
    with seqio.utils.map_seed_manager(seed):
        return provider.get_dataset(
            sequence_length=dict(feature_lengths), split=split, use_cached=False, shuffle=shuffle,
            num_epochs=num_epochs, shard_info=shard, seed=seed)


@dataclasses.dataclass(frozen=True)
class IteratorConfig:
    """Everything that determines the batch sequence (saved in `state()`)."""

    name: str
    split: str = "train"
    feature_lengths: tuple[tuple[str, int], ...] = (("inputs", 512), ("targets", 256))
    batch_size: int = 32
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1
    pack: bool = True
    shuffle: bool = True
    num_epochs: int | None = None


_OPEN: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()


@atexit.register
def close_all() -> None:
    """Close every open `BatchIterator` (run at exit, before interpreter teardown)."""
    for iterator in list(_OPEN):
        iterator.close()


class BatchIterator:
    """Iterator of model-feature numpy batches with `step`, `state()`, `restore()` and `stats()`.

    Close it (`close()`, or use it as a context manager) when done; after `close()` it
    is exhausted (`next` raises StopIteration) while `state()` and `stats()` still answer.
    """

    _iterator = None  # set last in __init__: close() is safe on a half-built iterator

    def __init__(self, config: IteratorConfig, start_step: int = 0,
                 provider: seqio.DatasetProviderBase | None = None):
        if config.batch_size < 1 or not 0 <= config.shard_index < config.num_shards:
            raise ConfigError(f"bad batch size or shard: {config}")
        self.config = config
        self.step = start_step
        self._provider = provider or get_provider(config.name)
        lengths = dict(config.feature_lengths)
        self._truncated = {k: tf.Variable(0, dtype=tf.int64, trainable=False) for k in lengths}
        self._examples = tf.Variable(0, dtype=tf.int64, trainable=False)
        dataset = task_dataset(self._provider, config.split, lengths, config.seed, config.shuffle,
                               config.num_epochs, config.shard_index, config.num_shards)
        dataset = dataset.map(self._count, num_parallel_calls=1)
        converter = seqio.EncDecFeatureConverter(pack=config.pack)
        dataset = converter(dataset, lengths)
        dataset = dataset.batch(config.batch_size, drop_remainder=True)
        # Replays the first `start_step` batches: exact resume, same data as a straight run.
        dataset = dataset.skip(start_step).prefetch(2)
        self._iterator = iter(dataset.as_numpy_iterator())
        _OPEN.add(self)

    def _count(self, example):
        self._examples.assign_add(1)
        for key, variable in self._truncated.items():
            flag = example.get(truncation.truncated_key(key))
            if flag is not None:
                variable.assign_add(tf.cast(flag, tf.int64))
        return example

    def __iter__(self):
        return self

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._iterator is None

    def close(self) -> None:
        """Release the tf.data iterator now: its prefetch thread stops and the source generator closes.

        Idempotent. The iterator resource is freed with its last Python reference; the
        collection pass frees it even if a reference cycle (e.g. a traceback) holds it.
        """
        iterator, self._iterator = self._iterator, None
        _OPEN.discard(self)
        if iterator is not None:
            del iterator
            gc.collect()

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            raise StopIteration
        try:
            batch = next(self._iterator)
        except tf.errors.OpError as err:
            raise data_error_from(err) from None
        self.step += 1
        return batch

    def state(self) -> dict[str, Any]:
        """JSON-serialisable resume point: the configuration and the next step."""
        state = dataclasses.asdict(self.config)
        state["feature_lengths"] = dict(self.config.feature_lengths)
        state["step"] = self.step
        return state

    @classmethod
    def restore(cls, state: Mapping[str, Any]) -> "BatchIterator":
        fields = dict(state)
        step = int(fields.pop("step"))
        fields["feature_lengths"] = tuple(sorted(dict(fields["feature_lengths"]).items()))
        return cls(IteratorConfig(**fields), start_step=step)

    def stats(self) -> dict[str, int]:
        """Examples read so far (prefetch included) and how many had a feature truncated."""
        out = {"examples": int(self._examples.numpy())}
        out.update({f"truncated_{k}": int(v.numpy()) for k, v in self._truncated.items()})
        return out


def get_batch_iterator(mixture_or_task_name: str | seqio.DatasetProviderBase, *, split: str = "train",
                       feature_lengths: Mapping[str, int] | None = None, batch_size: int = 32, seed: int = 0,
                       shard_index: int = 0, num_shards: int = 1, start_step: int = 0, pack: bool = True,
                       shuffle: bool = True, num_epochs: int | None = None) -> BatchIterator:
    """The trainer's entry point: deterministic batches of `mixture_or_task_name` from `start_step`.

    `feature_lengths` defaults to CPM-2's inputs 512 / targets 256. Each of `num_shards`
    data-parallel hosts passes its `shard_index`; `batch_size` is that host's batch.
    `num_epochs=None` repeats forever (training); evaluation passes 1 and `shuffle=False`.
    """
    lengths = dict(feature_lengths or {"inputs": 512, "targets": 256})
    provider = None if isinstance(mixture_or_task_name, str) else mixture_or_task_name
    name = mixture_or_task_name if isinstance(mixture_or_task_name, str) else mixture_or_task_name.name
    config = IteratorConfig(name=name, split=split, feature_lengths=tuple(sorted(lengths.items())),
                            batch_size=batch_size, seed=seed, shard_index=shard_index, num_shards=num_shards,
                            pack=pack, shuffle=shuffle, num_epochs=num_epochs)
    return BatchIterator(config, start_step=start_step, provider=provider)


def data_error_from(err: tf.errors.OpError) -> Exception:
    """A tf.data error raised inside a source generator -> the DataError it carried."""
    message = err.message if hasattr(err, "message") else str(err)
    marker = "DataError: "
    if marker in message:
        return DataError(message.split(marker, 1)[1].splitlines()[0].strip())
    return err

