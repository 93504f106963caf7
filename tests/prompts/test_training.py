"""Prompt tuning through the Trainer: a really frozen bfloat16 backbone, optimiser state for the
prompt alone, a mixed-task batch, bad batches refused, two-stage tuning from the tuned prompt."""
import jax
import numpy as np
import pytest

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax import optim
from cpm2_jax.config import get_config
from cpm2_jax.errors import DataError
from cpm2_jax.optim import OptimizerConfig
from cpm2_jax.partitioning import make_mesh
from cpm2_jax.prompts import PromptConfig
from cpm2_jax.prompts.config import BACKBONE_PATTERN
from cpm2_jax.trainer import Trainer, TrainerConfig

PROMPT = PromptConfig(length=4, num_tasks=2, placement=("front", "front:1+middle:1+back:2"), init="normal",
                      decoder_length=2)
TUNE = get_config("tiny", vocab_size=64, prompt=PROMPT, param_dtype="bfloat16", num_encoder_layers=1,
                  num_decoder_layers=1)
ADAM = OptimizerConfig(learning_rate=5e-3, schedule="constant", weight_decay=0.0)


def _batch():
    rng = np.random.default_rng(0)
    enc = rng.integers(4, 64, size=(4, 12)).astype(np.int32)
    enc[:, 5], enc[:, 10], enc[:, 11] = 3, 1, 0  # <sep>, EOS, padding
    dec = rng.integers(4, 64, size=(4, 6)).astype(np.int32)
    dec[:, 0] = 0
    tgt = np.concatenate([dec[:, 1:], np.ones((4, 1), np.int32)], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
            "task_index": np.asarray([0, 1, 1, 0], np.int32)}


def _flat(params):
    return ckpt_lib.params_to_numpy(params)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Two prompt-tuning steps on a data=2 mesh; the state before and after, and a checkpoint."""
    trainer = Trainer(TUNE, TrainerConfig(optimizer=ADAM, trainable=["prompt"]), make_mesh({"data": 2}),
                      total_steps=2)
    state = trainer.init_state()
    before = _flat(state.params)
    batch = trainer.shard_batch(_batch())
    for _ in range(2):
        state, _ = trainer.train_step(state, batch)
    # Stage 1's result as the second stage reads it: the tuned prompt and the backbone (here cast
    # to float32 before saving, the dtype full fine-tuning trains in).
    directory = tmp_path_factory.mktemp("stage1")
    as_f32 = jax.tree_util.tree_map(lambda x: x.astype(np.float32), state.params)
    ckpts = ckpt_lib.Checkpoints(directory, async_save=False)
    ckpts.save(state.replace(params=as_f32), data_state={}, config={})
    ckpts.close()
    return trainer, before, state, directory


def test_backbone_bit_identical_and_optimizer_state_prompt_only(tuned):
    trainer, before, state, _ = tuned
    after = _flat(state.params)
    assert {"prompt/table", "prompt/decoder_table"} <= set(after)
    for name, value in after.items():
        if name.startswith("prompt/"):  # the encoder and decoder prompts train
            assert value.dtype == np.float32 and not np.array_equal(value, before[name]), name
        else:
            assert value.dtype == before[name].dtype == jax.numpy.bfloat16, name  # bf16 storage
            assert value.tobytes() == before[name].tobytes(), name
    shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(state.opt_state)}
    prompts = {(2, 4, TUNE.d_model), (2, 2, TUNE.d_model)}
    assert shapes <= {()} | prompts, shapes  # AdamW moments of the prompt tables + counters
    assert prompts <= shapes


def test_bad_batches_are_refused_before_compiling(tuned):
    trainer = tuned[0]
    batch = _batch()
    with pytest.raises(DataError, match=r"training batch: row 1 has task index 2, but the prompt table has 2"):
        trainer.shard_batch({**batch, "task_index": np.asarray([0, 2, 0, 0], np.int32)})
    no_sep = {**batch, "encoder_input_tokens": np.where(batch["encoder_input_tokens"] == 3, 5,
                                                        batch["encoder_input_tokens"])}
    with pytest.raises(DataError, match=r"row 1 \(task 1, placement 'front:1\+middle:1\+back:2'\) has no <sep>"):
        trainer.shard_batch(no_sep)


@pytest.mark.parametrize("trainable", [None, [BACKBONE_PATTERN]], ids=["prompt_trainable", "prompt_fixed"])
def test_two_stage_starts_from_the_tuned_prompt(tuned, trainable):
    """Stage 2 (full fine-tuning) restores the tuned prompt tables; with the prompt trainable a
    step moves them and the backbone. With the prompt fixed, the trainable mask is every
    backbone parameter and no prompt one (the step itself is stage 1's, masked the other way)."""
    _, _, stage1, directory = tuned
    config = TUNE.replace(param_dtype="float32")
    trainer = Trainer(config, TrainerConfig(optimizer=ADAM, trainable=trainable), make_mesh({"data": 2}),
                      total_steps=1)
    # Everything loads from stage 1 (nothing is initialised fresh).
    params, plan = ckpt_lib.restore_partial(directory, trainer.abstract_params(), lambda names: {},
                                            fallback_to_scratch=False)
    assert plan["prompt/table"] == "prompt/table" and plan["prompt/decoder_table"] == "prompt/decoder_table"
    for name in ("table", "decoder_table"):
        assert np.array_equal(np.asarray(params["prompt"][name]), np.asarray(stage1.params["prompt"][name]))
    if trainable is not None:
        mask = _flat(optim.trainable_mask(params, trainable))
        assert all(selected == (not name.startswith("prompt/")) for name, selected in mask.items()), mask
        return
    state, _ = trainer.train_step(trainer.state_from_params(params), trainer.shard_batch(_batch()))
    for name in ("table", "decoder_table"):
        assert not np.array_equal(np.asarray(state.params["prompt"][name]), np.asarray(stage1.params["prompt"][name]))
    emb_before = np.asarray(stage1.params["token_embedder"]["embedding"], np.float32)
    assert not np.array_equal(np.asarray(state.params["token_embedder"]["embedding"]), emb_before)
