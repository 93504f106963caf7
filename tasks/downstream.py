"""CPM-2's downstream tasks in their public file formats, as text-to-text seqio tasks.

Each dataset reads from its own directory (`settings.task_dir(<dataset>)`: by default
`<data dir>/<dataset>`, or `$CPM2_DATA_DIR_<DATASET>`); the file names per split are the
public release's and can be changed with gin (`dataset_files.overrides`).

| task | public format read | inputs -> targets | metric |
| --- | --- | --- | --- |
| cpm2_ccpm | JSON Lines `translation`, `choices` (4), `answer` (index) | options + modern text -> 一..四 | accuracy |
| cpm2_c3 | C3 JSON: `[[paragraphs], [{question, choice, answer}], id]` | question, options, passage -> 一..四 | accuracy |
| cpm2_lcqmc | TSV `sentence1<TAB>sentence2<TAB>label` (or JSON Lines of those keys) | s1 `<sep>` s2 -> 相似/矛盾 | accuracy |
| cpm2_wmt20_en_zh | line-aligned `*.en`/`*.zh` text, WMT `.sgm` (src/ref), or `en<TAB>zh` TSV | English -> Chinese | BLEU (zh) |
| cpm2_math23k | Math23K JSON (array, JSON Lines or concatenated objects): `original_text`, `equation`, `ans` | problem -> equation | answer accuracy |
| cpm2_lcsts | LCSTS `PART_*.txt` (`<doc><summary>…<short_text>…`) or JSON Lines `text`, `summary` | text -> summary | char ROUGE-L |
| cpm2_adgen | AdGen JSON Lines: `feature` [[k, v]…], `title`, `desc` (or `content` "k#v*k#v", `summary`) | attributes -> ad | BLEU, Distinct-n |
| cpm2_sogou_log | TSV `qid<TAB>query<TAB>document<TAB>label` | query `<sep>` document -> 相关/无关 | accuracy |
| cpm2_sogou_log_rank | same files, every target 相关, scored | query `<sep>` document -> 相关 | MRR |

Sentence-pair inputs put the `<sep>` marker between the two sentences (the vocabulary
encodes it as `SEP_ID`), where prompt tuning places its "middle" prompts.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Iterator, Mapping

import gin

from cpm2_jax.tasks import metrics, sources
from cpm2_jax.tasks.text_to_text import TaskSpec, choice_label, choices_text

SEP = "<sep>"
LCQMC_LABELS = ("矛盾", "相似")
RELEVANCE_LABELS = ("无关", "相关")

_DEFAULT_FILES = {
    "ccpm": {"train": ["train.jsonl"], "validation": ["valid.jsonl"], "test": ["test_public.jsonl"]},
    # CLUE names (d-train.json) and the original release's (c3-d-train.json) both match.
    "c3": {"train": ["*d-train.json", "*m-train.json"], "validation": ["*d-dev.json", "*m-dev.json"],
           "test": ["*d-test.json", "*m-test.json"]},
    "lcqmc": {"train": ["train.txt"], "validation": ["dev.txt"], "test": ["test.txt"]},
    "wmt20_en_zh": {"train": ["train.en"], "validation": ["newstest2019-enzh-src.en.sgm"],
                    "test": ["newstest2020-enzh-src.en.sgm"]},
    "math23k": {"train": ["math23k_train.json"], "validation": ["math23k_dev.json"], "test": ["math23k_test.json"]},
    "lcsts": {"train": ["PART_I.txt"], "validation": ["PART_II.txt"], "test": ["PART_III.txt"]},
    "adgen": {"train": ["train.json"], "validation": ["dev.json"], "test": ["test.json"]},
    "sogou_log": {"train": ["train.tsv"], "validation": ["dev.tsv"], "test": ["test.tsv"]},
}


@gin.configurable
def dataset_files(dataset: str, overrides: Mapping[str, Mapping[str, list]] | None = None) -> dict:
    """Split -> file patterns of `dataset`; gin `dataset_files.overrides = {"lcqmc": {...}}`."""
    files = dict(_DEFAULT_FILES[dataset])
    files.update((overrides or {}).get(dataset, {}))
    return files


def text(value) -> str:
    """Evaluator examples hold bytes; records hold str."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _must_be_text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be non-empty text")
    return value


