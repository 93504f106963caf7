"""Damaged checkpoints (a truncated or overwritten array file, a deleted `_METADATA`): `cpm2
infer` and `cpm2 eval` say so in one line naming the file (exit 2), `cpm2 train` resumes from
the newest intact step and says which step it skipped and why; nothing on disk changes."""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil

import pytest

from cpm2_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run_args(model_dir, steps):
    return ["train", "--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
            "--gin_file=tests/gin/byte_pairs.gin", f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8",
            "--gin.CHECKPOINT_PERIOD=1", "--gin.EVAL_PERIOD=0", "--gin.EVAL_STEPS=1", f"--gin.MODEL_DIR='{model_dir}'",
            "--no_progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with checkpoints at steps 1 and 2."""
    model_dir = tmp_path_factory.mktemp("damage") / "run"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert cli.main(_run_args(model_dir, 2)) == 0
    finally:
        os.chdir(cwd)
    return model_dir


def _damage(step_dir: pathlib.Path, how: str) -> None:
    """Damages the step in place: every array data file truncated or overwritten (same size),
    or the state's `_METADATA` deleted."""
    if how == "metadata":
        (step_dir / "state" / "_METADATA").unlink()
        return
    for victim in (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        data = bytearray(victim.read_bytes())
        if how == "truncated":
            victim.write_bytes(bytes(data[: len(data) // 2]))
        else:  # one byte in every 256 changed, past the first 512 (the file's header stays)
            for k in range(512, len(data), 256):
                data[k] = (data[k] + 1) % 256
            victim.write_bytes(bytes(data))


def _snapshot(directory: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["truncated", "overwritten", "metadata"])
def test_damaged_latest_step(run, tmp_path, capsys, monkeypatch, how):
    monkeypatch.chdir(REPO)
    model_dir = tmp_path / "run"
    shutil.copytree(run, model_dir)
    _damage(model_dir / "checkpoints" / "2", how)
    before = _snapshot(model_dir / "checkpoints")
    capsys.readouterr()

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("5 6 7 1\n")
    code = cli.main(["infer", f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.INPUT_FILE='{inputs}'",
                     f"--gin.OUTPUT_FILE='{tmp_path / 'out.jsonl'}'", "--gin.infer.max_new_tokens=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Event loop" not in err, err
    named = re.search(r"checkpoints/2/state/\S+", err)  # the damaged file (or array) is named
    assert "checkpoints/2" in err and (named or "fingerprint" in err), err
    assert not (tmp_path / "out.jsonl").exists()

    code = cli.main(_run_args(model_dir, 3))
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "step 2 is left on disk" in err and "resumed from checkpoint step 1" in err, err[-2000:]
    after = _snapshot(model_dir / "checkpoints")
    assert {k: v for k, v in after.items() if k.startswith("2/")} == {k: v for k, v in before.items()
                                                                      if k.startswith("2/")}
    assert any(k.startswith("3/") for k in after)
