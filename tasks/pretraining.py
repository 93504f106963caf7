"""Pre-training tasks: span corruption over Chinese and English text, and their 2:1 mixture.

CPM-2's bilingual stage trains on Chinese and English at a 2:1 rate (CPM2_FACTS.md,
"English:Chinese data 1:2"). Documents come from JSON Lines (field `text`) or plain-text
files under the data directory; which files is gin-configurable (`corpus_files`).
1% of documents, chosen by a stable hash of their text, form the validation split.
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
DEFAULT_FEATURE_LENGTHS = {"inputs": 512, "targets": 256}
VALIDATION_BUCKETS = 100  # one document in 100 is held out


@gin.configurable
def corpus_files(language: str, zh: Sequence[str] = ("zh_mono.jsonl",),
                 en: Sequence[str] = ("en_mono.jsonl",)) -> list[str]:
    """File patterns (relative to the data directory) of the `language` corpus."""
    return list({"zh": zh, "en": en}[language])


def holdout(dataset: tf.data.Dataset, split: str) -> tf.data.Dataset:
    """Keep the validation bucket of a stable text hash for 'validation', the rest for 'train'."""
    def in_validation(example):
        return tf.equal(tf.strings.to_hash_bucket_fast(example["text"], VALIDATION_BUCKETS), 0)

    if split == "validation":
        return dataset.filter(in_validation)
    return dataset.filter(lambda ex: tf.logical_not(in_validation(ex)))


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

    def _dataset_fn(self, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        if split not in ("train", "validation"):
            raise DataError(f"task {self._task!r} has no split {split!r}; it has ['train', 'validation']")
        files = self.files(split)
        dataset = tf.data.Dataset.from_generator(
            functools.partial(sources.read_records, self._task, split, files, self._reader, self._fields),
            output_signature={"text": tf.TensorSpec([], tf.string)})
        return holdout(dataset, split)


def output_features(vocabulary: seqio.Vocabulary) -> Mapping[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def span_corruption_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
                         noise_density: float = span_corruption.NOISE_DENSITY,
                         mean_noise_span_length: float = span_corruption.MEAN_NOISE_SPAN_LENGTH) -> seqio.Task:
    """text -> tokens -> chunks -> span corruption -> EOS (trimmed and counted)."""
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
