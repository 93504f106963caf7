"""The training binary: exact resume after SIGKILL, operative config, and bad input."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cpm2_jax import train as train_bin

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin", "--gin_file=tests/gin/byte_pairs.gin",
       "--gin.TRAIN_STEPS=12", "--gin.BATCH_SIZE=8", "--gin.CHECKPOINT_PERIOD=4", "--gin.EVAL_PERIOD=0",
       "--gin.EVAL_STEPS=2", "--gin.WARMUP_STEPS=10", "--gin.LEARNING_RATE=3e-3",
       "--gin.cpm2_jax.model_config.dropout_rate=0.1",  # dropout keys must replay exactly too
       "--gin.cpm2_jax.train.train.log_period=1", "--no_progress"]


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2"
                         " --xla_cpu_collective_call_terminate_timeout_seconds=900",
               TF_CPP_MIN_LOG_LEVEL="3")  # the session's compilation cache comes with os.environ (conftest)
    env.update(extra)
    return env


def _start(model_dir, env):
    return subprocess.Popen([sys.executable, "-m", "cpm2_jax.train", *RUN, f"--gin.MODEL_DIR='{model_dir}'"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process):
    out, _ = process.communicate(timeout=600)  # a loaded CI machine: see the 600 s wait below
    assert process.returncode == 0, out[-3000:]
    return out


def _metrics(model_dir):
    """{(split, step): metrics} from metrics.jsonl, the last record of each step winning."""
    out, seen = {}, {}
    for line in (model_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        key = (record.pop("split"), record.pop("step"))
        record.pop("tokens_per_s", None)  # wall-clock: the one metric allowed to differ
        seen[key] = seen.get(key, 0) + 1
        out[key] = record
    return out, seen


def _final_params(model_dir):
    tree = ocp.PyTreeCheckpointer().restore(model_dir / "checkpoints" / "12" / "state")
    leaves = __import__("jax").tree_util.tree_flatten_with_path(tree["params"])[0]
    return {str(path): np.asarray(leaf) for path, leaf in leaves}


def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    pause = tmp_path / "paused"
    # One run after the other: the straight run compiles, the two below load its programs from
    # the session's compilation cache (conftest), as a resumed job on the same machine would.
    _finish(_start(straight, _env()))
    # The killed run's data iterator hangs before batch 7: 7 steps trained, step 4 saved.
    victim = _start(killed, _env(CPM2_TEST_PAUSE_AT_STEP="7", CPM2_TEST_PAUSE_FILE=str(pause)))
    deadline = time.time() + 600
    while not (pause.exists() and (killed / "checkpoints" / "4").is_dir()) and victim.poll() is None:
        assert time.time() < deadline, "the run never reached step 7"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    _, before = _metrics(killed)
    resumed_out = _finish(_start(killed, _env()))

    assert "resumed from checkpoint step 4" in resumed_out
    a, _ = _metrics(straight)
    b, seen = _metrics(killed)
    assert ("train", 7) in before and ("train", 8) not in before  # really killed after step 7
    assert set(seen.values()) == {1}  # the replayed steps 5-7 replaced their rows, not duplicated them
    assert sorted(a) == sorted(b) and ("validation", 12) in a
    for key in a:
        assert a[key] == b[key], key  # exact float equality: bit-identical metrics
    pa, pb = _final_params(straight), _final_params(killed)
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
    assert "TRAIN_STEPS = 12" in (straight / "config.gin").read_text()
    operative = (straight / "operative_config.gin").read_text()
    assert "# Parameters for train:" in operative and "TRAIN_STEPS = 12" in operative


def _main(args, capsys):
    code = train_bin.main(args)
    return code, capsys.readouterr().err


def test_missing_required_macros_are_named(capsys):
    code, err = _main(["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin"], capsys)
    assert code == 2
    # (TASK_FEATURE_LENGTHS has a default in runs/pretrain.gin: 512/114, see the comment there.)
    assert "required gin macro(s) not set: MIXTURE_OR_TASK_NAME, MODEL_DIR, TRAIN_STEPS" in err
    assert "--gin.MODEL_DIR=" in err and "Traceback" not in err


def test_unknown_gin_names_suggest_the_closest(capsys, tmp_path):
    base = ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin", "--gin_file=tests/gin/byte_pairs.gin",
            "--gin.TRAIN_STEPS=1", f"--gin.MODEL_DIR='{tmp_path}'"]
    code, err = _main(base + ["--gin.cpm2_jax.trainer.TrainerConfig.z_los=0.1"], capsys)
    assert code == 2 and "did you mean 'z_loss'" in err
    code, err = _main(base + ["--gin.cpm2_jax.optim.OptimiserConfig.name='sgd'"], capsys)
    assert code == 2 and "did you mean 'OptimizerConfig'" in err


def test_unknown_task_suggests_the_closest(capsys, tmp_path):
    code, err = _main(["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin", "--gin.TRAIN_STEPS=1",
                       f"--gin.MODEL_DIR='{tmp_path}'", "--gin.MIXTURE_OR_TASK_NAME='cpm2_pretrain_zhh'",
                       "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"], capsys)
    assert code == 2 and "unknown task or mixture 'cpm2_pretrain_zhh'" in err
    assert "did you mean 'cpm2_pretrain_zh'" in err


def test_finetune_run_file_binds_the_start_checkpoint():
    import gin

    from cpm2_jax import gin_utils
    from cpm2_jax.checkpoints import CheckpointConfig
    from cpm2_jax.datasets import DatasetConfig
    from cpm2_jax.errors import ConfigError

    train_bin.configurable_train()
    macros = ["MIXTURE_OR_TASK_NAME = 'en_zh'", "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}",
              "TRAIN_STEPS = 1", "MODEL_DIR = '/tmp/ft'"]
    try:
        with pytest.raises(ConfigError, match="not set: INITIAL_CHECKPOINT_PATH"):
            gin_utils.parse_gin(["models/tiny.gin", "runs/finetune.gin"], macros)
        gin_utils.parse_gin(["models/tiny.gin", "runs/finetune.gin"],
                            macros + ["INITIAL_CHECKPOINT_PATH = '/tmp/pre/checkpoints'"])
        assert CheckpointConfig().restore_from == "/tmp/pre/checkpoints"
        assert gin_utils.model_config().dropout_rate == 0.1
        with gin.config_scope("train"):
            assert DatasetConfig().pack is False
    finally:
        gin.clear_config()


def test_cpm2_train_cli_reports_bad_input_in_one_line(capsys):
    from cpm2_jax import cli

    assert cli.main(["train", "--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpm2 train: error: ") and "MODEL_DIR" in err and "Traceback" not in err


def _byte_run(model_dir, *extra):
    return ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin", "--gin_file=tests/gin/byte_pairs.gin",
            "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=8", f"--gin.MODEL_DIR='{model_dir}'", "--no_progress", *extra]


def test_model_dir_that_is_a_file_or_read_only_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "model_dir"
    blocker.write_text("mine")
    for model_dir, expected in ((blocker, "is a file"), (blocker / "run", "is a file"),
                                (pathlib.Path("/sys/cpm2_test_run"), "is not writable")):
        code, err = _main(_byte_run(model_dir), capsys)
        assert code == 2 and f"MODEL_DIR '{model_dir}'" in err and expected in err, err
        assert len(err.strip().splitlines()) == 1 and "--gin.MODEL_DIR" in err
    assert blocker.read_text() == "mine" and not pathlib.Path("/sys/cpm2_test_run").exists()


def test_rejected_run_keeps_config_gin_and_leaves_no_new_directory(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.gin").write_text("the config of the run that is there")
    fresh = tmp_path / "new" / "nested" / "run"
    for model_dir in (run, fresh):  # 8 fake devices: a global batch of 3 cannot be split
        code, err = _main(_byte_run(model_dir, "--gin.BATCH_SIZE=3"), capsys)
        assert code == 2 and "global batch size 3" in err, err
    assert (run / "config.gin").read_text() == "the config of the run that is there"
    assert sorted(p.name for p in run.iterdir()) == ["config.gin"]
    assert not (tmp_path / "new").exists()


def test_vocabulary_larger_than_the_model_is_named_before_step_1(capsys, tmp_path):
    # byte ids reach 255 + 3: a 200-id model cannot embed them (today: NaN or garbage at step 1).
    code, err = _main(_byte_run(tmp_path / "run", "--gin.cpm2_jax.model_config.vocab_size=200"), capsys)
    assert code == 2, err
    assert "step 1: batch feature" in err and "outside the model's vocab_size 200" in err
    assert "--gin.cpm2_jax.model_config.vocab_size" in err
    assert not (tmp_path / "run").exists()


def test_task_vocabulary_is_compared_with_the_model_vocab_size(shared_data):
    from cpm2_jax.config import get_config
    from cpm2_jax.datasets import DatasetConfig
    from cpm2_jax.errors import ConfigError

    data = DatasetConfig("en_zh", {"inputs": 32, "targets": 32})
    with pytest.raises(ConfigError, match=r"has [0-9]+ ids but the model's vocab_size is 512.*"
                                          r"--gin.cpm2_jax.model_config.vocab_size=[0-9]+"):
        train_bin.check_vocabulary(get_config("tiny"), data)
    train_bin.check_vocabulary(get_config("tiny", vocab_size=8192), data)
