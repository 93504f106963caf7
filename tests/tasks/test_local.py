"""Local real tasks over ../shared/data."""
import collections
import json

from cpm2_jax.tasks import local, settings
from cpm2_jax.tasks.text_to_text import examples


def _spec(name):
    return {s.name: s for s in local.specs()}[name]


def _first(path):
    with open(path, encoding="utf-8") as handle:
        return json.loads(handle.readline())


def test_local_tasks_read_shared_data(shared_data):
    settings.set_data_dir(shared_data)
    try:
        poem = _first(shared_data / "poem_next_line_validation.jsonl")
        rows = examples(_spec("poem_next_line"), "validation", None)
        assert rows[0]["targets"] == "一二三四"[poem["label"]]
        assert rows[0]["inputs"].startswith(f"上句：{poem['first']}选项：一：{poem['options'][0]}；")
        summary = _first(shared_data / "man_summary_zh_validation.jsonl")
        assert examples(_spec("man_summary_zh"), "validation", None)[0] == {
            "inputs": f"摘要：{summary['document']}", "targets": summary["summary"]}
        pair = _first(shared_data / "en_zh_validation.jsonl")
        assert examples(_spec("en_zh"), "validation", None)[0] == {"inputs": f"英译中：{pair['en']}",
                                                                    "targets": pair["zh"]}
    finally:
        settings.set_data_dir(None)


def test_translation_match_pairs(tmp_path):
    pairs = [{"en": f"message {i}", "zh": f"消息 {i}", "domain": "d"} for i in range(20)]
    pairs.append({"en": "duplicate", "zh": "消息 0", "domain": "d"})
    (tmp_path / "en_zh_validation.jsonl").write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    rows = examples(_spec("translation_match"), "validation", tmp_path)
    assert rows == examples(_spec("translation_match"), "validation", tmp_path)  # deterministic
    assert collections.Counter(r["targets"] for r in rows) == {"是": 21, "否": 21}
    for row in rows:
        en, zh = row["inputs"].removeprefix("英文：").split("<sep>中文：")
        truly = any(p["en"] == en and p["zh"] == zh for p in pairs)
        assert row["targets"] == ("是" if truly else "否")
