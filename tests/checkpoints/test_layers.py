"""`scan_layers` is a property of the config, not the file: per-layer <-> stacked parameters,
restored straight into a mesh's shardings in either direction, only missing leaves initialised."""
from __future__ import annotations

import re

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


def _stacked_by_hand(per_layer: dict) -> dict:
    """The scanned layout's reference: each `X/layers_i/...` array put at index i of `X/layers/...`."""
    out, groups = {}, {}
    for name, value in per_layer.items():
        found = re.fullmatch(r"(encoder|decoder)/layers_(\d+)/(.*)", name)
        if found:
            groups.setdefault(f"{found[1]}/layers/{found[3]}", {})[int(found[2])] = value
        else:
            out[name] = value
    return {**out, **{name: np.stack([by[i] for i in range(len(by))]) for name, by in groups.items()}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One full init (params and optimiser state) of TINY on a data=2 x model=4 mesh, saved per
    layer and stacked by hand: {scanned: (directory, {name: array})}, and the trainer."""
    trainer = Trainer(TINY, TrainerConfig(), make_mesh({"data": 2, "model": 4}))
    per_layer = ckpt_lib.params_to_numpy(trainer.init_state().params)
    stacked = _stacked_by_hand(per_layer)
    scanned = TINY.replace(scan_layers=True)
    expected = ckpt_lib.param_paths.flatten(Trainer(scanned, TrainerConfig(), make_mesh({"data": 1})).abstract_params())
    assert {k: tuple(v.shape) for k, v in expected.items()} == {k: v.shape for k, v in stacked.items()}
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for is_scanned, flat, config in ((False, per_layer, TINY), (True, stacked, scanned)):
        ckpt_lib.save_params(ckpt_lib.param_paths.nest(flat), config, root / str(is_scanned))
        out[is_scanned] = (root / str(is_scanned), flat)
    return out, trainer


@pytest.mark.parametrize("saved_scanned", [False, True], ids=["per_layer_file", "stacked_file"])
def test_restore_into_the_other_layout_on_a_mesh(saved, saved_scanned):
    files, _ = saved
    directory, flat = files[saved_scanned]
    other = files[not saved_scanned][1]
    target = Trainer(TINY.replace(scan_layers=not saved_scanned), TrainerConfig(), make_mesh({"data": 2, "model": 4}))
    loaded, plan = ckpt_lib.restore_partial(directory, target.abstract_params(), lambda names: {})
    assert all(s is not None for s in plan.values())
    out = ckpt_lib.params_to_numpy(loaded)
    assert out.keys() == other.keys()
    for name, value in out.items():  # every array where the other layout has it
        np.testing.assert_array_equal(value, other[name], err_msg=name)
    for name, leaf in ckpt_lib.param_paths.flatten(loaded).items():
        assert leaf.sharding == ckpt_lib.param_paths.flatten(target.param_shardings)[name], name
    # The whole set round trips through the other layout.
    back, config = ckpt_lib.load_params(directory, target.model_config.replace(scan_layers=saved_scanned))
    assert config.scan_layers == saved_scanned
    for name, value in ckpt_lib.params_to_numpy(back).items():
        np.testing.assert_array_equal(value, flat[name], err_msg=name)


def test_missing_parameters_alone_are_initialised(saved):
    files, trainer = saved
    full = files[False][1]
    names = ["decoder/layers_2/mlp/wo", "encoder/relpos_bias/rel_embedding"]
    fresh = init_params_subset(trainer, names)
    assert sorted(fresh) == names
    for name in names:  # the values of a full init, in the target sharding
        np.testing.assert_array_equal(np.asarray(jax.device_get(fresh[name])), full[name])
        assert fresh[name].sharding == ckpt_lib.param_paths.flatten(trainer.param_shardings)[name]
