"""Record sources for seqio tasks: files under a data directory, with clear errors.

A reader turns one file into `(line, item)` pairs, where an item is a record (a dict of
strings) or a `Malformed(reason)` for a bad one (yielded, not raised, so reading goes on). `RecordSource` wraps readers
into a `seqio.FunctionDataSource` and enforces the rules every task shares:

* a missing directory or file raises `DataError` naming the path and the task;
* a malformed record names the file and line; it is skipped and counted (policy 'skip',
  see `settings.malformed_policy`) or raises (policy 'fail');
* a split that yields no record at all raises: never a silent empty dataset.

Small (fine-tuning) files are read eagerly when the dataset is built, so errors surface
as plain `DataError`s; large pre-training corpora stream through a generator.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import pathlib
import threading
from typing import Callable, Iterator, Mapping, Sequence

import seqio
import tensorflow as tf

from cpm2_jax.errors import DataError
from cpm2_jax.tasks import settings

log = logging.getLogger(__name__)
_WARN_PER_FILE = 5


@dataclasses.dataclass(frozen=True)
class Malformed:
    """What a reader yields for a bad record, at its 1-based line (or record number)."""

    reason: str


Record = dict[str, str]
Reader = Callable[[pathlib.Path], Iterator[tuple[int, "Record | Malformed"]]]


@dataclasses.dataclass
class SourceStats:
    """Counts for one (task, split): records read and malformed records skipped, per file."""

    records: int = 0
    skipped: int = 0
    skipped_by_file: dict[str, int] = dataclasses.field(default_factory=lambda: collections.Counter())


_STATS: dict[tuple[str, str], SourceStats] = collections.defaultdict(SourceStats)
_STATS_LOCK = threading.Lock()


def stats(task: str, split: str) -> SourceStats:
    """Malformed-record counts of a task's split, summed over every pass made so far."""
    return _STATS[(task, split)]


def reset_stats() -> None:
    _STATS.clear()


def read_records(task: str, split: str, files: Sequence[pathlib.Path], reader: Reader,
                 fields: Sequence[str]) -> Iterator[Record]:
    """Records of `files` in order, applying the malformed-record policy and counting."""
    settings.malformed_policy()  # a bad policy setting fails before any file is read
    counts = _STATS[(task, split)]
    produced = 0
    for path in files:
        warned = 0
        for line, record in reader(path):
            if not isinstance(record, Malformed):
                missing = [f for f in fields if f not in record]
                if missing:
                    record = Malformed(f"missing field(s) {missing}")
            if isinstance(record, Malformed):
                warned = note_malformed(task, split, path, line, record.reason, warned)
                continue
            produced += 1
            with _STATS_LOCK:
                counts.records += 1
            yield {f: record[f] for f in fields}
    if produced == 0:
        names = ", ".join(str(p) for p in files)
        raise DataError(f"task {task!r} split {split!r}: no usable record in {names} "
                        f"({counts.skipped} malformed skipped)")


def note_malformed(task: str, split: str, path: pathlib.Path, line: int, reason: str, warned: int) -> int:
    """Apply the malformed-record policy to one bad record: raise naming file and line
    ('fail'), or count it and warn for the first few of a file ('skip'); returns `warned`."""
    where = f"{path}:{line}"
    if settings.malformed_policy() == "fail":
        raise DataError(f"task {task!r}: malformed record at {where}: {reason}")
    counts = _STATS[(task, split)]
    with _STATS_LOCK:
        counts.skipped += 1
        counts.skipped_by_file[str(path)] += 1
    if warned < _WARN_PER_FILE:
        log.warning("task %r: skipping malformed record at %s: %s", task, where, reason)
        warned += 1
    return warned


def resolve_files(task: str, directory: pathlib.Path, patterns: Sequence[str]) -> list[pathlib.Path]:
    """Expand `patterns` under `directory`; a missing directory or match names path and task."""
    if not directory.is_dir():
        raise DataError(f"task {task!r}: data directory not found: {directory}")
    files: list[pathlib.Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(directory / pattern)))
        if not matches:
            raise DataError(f"task {task!r}: data file not found: {directory / pattern}")
        files += [pathlib.Path(m) for m in matches]
    return files