# ----------------------------------------------------------------------------- CCPM


def ccpm_example(record: dict) -> dict:
    """Classical poetry matching: pick the poem line that renders the modern translation."""
    choices = [_must_be_text(c, "choice") for c in record["choices"]]
    translation = _must_be_text(record["translation"], "translation")
    return {"inputs": f"选项：{choices_text(choices)}。文章：{translation}",
            "targets": choice_label(int(record["answer"]), len(choices))}


# ----------------------------------------------------------------------------- C3


def read_json_document(path: pathlib.Path) -> Iterator[tuple[int, object]]:
    """Items of a top-level JSON array (numbered 1..n), or of JSON Lines / concatenated objects."""
    content = path.read_text(encoding="utf-8", errors="replace")
    stripped = content.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as err:
            yield err.lineno, sources.Malformed(f"invalid JSON ({err.msg})")
            return
        yield from enumerate(items, start=1)
        return
    decoder, position, line = json.JSONDecoder(), 0, 1
    while True:
        while position < len(content) and content[position].isspace():
            line += content[position] == "\n"
            position += 1
        if position >= len(content):
            return
        try:
            value, end = decoder.raw_decode(content, position)
        except json.JSONDecodeError as err:
            yield err.lineno, sources.Malformed(f"invalid JSON ({err.msg})")
            # Resynchronise at the next line that opens an object.
            following = content.find("\n{", position + 1)
            if following < 0:
                return
            line += content.count("\n", position, following + 1)
            position = following + 1
            continue
        yield line, value
        line += content.count("\n", position, end)
        position = end


def read_c3(path: pathlib.Path):
    """One record per question: C3 documents hold several questions over one passage."""
    for number, item in read_json_document(path):
        if isinstance(item, sources.Malformed):
            yield number, item
            continue
        try:
            paragraphs, questions = item[0], item[1]
            context = "\n".join(_must_be_text(p, "paragraph") for p in paragraphs)
            batch = [{"context": context, "question": q["question"], "choice": q["choice"], "answer": q["answer"]}
                     for q in questions]
        except (TypeError, KeyError, IndexError) as err:
            yield number, sources.Malformed(f"not a C3 document ({type(err).__name__}: {err})")
            continue
        for record in batch:
            yield number, record


def c3_example(record: dict) -> dict:
    choices = [_must_be_text(c, "choice") for c in record["choice"]]
    if record["answer"] not in choices:
        raise ValueError(f"answer {record['answer']!r} is not one of the choices")
    question = _must_be_text(record["question"], "question")
    return {"inputs": f"问题：{question}选项：{choices_text(choices)}。文章：{record['context']}",
            "targets": choice_label(choices.index(record["answer"]), len(choices))}


# ----------------------------------------------------------------------------- LCQMC


def read_tsv(path: pathlib.Path, columns: tuple[str, ...]):
    """Tab-separated rows named by `columns`; a header row equal to the names is skipped."""
    if path.suffix in (".jsonl", ".json"):
        yield from sources.read_jsonl(path)
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield number, sources.Malformed(f"not UTF-8 ({err.reason})")
                continue
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != len(columns):
                yield number, sources.Malformed(f"expected {len(columns)} tab-separated columns, got {len(cells)}")
                continue
            if number == 1 and tuple(c.strip().lower() for c in cells) == columns:
                continue
            yield number, dict(zip(columns, cells))


def read_lcqmc(path: pathlib.Path):
    return read_tsv(path, ("sentence1", "sentence2", "label"))


def lcqmc_example(record: dict) -> dict:
    """Sentence pair with `<sep>` at the boundary; label 1 (same intent) -> 相似, 0 -> 矛盾."""
    label = int(str(record["label"]).strip())
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label}")
    first = _must_be_text(record["sentence1"], "sentence1")
    second = _must_be_text(record["sentence2"], "sentence2")
    return {"inputs": f"句子一：{first}{SEP}句子二：{second}", "targets": LCQMC_LABELS[label]}


