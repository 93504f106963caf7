"""`cpm2 data show` and `cpm2 vocab train` through their argparse entry points."""
import argparse
import json

import pytest

from cpm2_jax.errors import ConfigError
from cpm2_jax.tasks import commands, settings


def _run(argv):
    parser = argparse.ArgumentParser(prog="cpm2")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_data_show_prints_decoded_examples(shared_data, tiny_vocab, capsys):
    settings.set_data_dir(shared_data)
    try:
        assert _run(["data", "show", "poem_next_line", "-n", "2"]) == 0
    finally:
        settings.set_data_dir(None)
    out = capsys.readouterr().out
    assert out.count("--- poem_next_line [validation]") == 2
    assert "inputs (" in out and "上句：" in out and "targets (" in out


def test_data_show_unknown_task(tiny_vocab):
    with pytest.raises(ConfigError, match="did you mean"):
        _run(["data", "show", "poem_next_lin"])


def test_vocab_train(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"第{i}行 line {i} 的文本。"}, ensure_ascii=False) + "\n"
                              for i in range(300)), encoding="utf-8")
    assert _run(["vocab", "train", "--input", str(corpus), "--output", str(tmp_path / "v"),
                 "--vocab-size", "320", "--character-coverage", "1.0"]) == 0
    assert (tmp_path / "v.model").is_file() and "sentinels" in capsys.readouterr().out
