"""Multi-host: two processes on localhost (jax.distributed, gloo CPU collectives), two fake
devices each, train data-parallel and match one 4-device process with the same global batch."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from cpm2_jax import distributed
from cpm2_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin", "--gin_file=tests/gin/byte_pairs.gin",
       "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0", "--gin.EVAL_STEPS=2",
       "--gin.WARMUP_STEPS=3", "--gin.LEARNING_RATE=3e-3", "--gin.cpm2_jax.train.train.log_period=1",
       "--no_progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model_dir, devices, *extra, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=900",
               TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "cpm2_jax.train", *RUN, f"--gin.MODEL_DIR='{model_dir}'", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(model_dir):
    out = {}
    for line in (model_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[(record["split"], record["step"])] = record["loss"]
    return out


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    port = _free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = [_launch(multi, 2, f"--coordinator_address=127.0.0.1:{port}", "--process_count=2",
                     f"--process_index={i}", tmp_path=tmp_path) for i in range(2)]
    procs.append(_launch(single, 4, tmp_path=tmp_path))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    summary = json.loads(outputs[0].strip().splitlines()[-1])
    assert summary["step"] == 6 and (multi / "checkpoints" / "6" / "state").is_dir()
    assert not (outputs[1].strip().splitlines() or [""])[-1].startswith("{")  # only process 0 reports
    a, b = _losses(multi), _losses(single)
    assert sorted(a) == sorted(b) and ("validation", 6) in a
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert a[("train", 6)] < a[("train", 1)]


def test_bad_distributed_flags_are_clear():
    with pytest.raises(ConfigError, match="needs --process_count and --process_index"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ConfigError, match=r"--process_index 2 is not in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ConfigError, match="needs --coordinator_address"):
        distributed.initialize(None, 2, 0)
    assert distributed.initialize() is False
