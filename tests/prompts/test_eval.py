"""`cpm2 eval` of a prompt-tuned model on a mixture: each task's examples take its own prompt
row (the task's position in the mixture, as in training); an unknown row is one line, exit 2."""
import json

import jax
import numpy as np
import pytest

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax import eval as eval_bin
from cpm2_jax.config import get_config
from cpm2_jax.partitioning import make_mesh
from cpm2_jax.prompts import PromptConfig
from cpm2_jax.trainer import Trainer, TrainerConfig

VOCAB = 8192  # the configured test vocabulary's 8,000 pieces + 100 sentinels fit
MIXTURE = "prompt_eval_pair"  # poem_next_line (prompt row 0), translation_match (row 1): seqio's name order
TASK_B = "translation_match"


def _config(num_tasks):
    return get_config("tiny", vocab_size=VOCAB, init_std=0.3, num_encoder_layers=1, num_decoder_layers=1,
                      prompt=PromptConfig(length=3, num_tasks=num_tasks, init="normal"))


def _save(directory, config, table):
    trainer = Trainer(config, TrainerConfig(), make_mesh({"data": 1}))
    params = {**jax.device_get(trainer.init_state(jax.random.PRNGKey(0)).params), "prompt": {"table": table}}
    ckpts = ckpt_lib.Checkpoints(directory)
    ckpts.save(trainer.state_from_params(params), data_state={"step": 0}, config=ckpt_lib.config_record(config))
    ckpts.close()
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, shared_data):
    import seqio
    from cpm2_jax.tasks import pipeline

    pipeline.get_provider("poem_next_line"), pipeline.get_provider(TASK_B)  # registers the local tasks
    if MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(MIXTURE, [("poem_next_line", 1.0), (TASK_B, 1.0)])
    rng = np.random.default_rng(0)
    prompt_a, prompt_b = (rng.normal(0.0, 3.0, size=(1, 3, 64)).astype(np.float32) for _ in range(2))
    root = tmp_path_factory.mktemp("prompt_eval")
    return {"both": _save(root / "both", _config(2), np.concatenate([prompt_a, prompt_b])),
            "b": _save(root / "b", _config(1), prompt_b), "a": _save(root / "a", _config(1), prompt_a)}


def _eval(checkpoint, out, task, capsys):
    code = eval_bin.main(["--gin_file=runs/eval.gin", f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
                          "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 4}",
                          f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.EVAL_OUTPUT_DIR='{out}'",
                          "--gin.NUM_EXAMPLES=4", "--gin.BATCH_SIZE=4", "--gin.MESH_SHAPE={'data': 1}"])
    err = capsys.readouterr().err
    if code:
        return code, err
    return code, json.loads((out / "eval_validation.json").read_text())["tasks"]


def test_mixed_task_eval_uses_each_tasks_own_prompt(checkpoints, tmp_path, capsys):
    code, mixed = _eval(checkpoints["both"], tmp_path / "mixed", MIXTURE, capsys)
    assert code == 0, mixed[-2000:]
    assert set(mixed) == {"poem_next_line", TASK_B}
    # translation_match is row 1 of the two-row table: the same metrics as the task alone
    # with that prompt as its only row, and not those of row 0's prompt.
    _, alone_b = _eval(checkpoints["b"], tmp_path / "b", TASK_B, capsys)
    _, alone_a = _eval(checkpoints["a"], tmp_path / "a", TASK_B, capsys)
    for key, value in alone_b[TASK_B].items():
        assert mixed[TASK_B][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert abs(alone_a[TASK_B]["token_loss"] - alone_b[TASK_B]["token_loss"]) > 1e-3


def test_unknown_task_index_is_one_line(checkpoints, tmp_path, capsys):
    # A one-row prompt table cannot serve the mixture's second task.
    code, err = _eval(checkpoints["a"], tmp_path / "bad", MIXTURE, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and TASK_B in lines[0] and "task index 1" in lines[0], err
