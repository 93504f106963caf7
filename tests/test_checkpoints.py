"""Checkpoints: keep-K, restore onto another mesh, partial restore, mismatches, kill mid-write."""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import numpy as np
import pytest

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax.config import get_config
from cpm2_jax.errors import CheckpointError
from cpm2_jax.partitioning import make_mesh
from cpm2_jax.train import init_params_subset
from cpm2_jax.trainer import Trainer, TrainerConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = get_config("tiny")


def _trainer(mesh_shape, config=TINY):
    return Trainer(config, TrainerConfig(), make_mesh(mesh_shape), total_steps=10)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1..3 of a tiny state saved on a data=2 x model=4 mesh with keep=2."""
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    trainer = _trainer({"data": 2, "model": 4})
    state = trainer.init_state()
    ckpts = ckpt_lib.Checkpoints(directory, keep=2)
    for step in (1, 2, 3):
        ckpts.save(state.replace(step=jax.numpy.asarray(step, jax.numpy.int32)), data_state={"step": step * 10},
                   config=ckpt_lib.config_record(TINY))
    ckpts.close()
    return directory, ckpt_lib.params_to_numpy(state.params), state


def test_keeps_last_k_and_restores_onto_another_mesh(saved):
    directory, params, original = saved
    ckpts = ckpt_lib.Checkpoints(directory, keep=2)
    assert ckpts.all_steps() == [2, 3] and ckpts.latest_step() == 3
    target = _trainer({"data": 8})
    state, data_state, config = ckpts.restore(None, target.abstract_state(),
                                              model_config=config_fields(TINY))
    assert int(state.step) == 3 and data_state == {"step": 30}
    assert config["model_config"]["d_model"] == TINY.d_model
    restored = ckpt_lib.params_to_numpy(state.params)
    assert restored.keys() == params.keys()
    for name in params:
        np.testing.assert_array_equal(restored[name], params[name], err_msg=name)
    kernel = state.params["decoder"]["logits_dense"]["kernel"]
    assert kernel.sharding.mesh.shape == {"data": 8}
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(original.opt_state)


def config_fields(config):
    import dataclasses

    return dataclasses.asdict(config)


def test_checkpoint_from_a_different_config_names_the_parameters(saved):
    directory, _, _ = saved
    bigger = TINY.replace(d_ff=256)
    target = _trainer({"data": 2}, bigger)
    with pytest.raises(CheckpointError) as err:
        ckpt_lib.Checkpoints(directory).restore(None, target.abstract_state(), model_config=config_fields(bigger))
    message = str(err.value)
    assert "decoder/layers_0/mlp/wi_0: checkpoint has shape (64, 128), model expects (64, 256)" in message
    assert "d_ff=128 (now 256)" in message


def test_partial_restore_with_an_assignment_map(saved):
    directory, params, _ = saved
    deeper = TINY.replace(num_decoder_layers=3)
    target = _trainer({"data": 2, "model": 4}, deeper)
    assignment = [(r"decoder/layers_2/(.*)", r"decoder/layers_1/\1"),  # the new layer copies layer 1
                  (r"encoder/relpos_bias/.*", None)]                   # re-initialised
    given = {}

    def init_missing(names):  # what `cpm2 train` does (tests/checkpoints/test_layers checks its values)
        given.update(init_params_subset(target, names))
        return given

    loaded, plan = ckpt_lib.restore_partial(directory, target.abstract_params(), init_missing,
                                            assignment_map=assignment)
    relpos = "encoder/relpos_bias/rel_embedding"
    assert sorted(given) == [relpos]  # only what the source lacks is initialised
    out = ckpt_lib.params_to_numpy(loaded)
    np.testing.assert_array_equal(out["decoder/layers_2/mlp/wi_0"], params["decoder/layers_1/mlp/wi_0"])
    np.testing.assert_array_equal(out["decoder/layers_0/mlp/wi_0"], params["decoder/layers_0/mlp/wi_0"])
    np.testing.assert_array_equal(out[relpos], np.asarray(jax.device_get(given[relpos])))
    assert plan["encoder/relpos_bias/rel_embedding"] is None
    assert plan["decoder/layers_2/self_attention/query/kernel"] == "decoder/layers_1/self_attention/query/kernel"
    new_layer = loaded["decoder"]["layers_2"]["mlp"]["wi_0"]
    assert new_layer.sharding == target.param_shardings["decoder"]["layers_2"]["mlp"]["wi_0"]
    with pytest.raises(CheckpointError, match=r"decoder/layers_2/.*does not hold"):
        ckpt_lib.restore_partial(directory, target.abstract_params(), init_missing, fallback_to_scratch=False)


# The child saves step 1, then hangs inside orbax's commit of step 2 (all data written to
# the temporary folder, the rename not yet done) until the parent SIGKILLs it.
_CHILD = textwrap.dedent("""
    import pathlib, sys, time
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from cpm2_jax.checkpoints import Checkpoints
    from cpm2_jax.train_state import TrainState

    directory, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def hanging_finalize(self):
        if self.get().name.startswith("2.orbax-checkpoint-tmp"):  # the step folder itself
            marker.write_text("writing")
            while True:
                time.sleep(1)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = hanging_finalize
    ckpts = Checkpoints(directory, keep=3)
    for step in (1, 2):
        state = TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((64, 64), float(step))},
                           opt_state=())
        ckpts.save(state, data_state={"step": step}, config={"run": "kill"})
        ckpts.wait()
""")


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    directory, marker = tmp_path / "checkpoints", tmp_path / "marker"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory), str(marker)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), child.communicate()[0].decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    partial = [p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert partial and partial[0].startswith("2."), sorted(p.name for p in directory.iterdir())
    assert (directory / partial[0] / "state").is_dir()  # step 2's arrays were on disk, uncommitted

    ckpts = ckpt_lib.Checkpoints(directory, keep=3)
    assert ckpts.all_steps() == [1]
    abstract = ckpt_lib.TrainState(step=jax.ShapeDtypeStruct((), np.int32),
                                   params={"w": jax.ShapeDtypeStruct((64, 64), np.float32)}, opt_state=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, data_state, config = ckpts.restore(None, abstract)
    assert not [w for w in caught if "Sharding info not provided" in str(w.message)]  # targets always given
    assert int(state.step) == 1 and float(state.params["w"][0, 0]) == 1.0
    assert data_state == {"step": 1} and config["run"] == "kill"
    ckpts.close()
    assert not any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())  # cleaned at the next start
