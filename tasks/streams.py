"""Resumable example streams: a task's examples in a global shuffle, with a position that
restores in O(1).

Every stream reads records through `RecordOrder`: epoch e visits the records of a split in
the order of a seeded permutation (`permutation.Permutation`, keyed by seed, task and
epoch), and data-parallel shard k of K takes positions k, k+K, k+2K, ... of it. A file's
order never reaches training, and the shards of one epoch partition the split.

* `SpanCorruptionStream` (pre-training): join, then cut, as t5's `reduce_concat_tokens`
  -> `split_tokens` -> `span_corruption`: documents are tokenized, EOS-terminated and
  concatenated, the stream is cut into chunks of the raw length whose corrupted inputs
  plus EOS fill the input length exactly (568 tokens for 512 at noise 0.15, mean span 3),
  and each chunk is span-corrupted with noise seeded by (seed, task, shard, chunk number).
  Every example is full except the last of a finite stream.
* `TextToTextStream` (fine-tuning): one example per record, trimmed and EOS-terminated.
* `MixtureStream`: example j comes from task i with probability rate_i / sum(rates),
  drawn from a generator seeded by (seed, j).

`state()` is a small JSON-serialisable dict: the next record's (epoch, position), the
record being cut (its position and token offset: restoring reads and tokenizes that one
record again), the chunk counter (the noise RNG's state). `restore(state)` continues with
exactly the examples an uninterrupted stream gives, reading only what it yields.
"""
from __future__ import annotations

import logging
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import seqio

from cpm2_jax.errors import ConfigError, DataError
from cpm2_jax.tasks import corpus_index, sources, span_corruption
from cpm2_jax.tasks.permutation import Permutation, mix

log = logging.getLogger(__name__)
Example = dict[str, np.ndarray]


def resolved(vocabulary: seqio.Vocabulary) -> seqio.Vocabulary:
    """The vocabulary a deferred `settings.ConfiguredVocabulary` stands for (resolved once)."""
    return getattr(vocabulary, "resolved", vocabulary)


def name_key(name: str) -> int:
    """A stable integer for a task name (Python's `hash` of a str changes per process)."""
    return zlib.crc32(name.encode("utf-8"))


class RecordOrder:
    """Which record this shard reads at (epoch, position): seeded per-epoch permutations."""

    def __init__(self, task: str, size: int, *, seed: int, shuffle: bool, shard_index: int = 0,
                 num_shards: int = 1, num_epochs: int | None = None):
        self.size, self.shuffle, self.num_epochs = size, shuffle, num_epochs
        self.shard_index, self.num_shards = shard_index, num_shards
        self.per_epoch = len(range(shard_index, size, num_shards))
        if self.per_epoch == 0:
            raise DataError(f"task {task!r}: {size} record(s) cannot feed {num_shards} data shards "
                            f"(shard {shard_index} would get none)")
        self._key = mix(seed, name_key(task))
        self._permutation: tuple[int, Permutation] | None = None

    def record(self, epoch: int, position: int) -> int:
        index = self.shard_index + position * self.num_shards
        if not self.shuffle:
            return index
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, Permutation(self.size, mix(self._key, epoch)))
        return self._permutation[1][index]

    def following(self, epoch: int, position: int) -> tuple[int, int] | None:
        """The slot after (epoch, position), or None past the last epoch."""
        position += 1
        if position == self.per_epoch:
            epoch, position = epoch + 1, 0
        if self.num_epochs is not None and epoch >= self.num_epochs:
            return None
        return epoch, position


