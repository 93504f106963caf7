"""`cpm2 eval`: seqio metrics per task of a mixture against a checkpoint, and bad checkpoints."""
import json

import pytest

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax import eval as eval_bin
from cpm2_jax.config import get_config
from cpm2_jax.partitioning import make_mesh
from cpm2_jax.trainer import Trainer, TrainerConfig

# The tiny model with room for the configured vocabulary (8,000 pieces + 100 sentinels).
VOCAB = 8192


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval_ckpt") / "checkpoints"
    config = get_config("tiny", vocab_size=VOCAB)
    state = Trainer(config, TrainerConfig(), make_mesh({"data": 2})).init_state()
    ckpts = ckpt_lib.Checkpoints(directory)
    ckpts.save(state, data_state={"step": 0}, config=ckpt_lib.config_record(config))
    ckpts.close()
    return directory


def _args(checkpoint, out, task, *extra):
    return ["--gin_file=runs/eval.gin", f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 12}", f"--gin.CHECKPOINT_PATH='{checkpoint}'",
            f"--gin.EVAL_OUTPUT_DIR='{out}'", "--gin.NUM_EXAMPLES=6", "--gin.BATCH_SIZE=4",
            "--gin.MESH_SHAPE={'data': 2}", *extra]


def test_eval_writes_per_task_metrics(checkpoint, tmp_path, capsys, shared_data):
    out = tmp_path / "eval"
    # en_zh scores generations (BLEU, greedy decoding); poem_next_line is multiple choice.
    for task in ("en_zh", "poem_next_line"):
        code = eval_bin.main(_args(checkpoint, out, task))  # the model config is the checkpoint's
        assert code == 0, capsys.readouterr().err[-2000:]
        record = json.loads((out / "eval_validation.json").read_text())
        metrics = record["tasks"][task]
        assert record["step"] == 0 and metrics["examples"] == 6.0
        assert metrics["token_loss"] > 8.0  # ~ln(8192) for an untrained model
        assert {"en_zh": "bleu", "poem_next_line": "accuracy"}[task] in metrics, metrics
    assert list((out / "eval" / "en_zh").glob("events.out.tfevents.*"))


def test_checkpoint_of_another_model_is_named(checkpoint, tmp_path, capsys):
    # A model config given explicitly overrides the checkpoint's: tiny.gin's 512-entry vocabulary.
    code = eval_bin.main(_args(checkpoint, tmp_path, "poem_next_line", "--gin_file=models/tiny.gin",
                               "--gin.cpm2_jax.eval.evaluate.model_config=%MODEL_CONFIG"))
    err = capsys.readouterr().err
    assert code == 2
    assert "token_embedder/embedding" in err and "(8192, 64)" in err and "(512, 64)" in err


def test_two_processes_give_the_one_process_metrics(checkpoint, tmp_path, shared_data):
    """Two processes on localhost (jax.distributed, gloo), two fake devices each, against one
    4-device process: the same per-task metrics (decoded BLEU, teacher-forced loss)."""
    import os
    import pathlib
    import socket
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def launch(out, devices, *extra):
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                             "--xla_cpu_collective_call_terminate_timeout_seconds=900")
        args = _args(checkpoint, out, "en_zh", "--gin.MESH_SHAPE={'data': 4}", *extra)
        return subprocess.Popen([sys.executable, "-m", "cpm2_jax.eval", *args], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = [launch(multi, 2, f"--coordinator_address=127.0.0.1:{port}", "--process_count=2",
                    f"--process_index={i}") for i in range(2)]
    procs.append(launch(single, 4))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    a = json.loads((multi / "eval_validation.json").read_text())["tasks"]["en_zh"]
    b = json.loads((single / "eval_validation.json").read_text())["tasks"]["en_zh"]
    assert sorted(a) == sorted(b) and "bleu" in a and a["examples"] == 6.0
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_greedy_outputs_of_mixed_lengths_are_scored(checkpoint, tmp_path, capsys, monkeypatch, shared_data):
    """Outputs that stop at different lengths (EOS after 1..4 ids) reach seqio's metrics
    (it once failed there: np.array of ragged predictions)."""
    import dataclasses

    import numpy as np

    from cpm2_jax import decoding

    real = decoding.decode

    def stopping_early(*args, **kwargs):
        out = real(*args, **kwargs)
        tokens = np.array(out.tokens)
        for row in range(tokens.shape[0]):
            stop = row % 4 + 1
            tokens[row, stop], tokens[row, stop + 1:] = decoding.EOS_ID, 0
        return dataclasses.replace(out, tokens=tokens)

    monkeypatch.setattr(decoding, "decode", stopping_early)
    out = tmp_path / "eval"
    code = eval_bin.main(_args(checkpoint, out, "en_zh"))
    assert code == 0, capsys.readouterr().err[-2000:]
    metrics = json.loads((out / "eval_validation.json").read_text())["tasks"]["en_zh"]
    assert "bleu" in metrics and metrics["examples"] == 6.0
    assert eval_bin.prediction_rows(np.array([[5, 6, 1, 0], [5, 1, 7, 7], [5, 6, 7, 8]])) == [
        [5, 6, 1, 0], [5, 1, 0, 0], [5, 6, 7, 8]]  # ids after an EOS become pad
