"""Pre-training tasks: span corruption over Chinese and English text, and their 2:1 mixture.

CPM-2's bilingual stage trains on Chinese and English at a 2:1 rate (CPM2_FACTS.md,
"English:Chinese data 1:2"). Documents come from JSON Lines (field `text`) or plain-text
files under the data directory; which files is gin-configurable (`corpus_files`).
1% of documents, chosen by a stable hash of their text, form the validation split; a
corpus of two or more documents that the hash leaves without one gives its last document
to validation instead (`holdout`), and a split that would still be empty raises
`DataError`: neither split is ever silently empty.

Examples are full: documents are joined (EOS between them) and cut into the raw length
whose span-corrupted inputs fill the input length exactly (568 -> 512, targets 114 at
noise 0.15 / mean span 3; `span_corruption.feature_lengths_for`). Training batches come
from `streams.SpanCorruptionStream` (global shuffle, constant-time resume); the seqio
Task below computes the same steps in file order for seqio's consumers.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from cpm2_jax.errors import DataError
from cpm2_jax.tasks import settings, sources, span_corruption, truncation

ZH_TASK, EN_TASK, BILINGUAL_MIXTURE = "cpm2_pretrain_zh", "cpm2_pretrain_en", "cpm2_pretrain_bilingual"
ZH_TO_EN_RATE = 2.0
VALIDATION_BUCKETS = 100  # one document in 100 is held out


@gin.configurable
def corpus_files(language: str, zh: Sequence[str] = ("zh_mono.jsonl",),
                 en: Sequence[str] = ("en_mono.jsonl",)) -> list[str]:
    """File patterns (relative to the data directory) of the `language` corpus."""
    return list({"zh": zh, "en": en}[language])


def holdout(dataset: tf.data.Dataset, split: str, task: str = "?", where: str = "?") -> tf.data.Dataset:
    """The `split` part of a document stream: the validation bucket of a stable text hash, or the rest.

    A document is held out for validation when `to_hash_bucket_fast(text, 100) == 0`.
    When a pass ends with no document in that bucket (a small corpus) and at least two
    documents were read, the last document is held out instead: 'validation' yields it
    and 'train' drops it. The rule needs no extra pass: 'train' yields each document one
    document late and decides about the last one at the end of the stream, so corpora
    whose hash bucket is non-empty split exactly as by the hash alone, in the same order.
    A split left empty all the same (a one-document corpus, or every document hashed to
    validation) raises `DataError` at the end of the pass, naming `task`, the split and
    `where` (the data directory and files).
    """
    if split not in ("train", "validation"):
        raise DataError(f"task {task!r} has no split {split!r}; it has ['train', 'validation']")
    validation = split == "validation"

    def tag(example):
        held = tf.equal(tf.strings.to_hash_bucket_fast(example["text"], VALIDATION_BUCKETS), 0)
        return example["text"], held, tf.constant(False)

    end = tf.data.Dataset.from_tensors((tf.constant(""), tf.constant(False), tf.constant(True)))
    tagged = dataset.map(tag).concatenate(end)
    zero = tf.constant(0, tf.int64)
    # State: the last document not in the hash bucket, whether there is one, documents in
    # the bucket, documents read, documents this split has yielded.
    initial = (tf.constant(""), tf.constant(False), zero, zero, zero)

    def step(state, element):
        pending, has_pending, held, count, kept = state
        text, in_bucket, last = element
        document = tf.logical_not(last)
        fallback = tf.logical_and(tf.equal(held, 0), count >= 2)  # only read at the end marker
        if validation:
            emit = tf.logical_or(tf.logical_and(document, in_bucket), tf.logical_and(last, fallback))
            out = tf.where(in_bucket, text, pending)
        else:
            keep_last = tf.logical_and(has_pending, tf.logical_not(fallback))
            emit = tf.where(last, keep_last, tf.logical_and(tf.logical_not(in_bucket), has_pending))
            out = pending
        other = tf.logical_and(document, tf.logical_not(in_bucket))
        kept = kept + tf.cast(emit, tf.int64)
        state = (tf.where(other, text, pending), tf.logical_or(has_pending, other),
                 held + tf.cast(tf.logical_and(document, in_bucket), tf.int64),
                 count + tf.cast(document, tf.int64), kept)
        empty = tf.logical_and(last, tf.equal(kept, 0))
        return state, (out, emit, empty, count)

    def fail(count):
        count = int(count)
        if validation:
            raise DataError(
                f"task {task!r} split 'validation': the hold-out left it empty: {count} document(s) in {where}; "
                f"it needs at least 2 (it keeps 1 in {VALIDATION_BUCKETS}, at least one). Hint: give the corpus "
                f"more documents (e.g. split long texts into several), or evaluate on another task")
        raise DataError(
            f"task {task!r} split 'train': all {count} document(s) in {where} fell in the validation hold-out "
            f"(1 in {VALIDATION_BUCKETS} by text hash). Hint: give the corpus more documents")

    def check(out, emit, empty, count):
        del emit
        raised = tf.cond(empty, lambda: tf.py_function(fail, [count], tf.bool), lambda: tf.constant(False))
        with tf.control_dependencies([raised]):
            return {"text": tf.identity(out)}

    return (tagged.scan(initial, step)
            .filter(lambda out, emit, empty, count: tf.logical_or(emit, empty))
            .map(check))


class CorpusSource(sources.RecordSource):
    """Streams documents of one language; train/validation come from the same files."""

    def __init__(self, task: str, language: str, files: Sequence[str] | None = None, directory=None):
        patterns = list(files) if files is not None else None
        self._language = language
        super().__init__(
            task=task,
            directory=directory or (lambda: settings.data_dir(task)),
            split_files={"train": [], "validation": []},
            reader=sources.read_documents,
            fields=("text",),
            eager=False,
        )
        self._patterns = patterns

    def files(self, split: str):
        patterns = self._patterns if self._patterns is not None else corpus_files(self._language)
        return sources.resolve_files(self._task, self._directory(), patterns)

    def where(self, split: str) -> str:
        """'data dir D (files)': how errors name this corpus."""
        directory = self._directory()
        files = self.files(split)
        names = [str(f.relative_to(directory)) if f.is_relative_to(directory) else str(f) for f in files]
        return f"data dir {directory} ({', '.join(names)})"

    def _dataset_fn(self, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        if split not in ("train", "validation"):
            raise DataError(f"task {self._task!r} has no split {split!r}; it has ['train', 'validation']")
        files = self.files(split)
        dataset = tf.data.Dataset.from_generator(
            functools.partial(sources.read_records, self._task, split, files, self._reader, self._fields),
            output_signature={"text": tf.TensorSpec([], tf.string)})
        return holdout(dataset, split, task=self._task, where=self.where(split))


def output_features(vocabulary: seqio.Vocabulary) -> Mapping[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


_SPAN_SETTINGS: dict[str, tuple[float, float]] = {}


def span_settings(task: str) -> tuple[float, float]:
    """(noise density, mean noise span length) of a span-corruption task."""
    return _SPAN_SETTINGS.get(task, (span_corruption.NOISE_DENSITY, span_corruption.MEAN_NOISE_SPAN_LENGTH))


def span_corruption_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
                         noise_density: float = span_corruption.NOISE_DENSITY,
                         mean_noise_span_length: float = span_corruption.MEAN_NOISE_SPAN_LENGTH) -> seqio.Task:
    """text -> tokens + EOS -> joined and cut into full chunks -> span corruption -> EOS.

    The batch iterator (`pipeline`, through `streams.SpanCorruptionStream`) computes the
    same steps in a resumable global shuffle; these seqio preprocessors serve seqio's
    consumers (`cpm2 data show`, evaluation) in file order.
    """
    _SPAN_SETTINGS[name] = (noise_density, mean_noise_span_length)
    return seqio.Task(
        name,
        source=source,
        output_features=output_features(vocabulary),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            functools.partial(span_corruption.span_corruption, noise_density=noise_density,
                              mean_noise_span_length=mean_noise_span_length),
            truncation.append_eos_after_trim_counted,
        ],
        metric_fns=[],
    )


def register(vocabulary: seqio.Vocabulary | None = None) -> None:
    """Register the zh and en tasks and the bilingual 2:1 mixture (idempotent)."""
    vocabulary = vocabulary or settings.default_vocabulary()
    for name, language in ((ZH_TASK, "zh"), (EN_TASK, "en")):
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add_provider(name, span_corruption_task(name, CorpusSource(name, language), vocabulary))
    seqio.MixtureRegistry.remove(BILINGUAL_MIXTURE)
    seqio.MixtureRegistry.add(BILINGUAL_MIXTURE, [(ZH_TASK, ZH_TO_EN_RATE), (EN_TASK, 1.0)])
