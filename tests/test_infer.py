"""`cpm2 infer` end to end on a tiny model: converted and training checkpoints, ids and text
inputs, greedy/beam/score, the never-overwrite rule, and one-line errors for bad input."""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax import cli, decoding
from cpm2_jax.config import get_config
from cpm2_jax.model.transformer import EncoderDecoder

CONFIG = get_config("tiny", vocab_size=96, init_std=0.3)
MAX_NEW = 6


@pytest.fixture(scope="module")
def params():
    model = EncoderDecoder(CONFIG)
    ones = jnp.ones((1, 4), jnp.int32)
    return jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ones, ones)["params"]))


@pytest.fixture(scope="module")
def converted_dir(params, tmp_path_factory):
    from cpm2_jax.convert import native

    return native.save_params(params, CONFIG, tmp_path_factory.mktemp("ckpt") / "converted")


def run_infer(capsys, *flags):
    code = cli.main(["infer", *flags])
    captured = capsys.readouterr()
    return code, captured.err


def reference(params, records, decode_fn):
    """(output ids up to EOS, score) per record from calling `decode_fn` directly, in batches of
    two padded to length 8 as the binary pads them (so the compiled programs are shared)."""
    out = []
    for first in range(0, len(records), 2):
        chunk = records[first:first + 2]
        enc = np.zeros((2, 8), np.int32)
        for i, r in enumerate(chunk):
            enc[i, :len(r["input_ids"])] = r["input_ids"]
        result = decode_fn(enc)
        for i in range(len(chunk)):
            row = [int(t) for t in np.asarray(result.tokens[i])]
            out.append((row[:row.index(1)] if 1 in row else row, float(result.scores[i])))
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_ids_end_to_end_and_overwrite_rule(converted_dir, params, tmp_path, capsys):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"inputs": [5, 6, 7, 8, 1], "id": "a"}\n'
                      "\n"  # blank lines are skipped
                      "9 10 11 1\n"
                      '{"inputs": [12, 13, 14, 15, 16, 17, 18, 1], "id": "c"}\n')
    out = tmp_path / "out.jsonl"
    flags = [f"--gin.CHECKPOINT_PATH='{converted_dir}'", f"--gin.INPUT_FILE='{inputs}'",
             f"--gin.OUTPUT_FILE='{out}'", f"--gin.infer.max_new_tokens={MAX_NEW}", "--gin.infer.batch_size=2"]
    code, err = run_infer(capsys, *flags)
    assert code == 0, err
    records = read_jsonl(out)
    assert [r.get("id") for r in records] == ["a", None, "c"]
    assert records[1]["inputs"] == [9, 10, 11, 1]

    ref = reference(params, records, lambda enc: decoding.greedy(params, enc, config=CONFIG, max_new_tokens=MAX_NEW))
    for r, (ids, score) in zip(records, ref):
        assert r["output_ids"] == ids and r["score"] == pytest.approx(score, abs=1e-4)

    # An existing output is never replaced without --overwrite, and stays intact.
    before = out.read_text()
    code, err = run_infer(capsys, *flags, "--gin.infer.method='beam'")
    assert code == 2 and str(out) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == before
    code, err = run_infer(capsys, *flags, "--gin.infer.method='beam'", "--gin.infer.num_beams=3", "--overwrite")
    assert code == 0, err
    beam = read_jsonl(out)
    ref = reference(params, records, lambda enc: decoding.decode(params, enc, config=CONFIG, method="beam",
                                                                 num_beams=3, max_new_tokens=MAX_NEW))
    assert [r["output_ids"] for r in beam] == [ids for ids, _ in ref]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl.tmp")]  # no temp left behind


def test_score_mode(converted_dir, params, tmp_path, capsys):
    inputs = tmp_path / "pairs.jsonl"
    inputs.write_text('{"inputs": [5, 6, 7, 1], "targets": [9, 9, 4, 1]}\n{"inputs": [8, 1], "targets": [3, 1]}\n')
    out = tmp_path / "scores.jsonl"
    code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{converted_dir}'", f"--gin.INPUT_FILE='{inputs}'",
                          f"--gin.OUTPUT_FILE='{out}'", "--gin.infer.mode='score'")
    assert code == 0, err
    records = read_jsonl(out)
    _, totals = decoding.score(params, np.array([[5, 6, 7, 1], [8, 1, 0, 0]], np.int32),
                               np.array([[9, 9, 4, 1], [3, 1, 0, 0]], np.int32), config=CONFIG)
    assert [r["score"] for r in records] == pytest.approx(np.asarray(totals).tolist(), abs=1e-4)
    assert len(records[1]["token_scores"]) == 2


@pytest.mark.parametrize("content,expected", [
    ('{"inputs": [5, 6, 1]}\n{"inputs": [5, 6\n', "line 2: invalid JSON"),
    ('{"text": "hello"}\n', 'line 1: a JSON line must be an object with an "inputs" field'),
    ("hello world\n", "line 1: inputs is text but no vocabulary is set"),
    ('{"inputs": [5, 4000]}\n', "line 1: inputs has token id 4000 outside the model vocabulary [0, 96)"),
])
def test_bad_input_is_one_line_exit_2(converted_dir, tmp_path, capsys, content, expected):
    inputs = tmp_path / "bad.jsonl"
    inputs.write_text(content)
    out = tmp_path / "never.jsonl"
    code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{converted_dir}'", f"--gin.INPUT_FILE='{inputs}'",
                          f"--gin.OUTPUT_FILE='{out}'")
    assert code == 2
    assert expected in err and str(inputs) in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".never.jsonl.tmp*"))


