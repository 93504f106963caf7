"""Precomputed teacher outputs: keyed by example, read through the batch source, and with
k = vocabulary size the same loss as the teacher run inside the step."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.convert.native import save_params
from cpm2_jax.datasets import DatasetConfig
from cpm2_jax.errors import DataError
from cpm2_jax.inheritance import topk
from cpm2_jax.inheritance.objective import Inheritance, enable_inheritance
from cpm2_jax.inheritance.schedule import InheritanceConfig
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.optim import OptimizerConfig
from cpm2_jax.partitioning import make_mesh
from cpm2_jax.trainer import Trainer, TrainerConfig
from tests.train_fixtures import byte_pairs_dataset

STUDENT = get_config("tiny").replace(num_encoder_layers=1, num_decoder_layers=1)  # small compiled steps
TEACHER = STUDENT.replace(d_model=32, d_ff=64, num_heads=4, head_dim=8)
DATA = DatasetConfig("byte_pairs", {"inputs": 24, "targets": 16}, batch_size=4)


def test_topk_outputs_with_k_equal_to_the_vocabulary_match_the_in_step_teacher(tmp_path):
    ones = np.ones((1, 8), np.int32)
    params = nn.unbox(jax.jit(EncoderDecoder(TEACHER).init)(jax.random.PRNGKey(3), ones, ones))["params"]
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 3000.0
    teacher_dir = save_params(params, TEACHER, tmp_path / "teacher")
    summary = topk.write_teacher_outputs(teacher_checkpoint=str(teacher_dir), output_dir=str(tmp_path / "topk"),
                                         dataset_cfg=DATA, steps=2, k=STUDENT.vocab_size, temperature=2.0,
                                         get_dataset_fn=byte_pairs_dataset)
    assert summary["examples"] == 8 and summary["k"] == 512

    results = []
    for cfg in (InheritanceConfig(teacher_checkpoint=str(teacher_dir), inherit_steps=4),
                InheritanceConfig(teacher_outputs=str(tmp_path / "topk"), inherit_steps=4)):
        trainer = Trainer(STUDENT, TrainerConfig(optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5)),
                          make_mesh({"data": 1}), total_steps=10)
        batches = enable_inheritance(trainer, cfg, 10)(byte_pairs_dataset(DATA))
        batch = next(batches)
        assert (set(topk.TOPK_FEATURES) <= set(batch)) == bool(cfg.teacher_outputs)
        _, metrics = trainer.train_step(trainer.init_state(), trainer.shard_batch(batch))
        results.append(jax.device_get(metrics))
    in_step, precomputed = results
    for name in ("loss", "lm_loss", "kd_loss", "teacher_agreement"):
        assert float(precomputed[name]) == pytest.approx(float(in_step[name]), rel=1e-5, abs=1e-6), name
    assert float(in_step["kd_loss"]) > 0.01


def test_a_batch_without_outputs_names_the_step(tmp_path):
    keys = topk.example_keys(next(byte_pairs_dataset(DATA)))
    assert len(set(keys)) == 4
    (tmp_path / topk.META).write_text('{"temperature": 2.0, "vocab_size": 512}')
    np.savez(tmp_path / topk.ARRAYS, keys=np.asarray(keys[:3]), ids=np.zeros((3, 16, 2), np.int32),
             logits=np.zeros((3, 16, 2), np.float32), log_z=np.zeros((3, 16), np.float32))
    outputs = topk.TeacherOutputs(tmp_path).check(2.0, 512)
    source = topk.attach(byte_pairs_dataset(DATA), outputs)
    with pytest.raises(DataError, match="training batch 0: 1 example"):
        next(source)
    ki = Inheritance(InheritanceConfig(teacher_outputs=str(tmp_path), inherit_steps=4))
    assert ki.batch_features == topk.TOPK_FEATURES