# ----------------------------------------------------------------------------- WMT20 en-zh

_SEGMENT = re.compile(r"<seg[^>]*>(.*?)</seg>", re.S)


def _target_side(path: pathlib.Path) -> pathlib.Path:
    """The Chinese file paired with an English one: `-src.` -> `-ref.`, `.en` -> `.zh`."""
    name = path.name.replace("-src.", "-ref.")
    name = re.sub(r"\.en(\.sgm)?$", r".zh\1", name)
    return path.with_name(name)


def _lines(path: pathlib.Path) -> list[str]:
    content = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".sgm":
        import html

        return [html.unescape(s.strip()) for s in _SEGMENT.findall(content)]
    return content.split("\n")[:-1] if content.endswith("\n") else content.split("\n")


def read_wmt(path: pathlib.Path):
    """Aligned English/Chinese files (plain or SGML), or one `en<TAB>zh` TSV."""
    if path.suffix == ".tsv":
        yield from read_tsv(path, ("en", "zh"))
        return
    target = _target_side(path)
    if not target.is_file():
        yield 1, sources.Malformed(f"no aligned Chinese file {target}")
        return
    english, chinese = _lines(path), _lines(target)
    if len(english) != len(chinese):
        yield 1, sources.Malformed(f"{len(english)} English lines vs {len(chinese)} in {target}")
        return
    for number, (en, zh) in enumerate(zip(english, chinese), start=1):
        yield number, {"en": en, "zh": zh}


def translation_example(record: dict) -> dict:
    return {"inputs": f"英译中：{_must_be_text(record['en'], 'en')}",
            "targets": _must_be_text(record["zh"], "zh")}


# ----------------------------------------------------------------------------- Math23K


def math23k_example(record: dict) -> dict:
    """Problem -> equation without its `x=`; the answer rides along for the metric."""
    problem = record.get("original_text", record.get("text"))
    equation = _must_be_text(record["equation"], "equation").strip()
    if equation[:2].lower() == "x=":
        equation = equation[2:]
    if metrics.equation_value(equation) is None:
        raise ValueError(f"equation {equation!r} does not evaluate")
    return {"inputs": _must_be_text(problem, "original_text"), "targets": equation,
            "answer": str(record.get("ans", ""))}


def math_postprocess(output, example=None, is_target=False):
    if is_target:
        return {"equation": text(output), "answer": text(example["answer"]) if example is not None else ""}
    return text(output).strip()


# ----------------------------------------------------------------------------- LCSTS

_LCSTS_DOC = re.compile(r"<doc[^>]*>(.*?)</doc>", re.S)
_LCSTS_FIELD = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.S) for name in ("summary", "short_text", "human_label")}


def read_lcsts(path: pathlib.Path):
    """LCSTS PART files (pseudo-XML; line number of each `<doc>`), or JSON Lines."""
    if path.suffix in (".jsonl", ".json"):
        for number, raw in sources.read_jsonl(path):
            if isinstance(raw, sources.Malformed):
                yield number, raw
            else:
                yield number, {"summary": raw.get("summary"), "short_text": raw.get("text", raw.get("short_text"))}
        return
    content = path.read_text(encoding="utf-8", errors="replace")
    for match in _LCSTS_DOC.finditer(content):
        number = content.count("\n", 0, match.start()) + 1
        fields = {name: pattern.search(match.group(1)) for name, pattern in _LCSTS_FIELD.items()}
        if fields["summary"] is None or fields["short_text"] is None:
            yield number, sources.Malformed("<doc> without <summary> or <short_text>")
            continue
        record = {name: m.group(1).strip() for name, m in fields.items() if m is not None}
        yield number, record


def lcsts_example(record: dict) -> dict:
    return {"inputs": _must_be_text(record["short_text"], "short_text"),
            "targets": _must_be_text(record["summary"], "summary")}


# ----------------------------------------------------------------------------- AdGen


