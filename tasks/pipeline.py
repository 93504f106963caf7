"""Deterministic, resumable numpy batches of a registered task or mixture, for the trainer.

    it = get_batch_iterator("cpm2_pretrain_bilingual", split="train",
                            feature_lengths={"inputs": 512, "targets": 114},
                            batch_size=32, seed=0, shard_index=0, num_shards=1, start_step=0)
    batch = next(it)       # encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           # decoder_loss_weights (+ *_segment_ids / *_positions when packed)
    saved = it.state()     # {"step", every argument, "position"}: JSON-serialisable, a few KB
    it = BatchIterator.restore(saved)   # continues with exactly the batch an uninterrupted run gives
    it.close()             # or `with get_batch_iterator(...) as it:`

Batches come from `streams` (records through a seeded global permutation, epoch by
epoch; pre-training text joined and cut into full chunks, then span-corrupted) and
`packing` (rows, greedy packing). Batch n is a pure function of (task, split, lengths,
batch size, seed, shard, n): record order, mixture draws and span-corruption noise all
derive from `seed`. `state()` holds the position after the last batch (each stream's
next record and the record it is cutting, the chunk counter, the packer's pending
example): `restore` continues from it in constant time, reading only the records of the
batches it yields. A state without a position (or `start_step` alone) replays.

Truncation, packing and other per-example warnings are logged once per (task, reason)
and counted in `stats()`.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import weakref
from typing import Any, Mapping

import numpy as np
import seqio
import tensorflow as tf

from cpm2_jax.errors import ConfigError, DataError, closest
from cpm2_jax.tasks import packing, registry, span_corruption, streams

log = logging.getLogger(__name__)
DEFAULT_FEATURE_LENGTHS = span_corruption.feature_lengths_for(512)

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
    feature_lengths: tuple[tuple[str, int], ...] = (("inputs", 512), ("targets", 114))
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

    After `close()` it is exhausted (`next` raises StopIteration) while `state()` and
    `stats()` still answer.
    """

    def __init__(self, config: IteratorConfig, start_step: int = 0,
                 provider: seqio.DatasetProviderBase | None = None, position: Mapping[str, Any] | None = None):
        if config.batch_size < 1 or not 0 <= config.shard_index < config.num_shards:
            raise ConfigError(f"bad batch size or shard: {config}")
        self.config = config
        self.step = 0
        self._closed = False
        self._provider = provider or get_provider(config.name)
        self._lengths = dict(config.feature_lengths)
        self._stream = streams.build_stream(
            self._provider, config.split, self._lengths, seed=config.seed, shuffle=config.shuffle,
            num_epochs=config.num_epochs, shard_index=config.shard_index, num_shards=config.num_shards)
        self._packer = packing.Packer(self._stream, self._lengths, config.pack)
        _OPEN.add(self)
        if position is not None:
            self._stream.restore(position["stream"])
            self._packer.restore(position["packer"])
            self.step = start_step
        else:
            for _ in range(start_step):  # no saved position: replay (exact, O(start_step))
                next(self)

    def __iter__(self):
        return self

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop: later `next` calls raise StopIteration (idempotent; nothing runs in the background)."""
        self._closed = True
        _OPEN.discard(self)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise StopIteration
        rows = []
        try:
            for _ in range(self.config.batch_size):
                rows.append(self._packer.next_row())
        except StopIteration:
            self.close()  # a finite stream ended: the partial batch is dropped, as drop_remainder did
            raise
        self.step += 1
        return packing.to_features(rows, self._lengths, self.config.pack)

    def position(self) -> dict[str, Any]:
        """Where the next batch starts: each stream's record position and the packer's pending example."""
        return {"stream": self._stream.state(), "packer": self._packer.state()}

    def state(self) -> dict[str, Any]:
        """JSON-serialisable resume point: the configuration, the next step and the position."""
        state = dataclasses.asdict(self.config)
        state["feature_lengths"] = dict(self.config.feature_lengths)
        state["step"] = self.step
        state["position"] = self.position()
        return state

    @classmethod
    def restore(cls, state: Mapping[str, Any], provider: seqio.DatasetProviderBase | None = None
                ) -> "BatchIterator":
        fields = dict(state)
        step = int(fields.pop("step"))
        position = fields.pop("position", None)
        fields["feature_lengths"] = tuple(sorted(dict(fields["feature_lengths"]).items()))
        return cls(IteratorConfig(**fields), start_step=step, provider=provider, position=position)

    def stats(self) -> dict[str, int]:
        """Examples made so far and how many had a feature truncated."""
        out = {"examples": self._stream.examples}
        out.update({f"truncated_{k}": v for k, v in self._stream.truncated_counts.items()})
        return out

    def records_read(self) -> int:
        """Documents read from pre-training corpora so far (what a resume avoids re-reading)."""
        return sum(s.corpus.reads for s in _leaf_streams(self._stream) if hasattr(s, "corpus"))


def _leaf_streams(stream):
    return [leaf for child in stream.streams for leaf in _leaf_streams(child)] if hasattr(stream, "streams") \
        else [stream]


def get_batch_iterator(mixture_or_task_name: str | seqio.DatasetProviderBase, *, split: str = "train",
                       feature_lengths: Mapping[str, int] | None = None, batch_size: int = 32, seed: int = 0,
                       shard_index: int = 0, num_shards: int = 1, start_step: int = 0, pack: bool = True,
                       shuffle: bool = True, num_epochs: int | None = None,
                       position: Mapping[str, Any] | None = None) -> BatchIterator:
    """The trainer's entry point: deterministic batches of `mixture_or_task_name` from `start_step`.

    `feature_lengths` defaults to inputs 512 / targets 114 (what span corruption of 512 needs). Each of `num_shards`
    data-parallel hosts passes its `shard_index`; `batch_size` is that host's batch.
    `num_epochs=None` repeats forever (training); evaluation passes 1 and `shuffle=False`.
    `position` (from a saved `state()["position"]` of the same configuration) resumes at
    `start_step` in constant time; without it, `start_step` batches are replayed.
    """
    lengths = dict(feature_lengths or DEFAULT_FEATURE_LENGTHS)
    provider = None if isinstance(mixture_or_task_name, str) else mixture_or_task_name
    name = mixture_or_task_name if isinstance(mixture_or_task_name, str) else mixture_or_task_name.name
    config = IteratorConfig(name=name, split=split, feature_lengths=tuple(sorted(lengths.items())),
                            batch_size=batch_size, seed=seed, shard_index=shard_index, num_shards=num_shards,
                            pack=pack, shuffle=shuffle, num_epochs=num_epochs)
    return BatchIterator(config, start_step=start_step, provider=provider, position=position)


def data_error_from(err: tf.errors.OpError) -> Exception:
    """A tf.data error raised inside a source generator -> the DataError it carried."""
    message = err.message if hasattr(err, "message") else str(err)
    marker = "DataError: "
    if marker in message:
        return DataError(message.split(marker, 1)[1].splitlines()[0].strip())
    return err

