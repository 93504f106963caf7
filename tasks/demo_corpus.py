"""The demo's default corpus, built from text the machine already has: no download.

What it uses, exactly: every gettext catalog `/usr/share/locale/zh_CN/LC_MESSAGES/*.mo`
(the Simplified-Chinese translations shipped with installed programs: coreutils, apt,
bash, ...). Each catalog maps English UI messages (msgid) to their Chinese translations
(msgstr); we parse the binary .mo format ourselves (GNU gettext manual, "The Format of
MO Files": magic 0x950412de, then N, the offsets of the original and translation tables,
each entry a (length, offset) pair). Plural forms keep their first form, message
contexts (`ctx\\x04msgid`) lose the context, fuzzy/empty translations and the catalog
header are dropped, and each English message is kept once.

Pre-training documents (`zh_mono.jsonl`, `en_mono.jsonl`) are bounded: each program's
messages, in catalog order, are cut into documents of at most `MESSAGES_PER_DOCUMENT`
(20) messages joined by newlines; English document i holds the same messages as Chinese
document i. That gives ~2000 documents from a desktop's ~40k messages instead of one per
program (~74), so the pre-training tasks' hash hold-out (1 document in 100,
`pretraining.holdout`) has a validation split of its own (~20 documents). They are
written in a fixed pseudo-random order (seed `DOCUMENT_ORDER_SEED`), so the training
stream mixes programs rather than walking through them one by one (the task's shuffle
buffer is small next to a whole catalog).

Where no catalog exists (a minimal container), a small generated corpus stands in:
English/Chinese sentences composed from a fixed phrase table, clearly labelled with the
domain `generated`. `prepare(directory)` writes the corpus in the shared-data layout
(`en_zh_{train,validation}.jsonl`, `zh_mono.jsonl`, `en_mono.jsonl`), so every local
and pre-training task runs on it; the result is cached (`settings.cache_dir()/demo`,
rebuilt when it was written by an older layout: `FORMAT_VERSION`).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import pathlib
import random
import struct
import sys
from typing import Iterator

LOCALE_GLOB = "/usr/share/locale/zh_CN/LC_MESSAGES/*.mo"
MO_MAGIC = 0x950412DE
VALIDATION_PERCENT = 5
MESSAGES_PER_DOCUMENT = 20
DOCUMENT_ORDER_SEED = 0
FORMAT_VERSION = 2  # 2: bounded pre-training documents (1: one document per program)


def parse_mo(data: bytes) -> Iterator[tuple[str, str]]:
    """(msgid, msgstr) pairs of a .mo catalog; raises ValueError for a file that is not one."""
    if len(data) < 20:
        raise ValueError("too short for a .mo file")
    for order in ("<", ">"):
        magic, _revision, count, originals, translations = struct.unpack_from(order + "5I", data, 0)
        if magic == MO_MAGIC:
            break
    else:
        raise ValueError("bad .mo magic number")
    for index in range(count):
        o_len, o_off = struct.unpack_from(order + "2I", data, originals + 8 * index)
        t_len, t_off = struct.unpack_from(order + "2I", data, translations + 8 * index)
        if o_off + o_len > len(data) or t_off + t_len > len(data):
            raise ValueError(f"entry {index} points outside the file")
        yield data[o_off:o_off + o_len].decode("utf-8", "replace"), data[t_off:t_off + t_len].decode("utf-8", "replace")


def catalog_pairs(path: pathlib.Path) -> Iterator[dict]:
    """Usable English -> Chinese pairs of one catalog."""
    domain = path.stem
    for msgid, msgstr in parse_mo(path.read_bytes()):
        if not msgid or not msgstr:
            continue  # the header, or an untranslated message
        english = msgid.split("\x04", 1)[-1].split("\x00", 1)[0]
        chinese = msgstr.split("\x00", 1)[0]
        if english.strip() and chinese.strip() and english != chinese:
            yield {"en": english, "zh": chinese, "domain": domain}


def system_pairs(pattern: str = LOCALE_GLOB) -> list[dict]:
    """Pairs of every catalog matching `pattern`, each English message once, sorted by domain."""
    seen, pairs = set(), []
    for path in sorted(glob.glob(pattern)):
        try:
            for pair in catalog_pairs(pathlib.Path(path)):
                if pair["en"] not in seen:
                    seen.add(pair["en"])
                    pairs.append(pair)
        except (OSError, ValueError, struct.error) as err:
            print(f"cpm2: skipping unreadable catalog {path}: {err}", file=sys.stderr)
    return pairs


_SUBJECTS = [("the file", "文件"), ("the directory", "目录"), ("the package", "软件包"), ("the user", "用户"),
             ("the network", "网络"), ("the password", "密码"), ("the device", "设备"), ("the server", "服务器")]
_PATTERNS = [("Cannot open {s}.", "无法打开{s}。"), ("{S} was not found.", "未找到{s}。"),
             ("Do you want to remove {s}?", "您要删除{s}吗？"), ("Checking {s}...", "正在检查{s}..."),
             ("{S} is ready.", "{s}已就绪。"), ("Failed to update {s}: %s", "更新{s}失败：%s"),
             ("Permission denied for {s}.", "{s}的权限被拒绝。"), ("Saving {s} to disk", "正在将{s}保存到磁盘")]


def generated_pairs() -> list[dict]:
    """The fallback: 64 template sentences (8 patterns x 8 subjects), deterministic."""
    pairs = []
    for (en_pattern, zh_pattern), (en_subject, zh_subject) in itertools.product(_PATTERNS, _SUBJECTS):
        english = en_pattern.format(s=en_subject, S=en_subject[0].upper() + en_subject[1:])
        pairs.append({"en": english, "zh": zh_pattern.format(s=zh_subject), "domain": "generated"})
    return pairs


def load_pairs(pattern: str = LOCALE_GLOB) -> list[dict]:
    """System catalog pairs, or the generated fallback with a message saying so."""
    pairs = system_pairs(pattern)
    if not pairs:
        print(f"cpm2: no gettext catalogs at {pattern}; using a small generated corpus "
              f"({len(generated_pairs())} pairs) for the demo", file=sys.stderr)
        return generated_pairs()
    return pairs


def _split_of(domain: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(domain.encode()).digest()[:4], "little") % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


def prepare(directory: str | os.PathLike | None = None, pattern: str = LOCALE_GLOB) -> pathlib.Path:
    """Write the corpus as a data directory (cached: nothing is redone when it exists)."""
    from cpm2_jax.tasks import settings

    directory = pathlib.Path(directory) if directory else settings.cache_dir() / "demo"
    done = directory / ".complete"
    if _complete_version(done) == FORMAT_VERSION:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    pairs = load_pairs(pattern)
    splits = {"train": [], "validation": []}
    for pair in pairs:
        splits[_split_of(pair["domain"])].append(pair)
    if not splits["validation"]:  # one domain only (the fallback): hold out every 10th pair
        splits["validation"] = splits["train"][::10]
        splits["train"] = [p for i, p in enumerate(splits["train"]) if i % 10]
    for split, rows in splits.items():
        _write_jsonl(directory / f"en_zh_{split}.jsonl", rows)
    chunks = document_chunks(pairs)
    for language in ("zh", "en"):
        documents = [{"text": "\n".join(p[language] for p in chunk), "source": f"gettext/{chunk[0]['domain']}"}
                     for chunk in chunks]
        _write_jsonl(directory / f"{language}_mono.jsonl", documents)
    done.write_text(json.dumps({"version": FORMAT_VERSION, "pairs": len(pairs), "documents": len(chunks),
                                "pattern": pattern}) + "\n")
    return directory


def document_chunks(pairs: list[dict], size: int = MESSAGES_PER_DOCUMENT,
                    seed: int = DOCUMENT_ORDER_SEED) -> list[list[dict]]:
    """Each domain's consecutive messages cut into chunks of at most `size`, in a seeded order."""
    chunks = []
    for _domain, group in itertools.groupby(pairs, key=lambda p: p["domain"]):
        group = list(group)
        chunks += [group[start:start + size] for start in range(0, len(group), size)]
    random.Random(seed).shuffle(chunks)
    return chunks


def _complete_version(done: pathlib.Path) -> int | None:
    """The layout version a finished directory was written with (None: unfinished; 1: before versions)."""
    try:
        return int(json.loads(done.read_text()).get("version", 1))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError, TypeError):
        return 1


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
