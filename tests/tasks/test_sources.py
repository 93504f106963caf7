"""Bad input: missing paths name path and task; malformed records name file and line."""
import json
import logging

import pytest

from cpm2_jax.errors import DataError
from cpm2_jax.tasks import settings, sources


def _source(directory, files):
    return sources.RecordSource(
        task="toy", directory=lambda: directory, split_files={"train": files},
        reader=sources.text_fields(sources.read_jsonl, {"text": "text"}), fields=("text",))


def test_missing_directory_names_path_and_task(tmp_path):
    with pytest.raises(DataError, match=r"task 'toy'.*" + str(tmp_path / "nope")):
        _source(tmp_path / "nope", ["a.jsonl"]).files("train")


def test_missing_file_names_path_and_task(tmp_path):
    with pytest.raises(DataError, match=r"task 'toy'.*a\.jsonl"):
        list(_source(tmp_path, ["a.jsonl"]).records("train"))


def _write_bad(path):
    path.write_text("\n".join([json.dumps({"text": "好"}), "{broken", json.dumps({"other": 1}),
                               json.dumps({"text": 3}), json.dumps({"text": "ok"})]) + "\n", encoding="utf-8")


def test_malformed_skipped_counted_and_logged(tmp_path, caplog):
    _write_bad(tmp_path / "a.jsonl")
    sources.reset_stats()
    with caplog.at_level(logging.WARNING):
        records = list(_source(tmp_path, ["a.jsonl"]).records("train"))
    assert [r["text"] for r in records] == ["好", "ok"]
    counts = sources.stats("toy", "train")
    assert (counts.records, counts.skipped) == (2, 3)
    assert f"{tmp_path / 'a.jsonl'}:2" in caplog.text and f"{tmp_path / 'a.jsonl'}:4" in caplog.text


def test_malformed_fails_when_configured(tmp_path):
    _write_bad(tmp_path / "a.jsonl")
    settings.set_malformed_policy("fail")
    try:
        with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
            list(_source(tmp_path, ["a.jsonl"]).records("train"))
    finally:
        settings.set_malformed_policy(None)


def test_never_a_silent_empty_dataset(tmp_path):
    (tmp_path / "a.jsonl").write_text("{bad\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable record"):
        list(_source(tmp_path, ["a.jsonl"]).records("train"))


def test_text_lines_reader_flags_bad_utf8(tmp_path):
    (tmp_path / "c.txt").write_bytes("第一行\n".encode() + b"\xff\xfe\n" + "third\n".encode())
    rows = list(sources.read_text_lines(tmp_path / "c.txt"))
    assert rows[0] == (1, {"text": "第一行"}) and isinstance(rows[1][1], sources.Malformed) and rows[1][0] == 2


def test_data_dir_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.DATA_DIR_ENV, str(tmp_path))
    assert settings.data_dir() == tmp_path
    settings.set_data_dir(tmp_path / "x")
    try:
        assert settings.data_dir() == tmp_path / "x"
        assert settings.task_dir("lcqmc", "cpm2_lcqmc") == tmp_path / "x" / "lcqmc"
    finally:
        settings.set_data_dir(None)


def test_invalid_utf8_in_json_lines_is_malformed(tmp_path, caplog):
    good = json.dumps({"text": "好"}).encode()
    # Valid JSON around a byte that is not UTF-8 (it used to become U+FFFD in the text).
    (tmp_path / "a.jsonl").write_bytes(good + b"\n" + b'{"text": "bad \xff byte"}\n' + good + b"\n")
    sources.reset_stats()
    with caplog.at_level(logging.WARNING):
        records = list(_source(tmp_path, ["a.jsonl"]).records("train"))
    assert [r["text"] for r in records] == ["好", "好"]
    assert (sources.stats("toy", "train").records, sources.stats("toy", "train").skipped) == (2, 1)
    assert f"{tmp_path / 'a.jsonl'}:2: not UTF-8" in caplog.text
    settings.set_malformed_policy("fail")
    try:
        with pytest.raises(DataError, match=r"a\.jsonl:2: not UTF-8"):
            list(_source(tmp_path, ["a.jsonl"]).records("train"))
    finally:
        settings.set_malformed_policy(None)
