"""The train step: learning on real text, accumulation, trainable subsets, bf16, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax.config import get_config
from cpm2_jax.datasets import DatasetConfig
from cpm2_jax.errors import ShardingError
from cpm2_jax.optim import OptimizerConfig
from cpm2_jax.partitioning import make_mesh
from cpm2_jax.train import train
from cpm2_jax.trainer import Trainer, TrainerConfig, TrainingDivergedError
from tests.train_fixtures import byte_pairs_dataset

LENGTHS = {"inputs": 32, "targets": 32}
TINY = get_config("tiny")


def _data(split="train", batch=16, shuffle=True):
    return DatasetConfig("byte_pairs", LENGTHS, split=split, batch_size=batch, shuffle=shuffle)


def _trainer(mesh_shape=None, **kwargs):
    opt = kwargs.pop("optimizer", OptimizerConfig(learning_rate=3e-3, warmup_steps=20))
    return Trainer(kwargs.pop("model_config", TINY), TrainerConfig(optimizer=opt, **kwargs),
                   make_mesh(mesh_shape or {"data": 2, "model": 4}), total_steps=200)


def _flat(params):
    return ckpt_lib.params_to_numpy(params)


@pytest.fixture(scope="module")
def trainer():
    """One compiled tiny trainer on a data=2 x model=2 mesh, shared by the tests below."""
    return _trainer({"data": 2, "model": 2})


def test_validation_loss_drops_on_shared_data(shared_data, trainer):
    state = trainer.init_state()
    validation = byte_pairs_dataset(_data("validation", shuffle=False))
    val_batches = [next(validation) for _ in range(4)]
    before = trainer.evaluate(state.params, val_batches)
    batches = byte_pairs_dataset(_data())
    for _ in range(40):  # 6.24 -> 4.15 in 40 steps (3.43 after 150): the drop is there early
        state, metrics = trainer.train_step(state, trainer.shard_batch(next(batches)))
    after = trainer.evaluate(state.params, val_batches)
    assert before["loss"] > 6.0  # ~ln(512) for a fresh model
    assert after["loss"] < before["loss"] - 1.5, (before, after)
    assert after["accuracy"] > before["accuracy"]
    assert int(state.step) == 40 and np.isfinite(float(metrics["grad_norm"]))


def test_gradient_accumulation_equals_one_big_batch(trainer):
    batch = next(byte_pairs_dataset(_data(batch=16)))
    results = []
    for accumulating in (trainer, _trainer({"data": 2}, grad_accum_steps=4)):
        state = accumulating.init_state()
        for _ in range(2):
            state, metrics = accumulating.train_step(state, accumulating.shard_batch(batch))
        results.append((_flat(state.params), float(metrics["loss"])))
    (p1, l1), (p4, l4) = results
    assert l1 == pytest.approx(l4, rel=1e-5)
    for name in p1:
        np.testing.assert_allclose(p1[name], p4[name], rtol=1e-3, atol=1e-6, err_msg=name)


def test_trainable_subset_updates_only_it_and_keeps_no_other_moments():
    trainer = _trainer({"data": 2}, trainable=["decoder/logits_dense/.*"])
    state = trainer.init_state()
    before = _flat(state.params)
    state, _ = trainer.train_step(state, trainer.shard_batch(next(byte_pairs_dataset(_data()))))
    after = _flat(state.params)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed == ["decoder/logits_dense/kernel"]
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
    assert [m.shape for m in moments] == [after["decoder/logits_dense/kernel"].shape] * 2  # Adam mu, nu


def test_bfloat16_compute_keeps_float32_master_weights():
    trainer = _trainer({"data": 2}, model_config=TINY.replace(dtype="bfloat16"),
                       optimizer=OptimizerConfig(name="adafactor"))
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, trainer.shard_batch(next(byte_pairs_dataset(_data()))))
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype("float32")}
    assert np.isfinite(float(metrics["loss"]))


def test_indivisible_global_batch_is_a_clear_error():
    trainer = _trainer({"data": 4, "model": 2})
    with pytest.raises(ShardingError, match=r"global batch size 6 is not divisible by the data-parallel size 4"):
        trainer.check_batch_size(6)


def _poisoned(at_step):
    """byte pairs whose loss weights turn NaN from batch `at_step` on."""
    def make(config, *, shard_index=0, num_shards=1, start_step=0):
        source = byte_pairs_dataset(config, shard_index=shard_index, num_shards=num_shards, start_step=start_step)

        class Poisoned:
            def __iter__(self):
                return self

            def __next__(self):
                step = source.step
                batch = next(source)
                if step >= at_step:
                    batch["decoder_loss_weights"] = batch["decoder_loss_weights"] * np.nan
                return batch

            def state(self):
                return source.state()

        return Poisoned()

    return make


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    kwargs = dict(model_config=TINY, train_dataset_cfg=_data(batch=8), model_dir=str(tmp_path), train_steps=12,
                  checkpoint_cfg=ckpt_lib.CheckpointConfig(period=4), mesh_shape={"data": 2}, log_period=1,
                  get_dataset_fn=_poisoned(6), progress=False)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 7.*step 4, is kept"):
        train(**kwargs)
    ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints")
    assert ckpts.all_steps() == [4]
    trainer = _trainer({"data": 2})
    state, data_state, _ = ckpts.restore(None, trainer.abstract_state())
    assert int(state.step) == 4 and data_state["step"] == 4
    assert all(np.isfinite(x).all() for x in _flat(state.params).values())


def test_finetune_starts_from_another_runs_checkpoint(tmp_path):
    source = tmp_path / "pretrain" / "checkpoints"
    state = _trainer({"data": 2}).init_state()
    ckpts = ckpt_lib.Checkpoints(source)
    ckpts.save(state.replace(step=jnp.asarray(7, jnp.int32)), data_state={"step": 7}, config={})
    ckpts.close()
    summary = train(model_config=TINY, train_dataset_cfg=_data(batch=8), model_dir=str(tmp_path / "ft"),
                    train_steps=2, checkpoint_cfg=ckpt_lib.CheckpointConfig(period=0, restore_from=str(source)),
                    mesh_shape={"data": 2}, log_period=1, get_dataset_fn=byte_pairs_dataset, progress=False)
    assert summary["start_step"] == 0 and summary["step"] == 2  # a new run: step and optimizer restart
    assert np.isfinite(summary["train"]["loss"])


def test_moe_diagnostics_reach_the_train_and_eval_metrics():
    """Router load balance, dropped fraction, entropy and the router losses, averaged over
    the MoE layers, equal what the layers sow (recomputed here from a plain apply)."""
    import flax.linen as nn

    config = TINY.replace(num_experts=4, moe_router="top_k", moe_capacity_factor=1.0)
    trainer = _trainer({"data": 2}, model_config=config)
    batch = next(byte_pairs_dataset(_data(batch=8)))
    state = trainer.init_state()
    params = jax.device_get(state.params)
    _, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    evaluated = trainer.evaluate(params, [batch])
    names = {"moe/expert_utilization", "moe/load_max_over_mean", "moe/fraction_dropped", "moe/router_entropy",
             "moe/load_balancing_loss", "moe/router_z_loss"}
    assert set(trainer.moe_metric_names) == names and names <= set(metrics) and names <= set(evaluated)

    # Reference: the eval pass's sown values, reduced by hand (4 experts x 4 MoE layers).
    inputs = {k: batch[k] for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
    _, sown = trainer.model.apply({"params": params}, **inputs, enable_dropout=False,
                                  mutable=["intermediates", "aux_loss"])
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(nn.unbox(sown))[0]}
    loads = np.stack([v for k, v in flat.items() if "expert_load" in k])
    assert loads.shape == (4, 4)
    np.testing.assert_allclose(evaluated["moe/load_max_over_mean"], np.mean(loads.max(-1) * 4), rtol=1e-5)
    np.testing.assert_allclose(evaluated["moe/expert_utilization"], np.mean(loads > 0), rtol=1e-6)
    for name in names - {"moe/expert_utilization", "moe/load_max_over_mean"}:
        values = [v for k, v in flat.items() if name.split("/")[1] in k]
        assert len(values) == 4, name
        np.testing.assert_allclose(evaluated[name], np.mean(values), rtol=1e-5, err_msg=name)
    assert 1.0 <= float(metrics["moe/load_max_over_mean"]) <= 4.0
    assert float(metrics["aux_loss"]) > 0  # top-k: load-balancing + router z-loss reach the objective
    assert 0.0 <= float(metrics["moe/fraction_dropped"]) < 1.0


def test_non_finite_parameters_are_never_saved(tmp_path):
    """An infinite learning rate: the loss of step 1 (computed before the update) is finite,
    the parameters after it are not; that step is named and no checkpoint is written."""
    opt = OptimizerConfig(learning_rate=float("inf"), schedule="constant", warmup_steps=1)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 1: the parameters after the update of step 1 "
                                                    r"are not finite.*no checkpoint had been written"):
        train(model_config=TINY, train_dataset_cfg=_data(batch=8), model_dir=str(tmp_path), train_steps=3,
              trainer_cfg=TrainerConfig(optimizer=opt), checkpoint_cfg=ckpt_lib.CheckpointConfig(period=1),
              mesh_shape={"data": 2}, log_period=10, get_dataset_fn=byte_pairs_dataset, progress=False)
    assert ckpt_lib.Checkpoints(tmp_path / "checkpoints").all_steps() == []