class RecordSource(seqio.FunctionDataSource):
    """A seqio source over per-split file patterns in a directory chosen at read time.

    `directory` is a callable so that the data directory setting is read when a dataset
    is built, not when the task is registered.
    """

    def __init__(self, task: str, directory: Callable[[], pathlib.Path], split_files: Mapping[str, Sequence[str]],
                 reader: Reader, fields: Sequence[str], eager: bool = True,
                 transform: Callable[[str, list[Record]], list[Record]] | None = None):
        self._task, self._directory = task, directory
        self._split_files = {k: list(v) for k, v in split_files.items()}
        self._reader, self._fields, self._eager, self._transform = reader, tuple(fields), eager, transform
        super().__init__(dataset_fn=self._dataset_fn, splits=tuple(self._split_files))

    def files(self, split: str) -> list[pathlib.Path]:
        if split not in self._split_files:
            raise DataError(f"task {self._task!r} has no split {split!r}; it has {sorted(self._split_files)}")
        return resolve_files(self._task, self._directory(), self._split_files[split])

    def records(self, split: str) -> Iterator[Record]:
        records = read_records(self._task, split, self.files(split), self._reader, self._fields)
        if self._transform is not None:
            return iter(self._transform(split, list(records)))
        return records

    def _dataset_fn(self, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # Files are read in order; the task shuffles examples.
        spec = {f: tf.TensorSpec([], tf.string) for f in self._fields}
        if self._eager:
            rows = list(self.records(split))
            return tf.data.Dataset.from_tensor_slices({f: [r[f] for r in rows] for f in self._fields})
        files = self.files(split)
        return tf.data.Dataset.from_generator(
            lambda: read_records(self._task, split, files, self._reader, self._fields), output_signature=spec)


# ----------------------------------------------------------------------------- readers


def read_jsonl(path: pathlib.Path) -> Iterator[tuple[int, "dict | Malformed"]]:
    """JSON Lines: one object a line; blank lines ignored; values kept as parsed.

    A line that is not valid UTF-8 is malformed like broken JSON (never decoded to U+FFFD).
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, parse_json_line(raw)


def parse_json_line(raw: bytes) -> "dict | Malformed":
    """One JSON Lines record from its bytes, or why it is malformed."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Malformed(f"not UTF-8 (byte {err.start + 1}: {err.reason})")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        return Malformed(f"invalid JSON ({err.msg} at column {err.colno})")
    if not isinstance(value, dict):
        return Malformed(f"expected a JSON object, got {type(value).__name__}")
    return value


def text_fields(reader: Reader, mapping: Mapping[str, "str | Callable[[dict], str]"]) -> Reader:
    """Adapt a reader's raw records into string fields; a missing/ill-typed key is malformed.

    `mapping` maps an output field to an input key or to a function of the raw record
    (which may raise KeyError/TypeError/ValueError/IndexError to mark the record bad).
    """

    def read(path: pathlib.Path):
        for number, raw in reader(path):
            if isinstance(raw, Malformed):
                yield number, raw
                continue
            try:
                out = {}
                for field, key in mapping.items():
                    value = key(raw) if callable(key) else raw[key]
                    if not isinstance(value, str):
                        raise TypeError(f"field {field!r} is {type(value).__name__}, not text")
                    out[field] = value
            except KeyError as err:
                yield number, Malformed(f"missing key {err}")
                continue
            except (TypeError, ValueError, IndexError) as err:
                yield number, Malformed(str(err))
                continue
            yield number, out

    return read


def read_text_lines(path: pathlib.Path):
    """Plain text: one document a line (`text`); blank lines ignored; bad UTF-8 is malformed."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, Malformed(f"not UTF-8 ({err.reason})")
                continue
            if line.strip():
                yield number, {"text": line.rstrip("\r\n")}


def read_documents(path: pathlib.Path, text_field: str = "text"):
    """Pre-training documents: `.jsonl`/`.json` records with a text field, else text lines."""
    if path.suffix in (".jsonl", ".json"):
        return text_fields(read_jsonl, {"text": text_field})(path)
    return read_text_lines(path)
