"""`scan_layers` is a property of the config, not the file: per-layer <-> stacked parameters,
restored straight into a mesh's shardings in either direction, only missing leaves initialised."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax.checkpoints import layers
from cpm2_jax.config import get_config
from cpm2_jax.partitioning import make_mesh
from cpm2_jax.train import init_params_subset
from cpm2_jax.trainer import Trainer, TrainerConfig

TINY = get_config("tiny", vocab_size=128, num_decoder_layers=3)


def test_names_and_shapes_between_layouts():
    per_layer = {"encoder/layers_0/mlp/wo/kernel": (8, 4), "encoder/layers_1/mlp/wo/kernel": (8, 4),
                 "decoder/layers_0/mlp/wo/kernel": (8, 4), "token_embedder/embedding": (16, 4)}
    stacked = layers.relayout_shapes(per_layer, scanned_target=True)
    assert stacked == {"encoder/layers/mlp/wo/kernel": (2, 8, 4), "decoder/layers/mlp/wo/kernel": (1, 8, 4),
                       "token_embedder/embedding": (16, 4)}
    assert layers.relayout_shapes(stacked, scanned_target=False) == per_layer
    assert layers.sources("encoder/layers_1/mlp/wo/kernel", True, {"encoder": 2}) == (
        "index", [("encoder/layers/mlp/wo/kernel", 1)])
    assert layers.sources("encoder/layers/mlp/wo/kernel", False, {"encoder": 2}) == (
        "stack", [("encoder/layers_0/mlp/wo/kernel", None), ("encoder/layers_1/mlp/wo/kernel", None)])


@pytest.mark.parametrize("saved_scanned", [False, True], ids=["per_layer_file", "stacked_file"])
def test_restore_into_the_other_layout_on_a_mesh(tmp_path, saved_scanned):
    source = Trainer(TINY.replace(scan_layers=saved_scanned), TrainerConfig(), make_mesh({"data": 8}))
    params = source.init_state().params
    ckpt_lib.save_params(params, source.model_config, tmp_path / "ckpt")
    saved = ckpt_lib.params_to_numpy(params)

    target = Trainer(TINY.replace(scan_layers=not saved_scanned), TrainerConfig(), make_mesh({"data": 2, "model": 4}))
    loaded, plan = ckpt_lib.restore_partial(tmp_path / "ckpt", target.abstract_params(), lambda names: {})
    assert all(s is not None for s in plan.values())
    out = ckpt_lib.params_to_numpy(loaded)
    stacked, per_layer = ("decoder/layers/mlp/wi_0", "decoder/layers_2/mlp/wi_0")
    if saved_scanned:
        np.testing.assert_array_equal(out[per_layer], saved[stacked][2])
    else:
        np.testing.assert_array_equal(out[stacked][2], saved[per_layer])
    for name, leaf in ckpt_lib.param_paths.flatten(loaded).items():
        assert leaf.sharding == ckpt_lib.param_paths.flatten(target.param_shardings)[name], name
    # The whole set round trips through the other layout.
    back, config = ckpt_lib.load_params(tmp_path / "ckpt", target.model_config.replace(scan_layers=saved_scanned))
    assert config.scan_layers == saved_scanned
    for name, value in ckpt_lib.params_to_numpy(back).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)


def test_missing_parameters_alone_are_initialised(tmp_path):
    trainer = Trainer(TINY, TrainerConfig(), make_mesh({"data": 2, "model": 4}))
    full = ckpt_lib.params_to_numpy(trainer.init_state().params)
    names = ["decoder/layers_2/mlp/wo", "encoder/relpos_bias/rel_embedding"]
    fresh = init_params_subset(trainer, names)
    assert sorted(fresh) == names
    for name in names:  # the values of a full init, in the target sharding
        np.testing.assert_array_equal(np.asarray(jax.device_get(fresh[name])), full[name])
        assert fresh[name].sharding == ckpt_lib.param_paths.flatten(trainer.param_shardings)[name]
