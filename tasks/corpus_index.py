"""Random access to the documents of a pre-training corpus: byte offsets per split.

The global shuffle reads document `permutation[i]` directly, so a resume never reads the
documents before it. One pass over each file (once per process, then cached in memory)
records where each non-blank line starts, checks it (JSON, UTF-8, a text field) and
hashes its text for the hold-out:

* validation = documents with `to_hash_bucket_fast(text, 100) == 0` (the rule of
  `pretraining.holdout`, which the seqio datasets apply: both paths hold out the same
  documents); when that bucket is empty and there are at least two documents, the last
  one instead; train = the rest. A split left empty raises `DataError` naming the task,
  split and files.
* a malformed line follows the malformed-record policy at the pass (skipped and
  counted, or `DataError` naming file and line under 'fail') and is in neither split.

`CorpusSplit.read(i)` then reads, decodes and returns document i of the split, and counts
the reads (`reads`), which the resume tests use.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import threading
from typing import Sequence

import numpy as np

from cpm2_jax.errors import DataError
from cpm2_jax.tasks import sources

VALIDATION_BUCKETS = 100
_HASH_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class FileIndex:
    """Usable documents of one file: byte offset, 1-based line, hold-out bucket."""

    path: pathlib.Path
    offsets: np.ndarray
    lines: np.ndarray
    buckets: np.ndarray
    malformed: tuple[tuple[int, str], ...]  # (line, reason)


def document_text(path: pathlib.Path, raw: bytes, text_field: str = "text") -> "str | sources.Malformed":
    """The text of one line as `sources.read_documents` reads it: JSON Lines or plain text."""
    if path.suffix in (".jsonl", ".json"):
        record = sources.parse_json_line(raw)
        if isinstance(record, sources.Malformed):
            return record
        if text_field not in record:
            return sources.Malformed(f"missing key '{text_field}'")
        if not isinstance(record[text_field], str):
            return sources.Malformed(f"field {text_field!r} is {type(record[text_field]).__name__}, not text")
        return record[text_field]
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        return sources.Malformed(f"not UTF-8 ({err.reason})")


def _buckets(texts: list[str]) -> np.ndarray:
    import tensorflow as tf

    out = [tf.strings.to_hash_bucket_fast(texts[i:i + _HASH_BATCH], VALIDATION_BUCKETS).numpy()
           for i in range(0, len(texts), _HASH_BATCH)]
    return np.concatenate(out).astype(np.int8) if out else np.zeros([0], np.int8)


@functools.lru_cache(maxsize=32)
def _file_index(path: str, size: int, mtime_ns: int) -> FileIndex:
    del size, mtime_ns  # cache key: a changed file is indexed again
    offsets, lines, texts, malformed = [], [], [], []
    position = 0
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                start, position = position, position + len(raw)
                if not raw.strip():
                    continue
                text = document_text(pathlib.Path(path), raw)
                if isinstance(text, sources.Malformed):
                    malformed.append((number, text.reason))
                    continue
                offsets.append(start)
                lines.append(number)
                texts.append(text)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return FileIndex(pathlib.Path(path), np.asarray(offsets, np.int64), np.asarray(lines, np.int64),
                     _buckets(texts), tuple(malformed))


def file_index(path: pathlib.Path) -> FileIndex:
    stat = os.stat(path)
    return _file_index(str(path), stat.st_size, stat.st_mtime_ns)


class CorpusSplit:
    """The documents of one split of a corpus (several files), in file order, by index."""

    def __init__(self, task: str, split: str, files: Sequence[pathlib.Path], where: str = ""):
        if split not in ("train", "validation"):
            raise DataError(f"task {task!r} has no split {split!r}; it has ['train', 'validation']")
        self.task, self.split, self.files = task, split, [pathlib.Path(f) for f in files]
        indices = [file_index(f) for f in self.files]
        for index in indices:
            warned = 0
            for line, reason in index.malformed:
                warned = sources.note_malformed(task, split, index.path, line, reason, warned)
        file_of = np.concatenate([np.full(len(ix.offsets), k, np.int32) for k, ix in enumerate(indices)])
        offsets = np.concatenate([ix.offsets for ix in indices])
        lines = np.concatenate([ix.lines for ix in indices])
        held = np.concatenate([ix.buckets for ix in indices]) == 0
        if not held.any() and len(held) >= 2:
            held[-1] = True  # a small corpus: the last document stands in for the empty bucket
        keep = held if split == "validation" else ~held
        if not keep.any():
            where = where or ", ".join(str(f) for f in self.files)
            total = len(held)
            if split == "validation":
                raise DataError(
                    f"task {task!r} split 'validation': the hold-out left it empty: {total} document(s) in {where}; "
                    f"it needs at least 2 (it keeps 1 in {VALIDATION_BUCKETS}, at least one). Hint: give the corpus "
                    f"more documents (e.g. split long texts into several), or evaluate on another task")
            raise DataError(
                f"task {task!r} split 'train': all {total} document(s) in {where} fell in the validation hold-out "
                f"(1 in {VALIDATION_BUCKETS} by text hash). Hint: give the corpus more documents")
        self._file_of, self._offsets, self._lines = file_of[keep], offsets[keep], lines[keep]
        self._lock = threading.Lock()
        self.reads = 0

    def __len__(self) -> int:
        return len(self._offsets)

    def location(self, i: int) -> str:
        return f"{self.files[self._file_of[i]]}:{self._lines[i]}"

    def read(self, i: int) -> str:
        """Text of document i (one seek and one line read)."""
        path = self.files[self._file_of[i]]
        try:
            with open(path, "rb") as handle:
                handle.seek(int(self._offsets[i]))
                raw = handle.readline()
        except OSError as err:
            raise DataError(f"task {self.task!r}: cannot read {path}: {err.strerror or err}") from None
        text = document_text(path, raw)
        if isinstance(text, sources.Malformed):  # the file changed since it was indexed
            raise DataError(f"task {self.task!r}: {self.location(i)} changed while reading: {text.reason}")
        with self._lock:
            self.reads += 1
        counts = sources.stats(self.task, self.split)
        counts.records += 1
        return text
