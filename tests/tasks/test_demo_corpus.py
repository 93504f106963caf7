"""The demo corpus: our own .mo parser on a catalog written here, and the generated fallback."""
import json
import struct

from cpm2_jax.tasks import demo_corpus


def write_mo(path, entries):
    """A little-endian .mo file (GNU layout: header, original table, translation table, strings)."""
    entries = sorted(entries)
    count = len(entries)
    originals, translations = 28, 28 + 8 * count
    data_start = 28 + 16 * count
    blob, o_table, t_table = b"", [], []
    for msgid, _ in entries:
        raw = msgid.encode()
        o_table.append((len(raw), data_start + len(blob)))
        blob += raw + b"\x00"
    for _, msgstr in entries:
        raw = msgstr.encode()
        t_table.append((len(raw), data_start + len(blob)))
        blob += raw + b"\x00"
    header = struct.pack("<7I", 0x950412DE, 0, count, originals, translations, 0, 0)
    tables = b"".join(struct.pack("<2I", *e) for e in o_table + t_table)
    path.write_bytes(header + tables + blob)


def test_parse_written_catalog(tmp_path):
    write_mo(tmp_path / "toy.mo", [("", "Content-Type: text/plain; charset=UTF-8\n"), ("Open file", "打开文件"),
                                   ("%d file\x00%d files", "%d 个文件"), ("menu\x04Quit", "退出"),
                                   ("Untranslated", "")])
    pairs = list(demo_corpus.catalog_pairs(tmp_path / "toy.mo"))
    assert {(p["en"], p["zh"]) for p in pairs} == {("Open file", "打开文件"), ("%d file", "%d 个文件"), ("Quit", "退出")}
    assert all(p["domain"] == "toy" for p in pairs)


def test_prepare_uses_catalogs_or_falls_back(tmp_path, capsys):
    write_mo(tmp_path / "a.mo", [(f"Message {i}", f"消息 {i}") for i in range(30)])
    out = demo_corpus.prepare(tmp_path / "out", pattern=str(tmp_path / "*.mo"))
    train = (out / "en_zh_train.jsonl").read_text(encoding="utf-8").splitlines()
    validation = (out / "en_zh_validation.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(train) + len(validation) == 30 and validation
    assert json.loads((out / "zh_mono.jsonl").read_text(encoding="utf-8").splitlines()[0])["source"] == "gettext/a"
    fallback = demo_corpus.prepare(tmp_path / "fb", pattern=str(tmp_path / "none" / "*.mo"))
    assert "generated corpus" in capsys.readouterr().err
    rows = [json.loads(x) for x in (fallback / "en_zh_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows and all(r["domain"] == "generated" for r in rows)


def test_system_catalogs_parse_when_present():
    pairs = demo_corpus.system_pairs()
    assert all(p["en"] and p["zh"] for p in pairs)
    assert len({p["en"] for p in pairs}) == len(pairs)
