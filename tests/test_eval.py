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
    return ["--gin_file=models/tiny.gin", "--gin_file=runs/eval.gin", f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 12}", f"--gin.CHECKPOINT_PATH='{checkpoint}'",
            f"--gin.EVAL_OUTPUT_DIR='{out}'", "--gin.NUM_EXAMPLES=6", "--gin.BATCH_SIZE=4",
            "--gin.MESH_SHAPE={'data': 2}", *extra]


def test_eval_writes_per_task_metrics(checkpoint, tmp_path, capsys, shared_data):
    out = tmp_path / "eval"
    # en_zh scores generations (BLEU, greedy decoding); poem_next_line is multiple choice.
    for task in ("en_zh", "poem_next_line"):
        code = eval_bin.main(_args(checkpoint, out, task, f"--gin.cpm2_jax.model_config.vocab_size={VOCAB}"))
        assert code == 0, capsys.readouterr().err[-2000:]
        record = json.loads((out / "eval_validation.json").read_text())
        metrics = record["tasks"][task]
        assert record["step"] == 0 and metrics["examples"] == 6.0
        assert metrics["token_loss"] > 8.0  # ~ln(8192) for an untrained model
        assert {"en_zh": "bleu", "poem_next_line": "accuracy"}[task] in metrics, metrics
    assert list((out / "eval" / "en_zh").glob("events.out.tfevents.*"))


def test_checkpoint_of_another_model_is_named(checkpoint, tmp_path, capsys):
    code = eval_bin.main(_args(checkpoint, tmp_path, "poem_next_line"))  # tiny.gin's 512-entry vocabulary
    err = capsys.readouterr().err
    assert code == 2
    assert "token_embedder/embedding" in err and "(8192, 64)" in err and "(512, 64)" in err
