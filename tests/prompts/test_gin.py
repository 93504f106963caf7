"""gin/runs/prompt_tune.gin binds a prompt model, a bf16 frozen backbone, prompt-only training
and a fresh prompt over a restored backbone; `cpm2 params` reports the 11B prompt's count."""
import json

import pytest


def test_prompt_tune_run_file_binds_prompt_tuning():
    import gin

    from cpm2_jax import gin_utils
    from cpm2_jax import train as train_bin
    from cpm2_jax.checkpoints import CheckpointConfig
    from cpm2_jax.optim import OptimizerConfig
    from cpm2_jax.trainer import TrainerConfig

    train_bin.configurable_train()
    macros = ["MIXTURE_OR_TASK_NAME = 'translation_match'", "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 4}",
              "TRAIN_STEPS = 1", "MODEL_DIR = '/tmp/pt'", "INITIAL_CHECKPOINT_PATH = '/tmp/pre/checkpoints'",
              "PROMPT_PLACEMENT = 'front+middle+back'", "PROMPT_LENGTH = 30", "PROMPT_DECODER_LENGTH = 5"]
    try:
        gin_utils.parse_gin(["models/tiny.gin", "runs/prompt_tune.gin"], macros)
        config = gin_utils.model_config()
        assert config.param_dtype == "bfloat16" and config.prompt.length == 30
        assert config.prompt.counts() == ((10, 10, 10),) and config.prompt.init == "token"
        assert config.prompt.decoder_length == 5
        assert TrainerConfig().trainable == ["prompt"]
        assert OptimizerConfig().learning_rate == 0.005 and OptimizerConfig().schedule == "constant"
        assert CheckpointConfig().assignment_map == [("prompt/.*", None)]
    finally:
        gin.clear_config()


PROMPT_GIN = "--gin.cpm2_jax.model_config.prompt=@cpm2_jax.prompts.PromptConfig()"


@pytest.mark.parametrize("flags, count, percent", [
    (["--prompt_length", "100"], 409_600, 0.003623),
    # Through gin, with a 100-vector decoder prompt as well: the decoder table trains too.
    ([PROMPT_GIN, "--gin.cpm2_jax.prompts.PromptConfig.decoder_length=100"], 819_200, 0.007247),
], ids=["encoder_prompt", "gin_with_decoder_prompt"])
def test_params_reports_the_11b_prompt_count(capsys, flags, count, percent):
    from cpm2_jax import cli

    assert cli.main(["params", "--gin_file=gin/models/cpm2_11b.gin", "--optimizer", "none", *flags]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["trainable"] == {"parameters": count, "pattern": "prompt", "percent_of_backbone": percent}
    assert report["total"] == 11_304_153_088 + count
