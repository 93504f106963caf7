"""`cpm2 demo`'s pieces: the model size, the pre-training documents and the loss curve.
(The whole demo is `make demo`; it trains for minutes, too long for the suite.)"""
import json

from cpm2_jax.commands import demo


def test_demo_model_has_room_for_the_vocabulary():
    config = demo.demo_model_config(8100)
    assert config.vocab_size == 8192 and config.vocab_size % 128 == 0
    assert (config.d_model, config.num_heads * config.head_dim) == (128, 128)


def test_demo_documents_chunk_the_catalog_messages(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, count in (("train", 45), ("validation", 5)):
        rows = [{"en": f"message {split} {i}", "zh": f"消息 {split} {i}", "domain": "app"} for i in range(count)]
        (corpus / f"en_zh_{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    data = demo.demo_data_dir(corpus, tmp_path / "data", messages_per_document=20)
    zh = [json.loads(line) for line in (data / "zh_mono.jsonl").read_text().splitlines()]
    assert sorted(doc["text"].count("\n") + 1 for doc in zh) == [10, 20, 20]
    assert any(doc["text"].startswith("消息 train 0\n消息 train 1\n") for doc in zh)
    assert (data / "en_zh_validation.jsonl").read_text() == (corpus / "en_zh_validation.jsonl").read_text()


def test_loss_curve_is_a_png(tmp_path):
    lines = [{"step": s, "split": "train", "loss": 9.0 - s / 10} for s in range(1, 21)]
    lines.append({"step": 20, "split": "validation", "loss": 7.5})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    png = demo.plot_losses(metrics, tmp_path / "loss_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
