"""Partition rules, mesh parsing, and a model initialised directly sharded on data=2, model=4."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from cpm2_jax.config import get_config
from cpm2_jax.errors import ShardingError
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.partitioning import (LOGICAL_AXIS_RULES, cpu_test_mesh, init_sharded, parse_mesh_spec,
                                   rules_for_mesh)


def test_rules_drop_absent_mesh_axes():
    rules = dict(rules_for_mesh(("data",)))
    assert rules["batch"] == "data" and rules["mlp"] is None and rules["expert"] is None
    rules = dict(rules_for_mesh(("data", "model", "expert")))
    assert rules["batch"] == ("data", "expert") and rules["heads"] == "model" and rules["expert"] == "expert"


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=8,model=8") == {"data": 8, "model": 8}
    with pytest.raises(ShardingError, match="unknown mesh axis 'modle'"):
        parse_mesh_spec("data=2,modle=4")
    with pytest.raises(ShardingError, match="'model=x' is not AXIS=SIZE"):
        parse_mesh_spec("model=x")


def _expected(logical):
    rules = dict(rules_for_mesh(("data", "model")))
    return P(*(rules.get(a) for a in logical))


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_init_follows_rules(scan):
    assert len(jax.devices()) >= 8, "conftest sets 8 fake CPU devices"
    config = get_config("tiny", scan_layers=scan)
    mesh = cpu_test_mesh(data=2, model=4)
    model = EncoderDecoder(config)
    enc = jnp.ones((2, 8), jnp.int32)
    variables, shardings = init_sharded(model, jax.random.PRNGKey(0), enc, enc, mesh=mesh)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, enc))["params"]
    logical = nn.get_partition_spec(boxed)
    flat_logical = dict(jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, P))[0])
    checked = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        want = _expected(tuple(flat_logical[path]))
        got = leaf.sharding.spec
        assert tuple(got) + (None,) * (leaf.ndim - len(got)) == tuple(want) + (None,) * (leaf.ndim - len(want)), path
        # The array really is split: each device holds 1/(ways) of it.
        ways = 4 if "model" in tuple(want) else 1
        assert leaf.addressable_shards[0].data.size * ways == leaf.size
        checked += 1
    assert checked > 10
    # Spot checks of the rules table on real names.
    p = variables["params"]
    enc_layer = p["encoder"]["layers"] if scan else p["encoder"]["layers_0"]
    lead = (None,) if scan else ()
    assert tuple(enc_layer["attention"]["query"]["kernel"].sharding.spec) == lead + (None, "model", None)
    assert tuple(enc_layer["mlp"]["wo"].sharding.spec) == lead + ("model", None)
    assert tuple(p["token_embedder"]["embedding"].sharding.spec) == ("model", None)


def test_indivisible_axis_names_parameter_and_axis():
    config = get_config("tiny", num_heads=3)
    mesh = cpu_test_mesh(data=2, model=4)
    enc = jnp.ones((2, 8), jnp.int32)
    with pytest.raises(ShardingError, match=r"attention/(query|key)/kernel has shape \(64, 3, 16\): its axis 1 \(size 3\) cannot be "
                                            r"split over mesh axis model of size 4"):
        init_sharded(EncoderDecoder(config), jax.random.PRNGKey(0), enc, enc, mesh=mesh)


def test_rules_table_names_every_model_axis():
    names = {a for a, _ in LOGICAL_AXIS_RULES}
    boxed = jax.eval_shape(lambda: EncoderDecoder(get_config("tiny")).init(
        jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)))["params"]
    used = {a for spec in jax.tree_util.tree_leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
            for a in spec}
    assert used <= names, used - names


def test_model_sharding_places_params_and_batches_by_the_rules():
    """The one place train, eval and infer take shardings from (no Trainer needed)."""
    import jax
    import numpy as np

    from cpm2_jax.config import get_config
    from cpm2_jax.errors import ShardingError
    from cpm2_jax.partitioning import ModelSharding

    sharding = ModelSharding.for_shape(get_config("tiny"), {"data": 2, "model": 4})
    assert sharding.param_shardings["token_embedder"]["embedding"].spec == jax.sharding.PartitionSpec("model", None)
    assert sharding.batch_axes == ("data",) and sharding.data_parallel_size == 2
    placed = sharding.shard_batch({"encoder_input_tokens": np.arange(8, dtype=np.int32).reshape(4, 2)})
    assert placed["encoder_input_tokens"].sharding == sharding.batch_sharding
    np.testing.assert_array_equal(np.asarray(placed["encoder_input_tokens"]), np.arange(8).reshape(4, 2))
    with pytest.raises(ShardingError, match="global batch size 3 is not divisible by the data-parallel size 2"):
        sharding.check_batch_size(3)