def test_unwritable_output_path_is_one_line_exit_2(converted_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    for out in (blocker / "out.jsonl", pathlib.Path("/sys/cpm2_test_out.jsonl")):
        code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{converted_dir}'", f"--gin.OUTPUT_FILE='{out}'")
        assert code == 2 and f"output file '{out}' cannot be written" in err and "--gin.OUTPUT_FILE" in err, err
        assert len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "mine"


def test_bad_flags_are_one_line_exit_2(converted_dir, tmp_path, capsys):
    code, err = run_infer(capsys, "--gin.INPUT_FILE='x'")
    assert code == 2 and "CHECKPOINT_PATH" in err
    code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{tmp_path / 'missing'}'")
    assert code == 2 and "does not exist" in err
    code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{converted_dir}'", "--gin.infer.method='beem'")
    assert code == 2 and "unknown method 'beem'" in err


def test_text_with_vocabulary_and_training_checkpoint(params, tmp_path, capsys, monkeypatch):
    """Text in and out through a word-piece vocabulary; params from a `cpm2 train` checkpoint."""
    import optax

    from cpm2_jax.checkpoints import Checkpoints, config_record
    from cpm2_jax.tasks.vocabulary import WordPieceVocabulary
    from cpm2_jax.train_state import TrainState

    pieces = ["<pad>", "</s>", "<unk>", "<sep>"] + list("abcdefghijklmnopqrstuvwxyz") + ["hello", "world", "\u2582"]
    vocab_file = tmp_path / "vocab.txt"
    WordPieceVocabulary(pieces).write_vocab_txt(vocab_file)
    model_dir = tmp_path / "run"
    ckpts = Checkpoints(model_dir / "checkpoints", async_save=False)
    state = TrainState(step=jnp.asarray(7, jnp.int32), params=params, opt_state=optax.sgd(0.1).init(params))
    ckpts.save(state, data_state={"step": 7}, config=config_record(CONFIG))
    ckpts.close()

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello world\nabc\n"))
    code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.VOCABULARY='{vocab_file}'",
                          f"--gin.OUTPUT_FILE='{tmp_path / 'out.jsonl'}'", f"--gin.infer.max_new_tokens={MAX_NEW}",
                          "--gin.infer.batch_size=2")
    assert code == 0, err
    records = read_jsonl(tmp_path / "out.jsonl")
    vocab = WordPieceVocabulary.from_vocab_txt(vocab_file)
    assert [r["inputs"] for r in records] == ["hello world", "abc"]
    assert records[0]["input_ids"] == vocab.encode("hello world") + [1]
    ref = reference(params, records, lambda enc: decoding.greedy(params, enc, config=CONFIG, max_new_tokens=MAX_NEW))
    for r, (ids, _) in zip(records, ref):
        assert r["output_ids"] == ids and r["output"] == vocab.decode(ids)


def test_on_a_mesh_equals_one_device(converted_dir, params, tmp_path, capsys):
    """--gin.MESH_SHAPE: parameters split by the partition rules (data=2, model=4 over 8 fake
    CPU devices), batches over data; the same outputs as one device, in both modes."""
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(f'{{"inputs": {[5 + i, 6, 7 + i, 1]}, "targets": {[9, 8 + i, 1]}}}\n' for i in range(5)))
    mesh = "--gin.MESH_SHAPE={'data': 2, 'model': 4}"
    for mode in ("predict", "score"):
        outs = {}
        for name, extra in (("one", []), ("mesh", [mesh])):
            outs[name] = tmp_path / f"{mode}_{name}.jsonl"
            code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{converted_dir}'", f"--gin.INPUT_FILE='{inputs}'",
                                  f"--gin.OUTPUT_FILE='{outs[name]}'", f"--gin.infer.max_new_tokens={MAX_NEW}",
                                  "--gin.infer.batch_size=4", f"--gin.infer.mode='{mode}'", *extra)
            assert code == 0, err
        one, on_mesh = read_jsonl(outs["one"]), read_jsonl(outs["mesh"])
        assert len(one) == 5
        for a, b in zip(one, on_mesh):
            assert a.get("output_ids") == b.get("output_ids")
            assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-4)  # sharded sums round differently
    code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{converted_dir}'", f"--gin.INPUT_FILE='{inputs}'",
                          f"--gin.OUTPUT_FILE='{tmp_path / 'bad.jsonl'}'", "--gin.infer.batch_size=3", mesh)
    assert code == 2 and "batch_size 3" in err and "--gin.infer.batch_size" in err
    assert not (tmp_path / "bad.jsonl").exists()


def test_invalid_utf8_names_the_input_line_and_byte_offset(converted_dir, tmp_path, capsys, monkeypatch):
    import io
    import sys

    data = '{"inputs": [5, 6, 1]}\n'.encode() + b'{"inputs": "caf\xc3\xa9 \xff"}\n'  # 0xff: byte 40 (22 + 18)
    inputs = tmp_path / "latin.jsonl"
    inputs.write_bytes(data)
    out = tmp_path / "never.jsonl"
    for source, name in ((str(inputs), str(inputs)), ("-", "<stdin>")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        code, err = run_infer(capsys, f"--gin.CHECKPOINT_PATH='{converted_dir}'", f"--gin.INPUT_FILE='{source}'",
                              f"--gin.OUTPUT_FILE='{out}'")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{name} line 2: invalid UTF-8 byte 0xff at byte offset 40 (byte 18 of the line)" in err
    assert not out.exists()
