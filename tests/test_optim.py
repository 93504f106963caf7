"""Optimiser configs and trainable subsets (the prompt-tuning hook)."""
import jax
import jax.numpy as jnp
import optax
import pytest

from cpm2_jax import optim
from cpm2_jax.errors import ConfigError
from cpm2_jax.prompts.config import BACKBONE_PATTERN

PARAMS = {"encoder": {"prompt": {"embedding": jnp.ones((3, 4))}, "layers_0": {"mlp": {"wi": jnp.ones((4, 8))}}},
          "decoder": {"norm": {"scale": jnp.ones(4)}}}


def _shapes(tree):
    return [x.shape for x in jax.tree_util.tree_leaves(tree)]


def test_optimizer_config_builds_cpm2_recipe():
    tx, schedule = optim.OptimizerConfig(warmup_steps=10).build(100)
    assert float(schedule(10)) == pytest.approx(1e-3)  # noam: peak at the end of warm-up
    assert float(schedule(40)) == pytest.approx(1e-3 * (10 / 40) ** 0.5)  # then 1/sqrt(t)
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, PARAMS), tx.init(PARAMS), PARAMS)
    assert _shapes(updates) == _shapes(PARAMS)


def test_trainable_mask_split_and_merge():
    mask = optim.trainable_mask(PARAMS, [r"encoder/prompt/.*"])
    sub = optim.trainable_subtree(PARAMS, mask)
    assert _shapes(sub) == [(3, 4)]
    assert isinstance(sub["decoder"]["norm"]["scale"], optax.MaskedNode)
    merged = optim.merge_subtree(PARAMS, mask, jax.tree_util.tree_map(lambda x: x * 2, sub))
    assert float(merged["encoder"]["prompt"]["embedding"][0, 0]) == 2.0
    assert float(merged["encoder"]["layers_0"]["mlp"]["wi"][0, 0]) == 1.0


def test_trainable_pattern_matching_nothing_is_named():
    with pytest.raises(ConfigError, match=r"trainable pattern 'encoder/promt/.\*' matches no parameter"):
        optim.trainable_mask(PARAMS, [r"encoder/promt/.*"])


def test_trainable_patterns_match_whole_paths_only():
    params = {"prompt": {"table": jnp.ones((2, 3))}, "prompt_table_extra": {"w": jnp.ones(2)},
              "encoder": {"layers_0": {"mlp": {"wi": jnp.ones(2)}}, "layers_10": {"mlp": {"wi": jnp.ones(2)}}}}
    def chosen(patterns):
        mask = optim.trainable_mask(params, patterns)
        return sorted(optim.path_name(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m)

    # A subtree name selects its whole subtree, never a longer name that starts the same way.
    assert chosen(["prompt"]) == ["prompt/table"]
    assert chosen(["prompt/table"]) == ["prompt/table"]
    assert chosen(["encoder/layers_0"]) == ["encoder/layers_0/mlp/wi"]  # not layers_10
    assert chosen([r"prompt.*"]) == ["prompt/table", "prompt_table_extra/w"]
    # Everything but the prompt (two-stage tuning with the prompt fixed).
    assert chosen([BACKBONE_PATTERN]) == ["encoder/layers_0/mlp/wi", "encoder/layers_10/mlp/wi",
                                             "prompt_table_extra/w"]
    with pytest.raises(ConfigError, match="trainable pattern 'table' matches no parameter"):
        optim.trainable_mask(params, ["table"])
    with pytest.raises(ConfigError, match=r"trainable pattern '\(' is not a regular expression"):
        optim.trainable_mask(params, ["("])
