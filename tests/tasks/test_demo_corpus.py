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


def test_pretraining_documents_are_bounded_and_mixed(tmp_path):
    write_mo(tmp_path / "a.mo", [(f"Alpha {i:02d}", f"甲 {i:02d}") for i in range(45)])
    write_mo(tmp_path / "b.mo", [(f"Beta {i:02d}", f"乙 {i:02d}") for i in range(7)])
    out = demo_corpus.prepare(tmp_path / "out", pattern=str(tmp_path / "*.mo"))
    zh = [json.loads(x) for x in (out / "zh_mono.jsonl").read_text(encoding="utf-8").splitlines()]
    en = [json.loads(x) for x in (out / "en_mono.jsonl").read_text(encoding="utf-8").splitlines()]
    sizes = {(d["source"], d["text"].count("\n") + 1) for d in zh}
    assert sorted(sizes) == [("gettext/a", 5), ("gettext/a", 20), ("gettext/b", 7)]  # a: 20 + 20 + 5
    assert len(zh) == len(en) == 4 and [d["source"] for d in zh] == [d["source"] for d in en]
    assert all(z["text"].count("\n") == e["text"].count("\n") for z, e in zip(zh, en))
    assert sorted(line for d in zh for line in d["text"].splitlines()) == sorted(
        [f"甲 {i:02d}" for i in range(45)] + [f"乙 {i:02d}" for i in range(7)])
    assert json.loads((out / ".complete").read_text())["version"] == demo_corpus.FORMAT_VERSION


def test_cache_of_an_older_layout_is_rebuilt(tmp_path):
    write_mo(tmp_path / "a.mo", [(f"Alpha {i:02d}", f"甲 {i:02d}") for i in range(45)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "zh_mono.jsonl").write_text(json.dumps({"text": "old", "source": "gettext/a"}) + "\n")
    (out / ".complete").write_text(json.dumps({"pairs": 45, "pattern": "x"}) + "\n")  # version-1 marker
    demo_corpus.prepare(out, pattern=str(tmp_path / "*.mo"))
    assert len((out / "zh_mono.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    (out / "zh_mono.jsonl").write_text("kept\n")
    demo_corpus.prepare(out, pattern=str(tmp_path / "*.mo"))  # current version: cached, untouched
    assert (out / "zh_mono.jsonl").read_text() == "kept\n"


def test_demo_pretraining_validation_split_is_not_empty(tmp_path, tiny_vocab):
    """The demo's own corpus (this machine's catalogs, or the generated fallback) evaluates."""
    import tensorflow as tf

    from cpm2_jax.tasks import pipeline, pretraining

    out = demo_corpus.prepare(tmp_path / "demo")
    texts = [json.loads(x)["text"] for x in (out / "zh_mono.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = json.loads((out / ".complete").read_text())["pairs"]
    assert len(texts) >= pairs / demo_corpus.MESSAGES_PER_DOCUMENT  # bounded documents, not one per program
    if demo_corpus.system_pairs():  # real catalogs: the hash bucket itself holds documents out
        buckets = tf.strings.to_hash_bucket_fast(texts, pretraining.VALIDATION_BUCKETS).numpy()
        assert (buckets == 0).sum() >= 3, f"{len(texts)} documents"
    source = pretraining.CorpusSource("demo_zh", "zh", directory=lambda: out)
    task = pretraining.span_corruption_task("demo_zh", source, tiny_vocab)
    with pipeline.get_batch_iterator(task, split="validation", feature_lengths={"inputs": 64, "targets": 16},
                                     batch_size=2, num_epochs=1, shuffle=False) as iterator:
        batches = list(iterator)
    assert batches and batches[0]["encoder_input_tokens"].shape == (2, 64)