class _OnceWarner:
    """Logs the first occurrence of each (task, reason) in this process; later ones are only
    counted (in the iterator's `stats()`), so a long run is not flooded batch after batch."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, task: str, reason: str, message: str) -> None:
        if (task, reason) not in self.seen:
            self.seen.add((task, reason))
            log.warning("task %r: %s (logged once; counted in the iterator's stats())", task, message)


WARN_ONCE = _OnceWarner()


def _trim_eos(tokens: Sequence[int], length: int | None, eos_id: int) -> tuple[np.ndarray, bool]:
    """Keep `length - 1` tokens and append EOS; whether tokens were dropped."""
    tokens = np.asarray(tokens, np.int32)
    cut = length is not None and tokens.size > length - 1
    if cut:
        tokens = tokens[:length - 1]
    return np.concatenate([tokens, np.asarray([eos_id], np.int32)]), bool(cut)


class ExampleStream:
    """Base: `next_example()` (StopIteration at the end), `state()`, `restore(state)`, counters."""

    name: str

    def __init__(self, name: str, lengths: Mapping[str, int], warn: _OnceWarner):
        self.name, self.lengths, self._warn = name, dict(lengths), warn
        self.truncated = {k: 0 for k in self.lengths}
        self.examples = 0

    def _finish(self, inputs, targets, eos_id: int) -> Example:
        out = {}
        for key, tokens in (("inputs", inputs), ("targets", targets)):
            out[key], cut = _trim_eos(tokens, self.lengths.get(key), eos_id)
            if cut:
                self.truncated[key] += 1
                self._warn(self.name, f"truncated_{key}",
                           f"{key} longer than {self.lengths[key]} tokens are cut to fit")
        self.examples += 1
        return out

    @property
    def truncated_counts(self) -> dict[str, int]:
        return dict(self.truncated)

    def next_example(self) -> Example:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError


class TextToTextStream(ExampleStream):
    """One example per record of a fine-tuning task (its records are few: held in memory)."""

    def __init__(self, task: seqio.Task, split: str, lengths, order_args: dict, warn: _OnceWarner):
        super().__init__(task.name, lengths, warn)
        self._records = list(task.source.records(split))
        self._vocab = resolved(task.output_features["targets"].vocabulary)
        self._input_vocab = resolved(task.output_features["inputs"].vocabulary)
        self.order = RecordOrder(task.name, len(self._records), **order_args)
        self._next: tuple[int, int] | None = (0, 0)

    def next_example(self) -> Example:
        if self._next is None:
            raise StopIteration
        epoch, position = self._next
        record = self._records[self.order.record(epoch, position)]
        self._next = self.order.following(epoch, position)
        return self._finish(self._input_vocab.encode(record["inputs"]), self._vocab.encode(record["targets"]),
                            self._vocab.eos_id)

    def state(self) -> dict[str, Any]:
        return {"next": list(self._next) if self._next is not None else None}

    def restore(self, state: Mapping[str, Any]) -> None:
        self._next = tuple(state["next"]) if state["next"] is not None else None


class SpanCorruptionStream(ExampleStream):
    """Join documents (EOS between them), cut the token stream into full chunks, corrupt spans."""

    def __init__(self, task: seqio.Task, corpus: corpus_index.CorpusSplit, lengths, order_args: dict,
                 warn: _OnceWarner, seed: int, noise_density: float, mean_noise_span_length: float):
        super().__init__(task.name, lengths, warn)
        self.corpus = corpus
        self._vocab = resolved(task.output_features["targets"].vocabulary)
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.chunk_length, _ = span_corruption.chunk_length_for(lengths["inputs"], noise_density,
                                                                mean_noise_span_length)
        self.order = RecordOrder(task.name, len(corpus), **order_args)
        self._noise_key = mix(seed, name_key(task.name), order_args["shard_index"])
        self._next: tuple[int, int] | None = (0, 0)
        self._current: dict | None = None  # {"epoch", "position", "offset"} of the record being cut
        self._tokens = np.zeros([0], np.int32)
        self.chunks = 0

    def _read(self, epoch: int, position: int) -> np.ndarray:
        text = self.corpus.read(self.order.record(epoch, position))
        return np.asarray(self._vocab.encode(text) + [self._vocab.eos_id], np.int32)

    def _next_chunk(self) -> np.ndarray | None:
        pieces, have = [], 0
        while have < self.chunk_length:
            if self._current is None:
                if self._next is None:
                    break
                epoch, position = self._next
                self._tokens = self._read(epoch, position)
                self._current = {"epoch": epoch, "position": position, "offset": 0}
                self._next = self.order.following(epoch, position)
            offset = self._current["offset"]
            take = min(self.chunk_length - have, len(self._tokens) - offset)
            pieces.append(self._tokens[offset:offset + take])
            have += take
            self._current["offset"] = offset + take
            if self._current["offset"] == len(self._tokens):
                self._current = None
        return np.concatenate(pieces) if pieces else None

    def next_example(self) -> Example:
        while True:
            chunk = self._next_chunk()
            if chunk is None:
                raise StopIteration
            if chunk.size >= 2:  # only the last chunk of a finite stream can be shorter
                break
        seed = np.asarray([self._noise_key >> 1, self.chunks], np.int64)
        self.chunks += 1
        inputs, targets = span_corruption.span_corrupt_example(
            chunk, seed, self._vocab.vocab_size, self.noise_density, self.mean_noise_span_length)
        return self._finish(inputs, targets, self._vocab.eos_id)

    def state(self) -> dict[str, Any]:
        return {"next": list(self._next) if self._next is not None else None,
                "current": dict(self._current) if self._current is not None else None, "chunks": self.chunks}

    def restore(self, state: Mapping[str, Any]) -> None:
        self._next = tuple(state["next"]) if state["next"] is not None else None
        self._current = dict(state["current"]) if state["current"] is not None else None
        self.chunks = int(state["chunks"])
        if self._current is not None:  # the record being cut: read it again, continue at its offset
            self._tokens = self._read(self._current["epoch"], self._current["position"])
            if not 0 < self._current["offset"] < len(self._tokens):
                raise DataError(f"task {self.name!r}: the saved data position does not match the corpus "
                                f"(a file changed since the checkpoint was written?)")


class MixtureStream(ExampleStream):
    """Examples of several tasks at fixed rates; a finite task that ends leaves the draw."""

    def __init__(self, name: str, streams: Sequence[ExampleStream], rates: Sequence[float], seed: int,
                 lengths, warn: _OnceWarner):
        super().__init__(name, lengths, warn)
        if not streams or any(r <= 0 for r in rates):
            raise ConfigError(f"mixture {name!r} needs tasks with positive rates, got {list(rates)}")
        self.streams, self.rates = list(streams), np.asarray(rates, np.float64)
        self._key = mix(seed, name_key(name))
        self._ended: set[int] = set()

    def next_example(self) -> Example:
        while len(self._ended) < len(self.streams):
            rates = np.where([i in self._ended for i in range(len(self.streams))], 0.0, self.rates)
            draw = np.random.default_rng([self._key >> 1, self.examples]).random()
            choice = int(np.searchsorted(np.cumsum(rates) / rates.sum(), draw, side="right"))
            choice = min(choice, len(self.streams) - 1)
            try:
                example = self.streams[choice].next_example()
            except StopIteration:
                self._ended.add(choice)
                continue
            self.examples += 1
            # Which task of the mixture: prompt tuning serves the k-th task with prompt row k.
            return {**example, "task_index": np.asarray(choice, np.int32)}
        raise StopIteration

    @property
    def truncated_counts(self) -> dict[str, int]:
        return {k: sum(s.truncated[k] for s in self.streams) for k in self.lengths}

    def state(self) -> dict[str, Any]:
        return {"examples": self.examples, "ended": sorted(self._ended),
                "tasks": {s.name: s.state() for s in self.streams}}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.examples = int(state["examples"])
        self._ended = set(state["ended"])
        for stream in self.streams:
            stream.restore(state["tasks"][stream.name])


def build_stream(provider: seqio.DatasetProviderBase, split: str, lengths: Mapping[str, int], *, seed: int,
                 shuffle: bool, num_epochs: int | None, shard_index: int = 0, num_shards: int = 1,
                 warn: _OnceWarner | None = None) -> ExampleStream:
    """The resumable stream of a registered CPM-2 task or mixture."""
    from cpm2_jax.tasks import pretraining

    warn = warn or WARN_ONCE
    if split not in provider.splits:
        raise ConfigError(f"{provider.name!r} has no split {split!r}; it has {sorted(provider.splits)}")
    order_args = dict(seed=seed, shuffle=shuffle, shard_index=shard_index, num_shards=num_shards,
                      num_epochs=num_epochs)
    if isinstance(provider, seqio.Mixture):
        tasks = list(provider.tasks)
        streams = [build_stream(t, split, lengths, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                shard_index=shard_index, num_shards=num_shards, warn=warn) for t in tasks]
        return MixtureStream(provider.name, streams, [provider.get_rate(t) for t in tasks], seed, lengths, warn)
    source = provider.source
    if isinstance(source, pretraining.CorpusSource):
        noise_density, mean_span = pretraining.span_settings(provider.name)
        corpus = corpus_index.CorpusSplit(provider.name, split, source.files(split), where=source.where(split))
        return SpanCorruptionStream(provider, corpus, lengths, order_args, warn, seed, noise_density, mean_span)
    if isinstance(source, sources.RecordSource):
        return TextToTextStream(provider, split, lengths, order_args, warn)
    raise ConfigError(f"{provider.name!r} is not a CPM-2 task (its source is {type(source).__name__}); "
                      f"the batch iterator reads tasks made by cpm2_jax.tasks")
