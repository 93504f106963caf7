"""The demo's default corpus, built from text the machine already has: no download.

What it uses, exactly: every gettext catalog `/usr/share/locale/zh_CN/LC_MESSAGES/*.mo`
(the Simplified-Chinese translations shipped with installed programs: coreutils, apt,
bash, ...). Each catalog maps English UI messages (msgid) to their Chinese translations
(msgstr); we parse the binary .mo format ourselves (GNU gettext manual, "The Format of
MO Files": magic 0x950412de, then N, the offsets of the original and translation tables,
each entry a (length, offset) pair). Plural forms keep their first form, message
contexts (`ctx\\x04msgid`) lose the context, fuzzy/empty translations and the catalog
header are dropped, and each English message is kept once.

Where no catalog exists (a minimal container), a small generated corpus stands in:
English/Chinese sentences composed from a fixed phrase table, clearly labelled with the
domain `generated`. `prepare(directory)` writes the corpus in the shared-data layout
(`en_zh_{train,validation}.jsonl`, `zh_mono.jsonl`, `en_mono.jsonl`), so every local
and pre-training task runs on it; the result is cached (`settings.cache_dir()/demo`).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import pathlib
import struct
import sys
from typing import Iterator

LOCALE_GLOB = "/usr/share/locale/zh_CN/LC_MESSAGES/*.mo"
MO_MAGIC = 0x950412DE
VALIDATION_PERCENT = 5


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
    if done.is_file():
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
    for language in ("zh", "en"):
        documents = []
        for domain, group in itertools.groupby(pairs, key=lambda p: p["domain"]):
            documents.append({"text": "\n".join(p[language] for p in group), "source": f"gettext/{domain}"})
        _write_jsonl(directory / f"{language}_mono.jsonl", documents)
    done.write_text(json.dumps({"pairs": len(pairs), "pattern": pattern}) + "\n")
    return directory


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
