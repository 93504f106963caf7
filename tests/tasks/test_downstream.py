"""Each downstream dataset: a tiny file in its public format -> the expected text-to-text example."""
import json

import pytest

from cpm2_jax.tasks import downstream as D
from cpm2_jax.tasks import pipeline, sources
from cpm2_jax.tasks.text_to_text import build_task, examples


def _spec(name):
    return {s.name: s for s in D.specs()}[name]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_ccpm(tmp_path):
    _jsonl(tmp_path / "valid.jsonl", [
        {"translation": "月亮升起来了", "choices": ["明月出天山", "春眠不觉晓", "白日依山尽", "床前明月光"], "answer": 0},
        {"translation": "缺答案", "choices": ["甲", "乙", "丙", "丁"], "answer": 7},
    ])
    rows = examples(_spec("cpm2_ccpm"), "validation", tmp_path)
    assert rows == [{"inputs": "选项：一：明月出天山；二：春眠不觉晓；三：白日依山尽；四：床前明月光。文章：月亮升起来了",
                     "targets": "一"}]
    assert sources.stats("cpm2_ccpm", "validation").skipped >= 1


def test_c3(tmp_path):
    document = [["男：你好。", "女：你好，请问去车站怎么走？"],
                [{"question": "女的要去哪里？", "choice": ["学校", "车站", "医院"], "answer": "车站"},
                 {"question": "他们在做什么？", "choice": ["问路", "吃饭"], "answer": "问路"}], "m1-1"]
    (tmp_path / "m-dev.json").write_text(json.dumps([document], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "d-dev.json").write_text("[]", encoding="utf-8")
    rows = examples(_spec("cpm2_c3"), "validation", tmp_path)
    context = "男：你好。\n女：你好，请问去车站怎么走？"
    assert rows == [
        {"inputs": f"问题：女的要去哪里？选项：一：学校；二：车站；三：医院。文章：{context}", "targets": "二"},
        {"inputs": f"问题：他们在做什么？选项：一：问路；二：吃饭。文章：{context}", "targets": "一"},
    ]


def test_lcqmc_tsv_with_separator(tmp_path):
    (tmp_path / "dev.txt").write_text("喜欢打篮球的男生喜欢什么样的女生\t爱打篮球的男生喜欢什么样的女生\t1\n"
                                      "我手机丢了\t我想换个手机\t0\nonly one column\n", encoding="utf-8")
    rows = examples(_spec("cpm2_lcqmc"), "validation", tmp_path)
    assert rows == [
        {"inputs": "句子一：喜欢打篮球的男生喜欢什么样的女生<sep>句子二：爱打篮球的男生喜欢什么样的女生", "targets": "相似"},
        {"inputs": "句子一：我手机丢了<sep>句子二：我想换个手机", "targets": "矛盾"},
    ]


def test_wmt_aligned_text_and_sgml(tmp_path):
    (tmp_path / "train.en").write_text("Hello world.\nGood morning.\n", encoding="utf-8")
    (tmp_path / "train.zh").write_text("你好，世界。\n早上好。\n", encoding="utf-8")
    (tmp_path / "newstest2019-enzh-src.en.sgm").write_text(
        '<refset><doc docid="1"><seg id="1">A &amp; B</seg>\n<seg id="2">Tea</seg></doc></refset>', encoding="utf-8")
    (tmp_path / "newstest2019-enzh-ref.zh.sgm").write_text(
        '<refset><doc docid="1"><seg id="1">甲和乙</seg>\n<seg id="2">茶</seg></doc></refset>', encoding="utf-8")
    spec = _spec("cpm2_wmt20_en_zh")
    assert examples(spec, "train", tmp_path) == [{"inputs": "英译中：Hello world.", "targets": "你好，世界。"},
                                                 {"inputs": "英译中：Good morning.", "targets": "早上好。"}]
    assert examples(spec, "validation", tmp_path) == [{"inputs": "英译中：A & B", "targets": "甲和乙"},
                                                      {"inputs": "英译中：Tea", "targets": "茶"}]


def test_math23k_concatenated_objects(tmp_path):
    # The original release: pretty-printed objects one after another, not an array.
    objects = [{"id": "1", "original_text": "甲数是8，乙数比甲数多25%，乙数是多少？", "segmented_text": "...",
                "equation": "x=8*(1+25%)", "ans": "10"},
               {"id": "2", "original_text": "坏方程", "equation": "x=8*(", "ans": "1"}]
    (tmp_path / "math23k_dev.json").write_text("\n".join(json.dumps(o, ensure_ascii=False, indent=1) for o in objects),
                                               encoding="utf-8")
    rows = examples(_spec("cpm2_math23k"), "validation", tmp_path)
    assert rows == [{"inputs": "甲数是8，乙数比甲数多25%，乙数是多少？", "targets": "8*(1+25%)", "answer": "10"}]


def test_lcsts_part_file(tmp_path):
    (tmp_path / "PART_II.txt").write_text(
        "<doc id=0>\n    <human_label>5</human_label>\n    <summary>\n        央行降准\n    </summary>\n"
        "    <short_text>\n        中国人民银行决定下调存款准备金率。\n    </short_text>\n</doc>\n"
        "<doc id=1>\n    <summary>\n        缺正文\n    </summary>\n</doc>\n", encoding="utf-8")
    rows = examples(_spec("cpm2_lcsts"), "validation", tmp_path)
    assert rows == [{"inputs": "中国人民银行决定下调存款准备金率。", "targets": "央行降准"}]


def test_adgen_both_layouts(tmp_path):
    _jsonl(tmp_path / "dev.json", [
        {"feature": [["类型", "裤"], ["风格", "简约"]], "title": "", "desc": "简约的裤子。"},
        {"content": "类型#上衣*颜色#白色", "summary": "白色上衣。"},
    ])
    rows = examples(_spec("cpm2_adgen"), "validation", tmp_path)
    assert rows == [{"inputs": "类型：裤；风格：简约", "targets": "简约的裤子。"},
                    {"inputs": "类型：上衣；颜色：白色", "targets": "白色上衣。"}]


def test_sogou_log_and_rank_view(tmp_path):
    (tmp_path / "dev.tsv").write_text("q1\t天气预报\t今日天气晴\t2\nq1\t天气预报\t股票行情\t0\n", encoding="utf-8")
    rows = examples(_spec("cpm2_sogou_log"), "validation", tmp_path)
    assert rows[0] == {"inputs": "查询：天气预报<sep>文档：今日天气晴", "targets": "相关", "qid": "q1", "label": "1"}
    assert rows[1]["targets"] == "无关" and rows[1]["label"] == "0"
    ranked = examples(_spec("cpm2_sogou_log_rank"), "validation", tmp_path)
    assert [r["targets"] for r in ranked] == ["相关", "相关"]
    assert D.sogou_postprocess(b"x", example={"qid": b"q1", "label": b"1"}, is_target=True) == {
        "qid": "q1", "relevant": True}


def test_task_tokenizes_with_sep_and_eos(tmp_path, tiny_vocab):
    (tmp_path / "dev.txt").write_text("今天天气好\t今天天气不错\t1\n", encoding="utf-8")
    task = build_task(_spec("cpm2_lcqmc"), tiny_vocab, directory=tmp_path)
    example = next(pipeline.task_dataset(task, "validation", {"inputs": 64, "targets": 8}, seed=0,
                                         shuffle=False, num_epochs=1).as_numpy_iterator())
    inputs = example["inputs"].tolist()
    assert inputs.count(tiny_vocab.sep_id) == 1 and inputs[-1] == tiny_vocab.eos_id
    assert tiny_vocab.decode(inputs) == "句子一：今天天气好<sep>句子二：今天天气不错"
    assert tiny_vocab.decode(example["targets"].tolist()) == "相似"


def test_missing_dataset_directory_names_task(tmp_path):
    with pytest.raises(sources.DataError, match=r"task 'cpm2_lcsts'.*PART_I\.txt"):
        examples(_spec("cpm2_lcsts"), "train", tmp_path)