def adgen_example(record: dict) -> dict:
    """Product attributes -> advertising text. Two public layouts are accepted."""
    if "content" in record:
        pairs = [item.split("#", 1) for item in record["content"].split("*") if item]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("content must be 'key#value*key#value'")
        target, title, tags = record["summary"], "", []
    else:
        pairs, target = record["feature"], record["desc"]
        title, tags = record.get("title", ""), list(record.get("tags", []))
    parts = [title] if title else []
    if tags:
        parts.append("、".join(tags))
    parts += [f"{key}：{value}" for key, value in pairs]
    if not parts:
        raise ValueError("no attributes")
    return {"inputs": "；".join(parts), "targets": _must_be_text(target, "desc")}


# ----------------------------------------------------------------------------- Sogou-Log


def read_sogou(path: pathlib.Path):
    return read_tsv(path, ("qid", "query", "document", "label"))


def sogou_example(record: dict) -> dict:
    """Query `<sep>` document -> 相关 (label > 0) / 无关; qid and label kept for MRR."""
    label = int(str(record["label"]).strip())
    relevant = int(label > 0)
    query = _must_be_text(record["query"], "query")
    document = _must_be_text(record["document"], "document")
    return {"inputs": f"查询：{query}{SEP}文档：{document}", "targets": RELEVANCE_LABELS[relevant],
            "qid": str(record["qid"]).strip(), "label": str(relevant)}


def sogou_rank_example(record: dict) -> dict:
    """Ranking view: every pair scored by the likelihood of 相关."""
    example = sogou_example(record)
    example["targets"] = RELEVANCE_LABELS[1]
    return example


def sogou_postprocess(output, example=None, is_target=False):
    if is_target and example is not None:
        return {"qid": text(example["qid"]), "relevant": text(example["label"]) == "1"}
    return text(output).strip()


def strip_postprocess(output, example=None, is_target=False):
    del example, is_target
    return text(output).strip()


def specs() -> list[TaskSpec]:
    """Every downstream task's spec (file lists read from gin at call time)."""
    jsonl = sources.read_jsonl
    accuracy = [metrics.accuracy]
    return [
        TaskSpec("cpm2_ccpm", "ccpm", dataset_files("ccpm"), jsonl, ccpm_example, accuracy,
                 postprocess_fn=strip_postprocess),
        TaskSpec("cpm2_c3", "c3", dataset_files("c3"), read_c3, c3_example, accuracy,
                 postprocess_fn=strip_postprocess),
        TaskSpec("cpm2_lcqmc", "lcqmc", dataset_files("lcqmc"), read_lcqmc, lcqmc_example, accuracy,
                 postprocess_fn=strip_postprocess),
        TaskSpec("cpm2_wmt20_en_zh", "wmt20_en_zh", dataset_files("wmt20_en_zh"), read_wmt, translation_example,
                 [metrics.translation_metrics], postprocess_fn=strip_postprocess),
        TaskSpec("cpm2_math23k", "math23k", dataset_files("math23k"), read_json_document, math23k_example,
                 [metrics.math_answer_accuracy], metadata=("answer",), postprocess_fn=math_postprocess),
        TaskSpec("cpm2_lcsts", "lcsts", dataset_files("lcsts"), read_lcsts, lcsts_example, [metrics.summary_metrics],
                 postprocess_fn=strip_postprocess),
        TaskSpec("cpm2_adgen", "adgen", dataset_files("adgen"), jsonl, adgen_example,
                 [metrics.generation_metrics], postprocess_fn=strip_postprocess),
        TaskSpec("cpm2_sogou_log", "sogou_log", dataset_files("sogou_log"), read_sogou, sogou_example, accuracy,
                 metadata=("qid", "label"), postprocess_fn=strip_postprocess),
        TaskSpec("cpm2_sogou_log_rank", "sogou_log", dataset_files("sogou_log"), read_sogou, sogou_rank_example,
                 [metrics.mean_reciprocal_rank], metadata=("qid", "label"), postprocess_fn=sogou_postprocess),
    ]
