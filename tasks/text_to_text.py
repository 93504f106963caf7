"""Build a seqio Task from records already formatted as text-to-text strings.

Every fine-tuning task here is a reader (public file format -> raw record) plus a pure
formatter (raw record -> `{"inputs": str, "targets": str, ...metadata}`); this module
turns that pair into a seqio Task: tokenize, trim + EOS with truncation counted, and the
task's postprocessor and metrics. Metadata fields (answers, query ids) ride along as
strings for the postprocessor and never reach the model.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Callable, Mapping, Sequence

import seqio

from cpm2_jax.tasks import settings, sources, truncation

NUMBER_WORDS = ("一", "二", "三", "四", "五", "六", "七", "八")

Formatter = Callable[[dict], dict]


def choices_text(options: Sequence[str]) -> str:
    """'一：A；二：B；…' — options numbered with Chinese numerals, as CPM-2's prompts."""
    if not 1 <= len(options) <= len(NUMBER_WORDS):
        raise ValueError(f"expected 1..{len(NUMBER_WORDS)} options, got {len(options)}")
    return "；".join(f"{NUMBER_WORDS[i]}：{option}" for i, option in enumerate(options))


def choice_label(index: int, count: int) -> str:
    if not 0 <= index < count:
        raise ValueError(f"answer index {index} outside 0..{count - 1}")
    return NUMBER_WORDS[index]


def formatted_reader(reader: Callable, formatter: Formatter) -> sources.Reader:
    """Reader of raw records -> reader of formatted ones; a formatter error marks the record bad."""

    def read(path: pathlib.Path):
        for line, raw in reader(path):
            if isinstance(raw, sources.Malformed):
                yield line, raw
                continue
            try:
                yield line, formatter(raw)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
                reason = f"missing field {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
                yield line, sources.Malformed(reason)

    return read


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What distinguishes one text-to-text task from another."""

    name: str
    dataset: str  # directory key for settings.task_dir
    split_files: Mapping[str, Sequence[str]]
    reader: Callable
    formatter: Formatter
    metric_fns: Sequence[Callable] = ()
    metadata: Sequence[str] = ()
    postprocess_fn: Callable | None = None
    subdir: str | None = None
    transform: Callable | None = None


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def build_task(spec: TaskSpec, vocabulary: seqio.Vocabulary | None = None,
               directory: pathlib.Path | None = None) -> seqio.Task:
    """The seqio Task of `spec`; `directory` overrides the configured one (tests)."""
    vocabulary = vocabulary or settings.default_vocabulary()
    if directory is not None:
        locate = lambda: pathlib.Path(directory)  # noqa: E731
    else:
        locate = functools.partial(settings.task_dir, spec.dataset, spec.name, spec.subdir)
    source = sources.RecordSource(
        task=spec.name, directory=locate, split_files=spec.split_files,
        reader=formatted_reader(spec.reader, spec.formatter),
        fields=("inputs", "targets", *spec.metadata), eager=True, transform=spec.transform)
    return seqio.Task(
        spec.name,
        source=source,
        output_features=output_features(vocabulary),
        preprocessors=[
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
            truncation.append_eos_after_trim_counted,
        ],
        postprocess_fn=spec.postprocess_fn,
        metric_fns=list(spec.metric_fns),
    )


def register(specs: Sequence[TaskSpec], vocabulary: seqio.Vocabulary | None = None) -> None:
    for spec in specs:
        seqio.TaskRegistry.remove(spec.name)
        seqio.TaskRegistry.add_provider(spec.name, build_task(spec, vocabulary))


def examples(spec: TaskSpec, split: str, directory: pathlib.Path | None = None) -> list[dict]:
    """The formatted text examples of a split, without tokenizing (tests, `cpm2 data show`)."""
    locate = (lambda: pathlib.Path(directory)) if directory is not None else functools.partial(
        settings.task_dir, spec.dataset, spec.name, spec.subdir)
    source = sources.RecordSource(
        task=spec.name, directory=locate, split_files=spec.split_files,
        reader=formatted_reader(spec.reader, spec.formatter),
        fields=("inputs", "targets", *spec.metadata), eager=True, transform=spec.transform)
    return list(source.records(split))
