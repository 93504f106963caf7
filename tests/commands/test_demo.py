"""`cpm2 demo`'s pieces: the model size and the loss curve (the corpus's documents are tested in
tests/tasks/test_demo_corpus.py).
(The whole demo is `make demo`; it trains for minutes, too long for the suite.)"""
import json

from cpm2_jax.commands import demo


def test_demo_model_has_room_for_the_vocabulary():
    config = demo.demo_model_config(8100)
    assert config.vocab_size == 8192 and config.vocab_size % 128 == 0
    assert (config.d_model, config.num_heads * config.head_dim) == (128, 128)


def test_loss_curve_is_a_png(tmp_path):
    lines = [{"step": s, "split": "train", "loss": 9.0 - s / 10} for s in range(1, 21)]
    lines.append({"step": 20, "split": "validation", "loss": 7.5})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    png = demo.plot_losses(metrics, tmp_path / "loss_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
