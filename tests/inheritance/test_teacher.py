"""The teacher inside the jitted train step: frozen, separately sharded, exact when a = 0."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax.config import get_config
from cpm2_jax.convert.native import save_params
from cpm2_jax.datasets import DatasetConfig
from cpm2_jax.inheritance.objective import Inheritance
from cpm2_jax.inheritance.schedule import InheritanceConfig
from cpm2_jax.inheritance.teacher import load_teacher
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.optim import OptimizerConfig
from cpm2_jax.partitioning import make_mesh
from cpm2_jax.trainer import Trainer, TrainerConfig
from tests.train_fixtures import byte_pairs_dataset

# One layer per stack keeps the four compiled train steps small (the compiles are the cost).
STUDENT = get_config("tiny").replace(num_encoder_layers=1, num_decoder_layers=1)
# A differently shaped teacher: narrower, its own heads.
TEACHER = STUDENT.replace(d_model=32, d_ff=64, num_heads=4, head_dim=8)
LENGTHS = {"inputs": 16, "targets": 12}
KI_METRICS = ("lm_loss", "kd_loss", "ki_alpha", "teacher_agreement", "teacher_loss")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    ones = np.ones((1, 8), np.int32)
    params = nn.unbox(jax.jit(EncoderDecoder(TEACHER).init)(jax.random.PRNGKey(7), ones, ones))["params"]
    # A teacher with an opinion: scale its output matrix so its distribution is far from uniform.
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 3000.0
    return save_params(params, TEACHER, tmp_path_factory.mktemp("teacher") / "ckpt")


def _batches(n, batch=8):
    source = byte_pairs_dataset(DatasetConfig("byte_pairs", LENGTHS, batch_size=batch))
    return [next(source) for _ in range(n)]


def _trainer(mesh_shape, ki_cfg=None, accum=1):
    cfg = TrainerConfig(optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5), grad_accum_steps=accum)
    trainer = Trainer(STUDENT, cfg, make_mesh(mesh_shape), total_steps=50)
    if ki_cfg is not None:
        trainer.set_inheritance(Inheritance(ki_cfg, load_teacher(ki_cfg, STUDENT, trainer.mesh, trainer.rules)))
    return trainer


def _run(trainer, batches):
    state = trainer.init_state()
    for batch in batches:
        state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    return state, jax.device_get(metrics)


def test_alpha_zero_is_bit_identical_to_plain_training(teacher_dir):
    batches = _batches(2)  # N = 2 steps: the second step starts from KI-trained parameters
    plain, _ = _run(_trainer({"data": 1}), batches)
    ki = InheritanceConfig(teacher_checkpoint=str(teacher_dir), schedule="constant", alpha=0.0)
    inherited, metrics = _run(_trainer({"data": 1}, ki), batches)
    a, b = ckpt_lib.params_to_numpy(plain.params), ckpt_lib.params_to_numpy(inherited.params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert float(metrics["ki_alpha"]) == 0.0 and float(metrics["kd_loss"]) > 0.0


def test_teacher_is_frozen_has_no_optimizer_state_and_is_sharded_like_one_device(teacher_dir):
    batches = _batches(1)
    ki = InheritanceConfig(teacher_checkpoint=str(teacher_dir), inherit_steps=4)
    sharded = _trainer({"data": 2, "model": 4}, ki)
    teacher = sharded.inheritance.teacher
    before = ckpt_lib.params_to_numpy(teacher.params)
    kernel = teacher.params["decoder"]["logits_dense"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")  # its own partition rules
    state, metrics = _run(sharded, batches)
    after = ckpt_lib.params_to_numpy(teacher.params)  # still alive: never donated
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    # The optimiser state covers the student alone: same leaves as a plain trainer's.
    plain_shapes = jax.tree.map(lambda x: x.shape, _trainer({"data": 1}).abstract_state().opt_state)
    assert jax.tree.map(lambda x: x.shape, state.opt_state) == plain_shapes
    assert set(KI_METRICS) <= set(metrics)
    assert float(metrics["ki_alpha"]) == 1.0  # step 0 of the linear decay
    assert 0.0 <= float(metrics["teacher_agreement"]) <= 1.0 and float(metrics["teacher_loss"]) > 0
    # One device, the batch in two micro-batches (the teacher runs per micro-batch): same step.
    single, single_metrics = _run(_trainer({"data": 1}, ki, accum=2), batches)
    for name in ("loss", "lm_loss", "kd_loss", "teacher_loss", "teacher_agreement"):
        assert float(single_metrics[name]) == pytest.approx(float(metrics[name]), rel=1e-5, abs=1e-6), name
    one, many = ckpt_lib.params_to_numpy(single.params), ckpt_lib.params_to_numpy(state.params)
    for key in one:
        np.testing.assert_allclose(one[key], many[key], rtol=1e-4, atol=1e-6, err_msg=key)
