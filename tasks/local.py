"""Local real tasks over the project's shared data snapshot (../shared/data, see its README).

Files live in the data directory (`settings.data_dir()`, or `$CPM2_DATA_DIR_LOCAL` for
these four only) under the names `<task>_<split>.jsonl`; `local_files.overrides` (gin)
renames them.

* `en_zh`: English -> Chinese translation of software messages (BLEU, zh tokeniser).
* `man_summary_zh`: DESCRIPTION of a Chinese man page -> its one-line NAME (char ROUGE-L).
* `poem_next_line`: first half of a couplet + four candidates -> 一..四 (accuracy).
* `translation_match`: an (English, Chinese) pair -> 是 when they translate each other,
  否 for a mismatched pair; each English message appears once with its own translation
  and once with another message's, so labels are balanced. A sentence-pair task with
  `<sep>` between the two sides: the local stand-in for LCQMC.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import gin

from cpm2_jax.errors import DataError
from cpm2_jax.tasks import metrics, sources
from cpm2_jax.tasks.downstream import SEP, strip_postprocess, translation_example
from cpm2_jax.tasks.text_to_text import TaskSpec, choice_label, choices_text

MATCH_LABELS = ("否", "是")
SPLITS = ("train", "validation")


@gin.configurable
def local_files(task: str, overrides: Mapping[str, Mapping[str, list]] | None = None) -> dict:
    """Split -> file patterns of a local task, relative to the data directory."""
    stem = "en_zh" if task == "translation_match" else task
    files = {split: [f"{stem}_{split}.jsonl"] for split in SPLITS}
    files.update((overrides or {}).get(task, {}))
    return files


def summary_example(record: dict) -> dict:
    return {"inputs": f"摘要：{record['document']}", "targets": record["summary"]}


def poem_example(record: dict) -> dict:
    options = list(record["options"])
    if not all(isinstance(o, str) for o in options):
        raise ValueError("options must be text")
    return {"inputs": f"上句：{record['first']}选项：{choices_text(options)}",
            "targets": choice_label(int(record["label"]), len(options))}


def pair_fields(record: dict) -> dict:
    if not isinstance(record["en"], str) or not isinstance(record["zh"], str):
        raise ValueError("en and zh must be text")
    return {"inputs": record["en"], "targets": record["zh"]}


def _stable_offset(text: str, count: int) -> int:
    """A deterministic offset in 1..count-1 from a hash of `text` (same on every machine)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "little") % (count - 1)


def match_examples(split: str, pairs: list[dict]) -> list[dict]:
    """True pair and one mismatched pair per English message, interleaved.

    The mismatched Chinese side is taken a hash-chosen distance away in the split, moved
    on until its text differs from the true translation.
    """
    del split
    if len(pairs) < 2:
        raise DataError("translation_match needs at least two pairs to mismatch")
    out = []
    for i, pair in enumerate(pairs):
        en, zh = pair["inputs"], pair["targets"]
        out.append({"inputs": f"英文：{en}{SEP}中文：{zh}", "targets": MATCH_LABELS[1]})
        j = (i + _stable_offset(en, len(pairs))) % len(pairs)
        for _ in range(len(pairs)):
            if pairs[j]["targets"] != zh:
                break
            j = (j + 1) % len(pairs)
        else:
            continue
        out.append({"inputs": f"英文：{en}{SEP}中文：{pairs[j]['targets']}", "targets": MATCH_LABELS[0]})
    return out


def specs() -> list[TaskSpec]:
    jsonl = sources.read_jsonl
    return [
        TaskSpec("en_zh", "local", local_files("en_zh"), jsonl, translation_example, [metrics.translation_metrics],
                 postprocess_fn=strip_postprocess, subdir=""),
        TaskSpec("man_summary_zh", "local", local_files("man_summary_zh"), jsonl, summary_example,
                 [metrics.summary_metrics], postprocess_fn=strip_postprocess, subdir=""),
        TaskSpec("poem_next_line", "local", local_files("poem_next_line"), jsonl, poem_example,
                 [metrics.accuracy], postprocess_fn=strip_postprocess, subdir=""),
        TaskSpec("translation_match", "local", local_files("translation_match"), jsonl, pair_fields,
                 [metrics.accuracy], postprocess_fn=strip_postprocess, subdir="", transform=match_examples),
    ]
