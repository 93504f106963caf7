"""A checkpoint carries its model config and vocabulary: a model trained with `cpm2 train` on
`en_zh` is decoded by `cpm2 infer` and scored by `cpm2 eval` given only the checkpoint path
(no vocabulary or model flags), in a fresh cache directory, with the training environment's
outputs, and no vocabulary is trained or read from the cache there."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from cpm2_jax import checkpoints as ckpt_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 8192  # the configured vocabulary's 8,000 pieces + 100 sentinels fit
TASK = ["--gin.MIXTURE_OR_TASK_NAME='en_zh'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 12}"]
MODEL = ["--gin_file=models/tiny.gin", f"--gin.cpm2_jax.model_config.vocab_size={VOCAB}"]


def cpm2(*args, env=None, stdin=None):
    base = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([str(pathlib.Path(sys.executable).with_name("cpm2")), *map(str, args)], cwd=REPO,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=900, input=stdin)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_infer_and_eval_from_the_checkpoint_alone(tmp_path, shared_data):
    run = tmp_path / "run"
    cpm2("train", *MODEL, "--gin_file=runs/pretrain.gin", *TASK, "--gin.TRAIN_STEPS=8", "--gin.BATCH_SIZE=8",
         "--gin.EVAL_PERIOD=0", "--gin.EVAL_STEPS=1", "--gin.LEARNING_RATE=1e-2", "--gin.WARMUP_STEPS=2",
         f"--gin.MODEL_DIR='{run}'", "--no_progress")
    step = ckpt_lib.resolve(run)
    vocabulary = ckpt_lib.saved_vocabulary(step)
    assert vocabulary is not None and vocabulary.path.parent == step / "vocabulary"
    assert ckpt_lib.saved_model_config(step).vocab_size == VOCAB

    # The training environment: the configured vocabulary and the model flags, given explicitly.
    from cpm2_jax.tasks import settings

    trained_with = settings.vocabulary_path()
    assert ckpt_lib.layout.sha256_of(trained_with) == ckpt_lib.layout.sha256_of(vocabulary.path)
    lines = "\n".join(json.dumps({"inputs": text}, ensure_ascii=False)
                      for text in ("The weather is nice today.", "我们明天见。", "Thank you very much!")) + "\n"
    infer = ["infer", f"--gin.CHECKPOINT_PATH='{run}'", "--gin.infer.max_new_tokens=12"]
    there = cpm2(*infer, f"--gin.VOCABULARY='{trained_with}'", stdin=lines).stdout
    evaluate = ["eval", "--gin_file=runs/eval.gin", *TASK, f"--gin.CHECKPOINT_PATH='{run}'", "--gin.NUM_EXAMPLES=8",
                "--gin.BATCH_SIZE=4"]
    cpm2(*evaluate, *MODEL, "--gin.cpm2_jax.eval.evaluate.model_config=%MODEL_CONFIG",
         f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval_there'}'", env={"CPM2_VOCAB": str(trained_with)})

    # A fresh cache and nothing but the checkpoint: the same predictions and metrics.
    fresh = {"CPM2_CACHE_DIR": str(tmp_path / "fresh_cache")}
    here = cpm2(*infer, stdin=lines, env=fresh).stdout
    cpm2(*evaluate, f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval_here'}'", env=fresh)
    assert [json.loads(x)["output"] for x in here.splitlines()] == [json.loads(x)["output"] for x in there.splitlines()]
    assert here == there
    metrics = [json.loads((tmp_path / d / "eval_validation.json").read_text())["tasks"]
               for d in ("eval_there", "eval_here")]
    assert metrics[0] == metrics[1] and "bleu" in metrics[0]["en_zh"]
    assert not (tmp_path / "fresh_cache" / "vocab").exists()  # no vocabulary was trained or looked up
