"""HF SwitchTransformers <-> project conversion: logits parity with transformers (with and
without dropped tokens, tied and untied heads, MoE every other layer), bit-exact round trips,
directories through transformers, `cpm2 convert` model-type dispatch, and named errors."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpm2_jax.cli import main  # noqa: E402
from cpm2_jax.convert import hf_switch, load_params, read_hf_state_dict  # noqa: E402
from cpm2_jax.errors import CheckpointError, ConfigError  # noqa: E402
from cpm2_jax.model.transformer import EncoderDecoder  # noqa: E402
from tests.convert.hf_models import SWITCH_CONFIG, hf_logits, numpy_state_dict, random_switch  # noqa: E402

# capacity 64 >= every sequence: nothing dropped; capacity 3 for 4 experts and 20 tokens: at
# least 8 tokens of every sequence are dropped (HF and the project drop the later ones).
VARIANTS = {
    "no_drop_tied": SWITCH_CONFIG,
    "drops_untied": SWITCH_CONFIG.replace(moe_expert_capacity=3, tie_word_embeddings=False, moe_router_bias=False),
    "all_moe": SWITCH_CONFIG.replace(moe_encoder_sparse_step=1, moe_expert_capacity=5),
}


@pytest.fixture(scope="module")
def models():
    return {name: random_switch(config, seed=i) for i, (name, config) in enumerate(VARIANTS.items())}


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, SWITCH_CONFIG.vocab_size, (3, 20))
    enc[1, 12:] = 0  # a padded row: padding is routed too, in both implementations
    dec = rng.integers(2, SWITCH_CONFIG.vocab_size, (3, 11))
    return enc, dec


def _project_logits(params, config, enc, dec):
    return np.asarray(jax.jit(EncoderDecoder(config).apply)({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))


def test_config_round_trip(models):
    for name, config in VARIANTS.items():
        assert hf_switch.config_from_hf(hf_switch.config_to_hf(config)) == config
        assert hf_switch.config_from_hf(models[name].config) == config
    # HF's sparse-layer rule: layer i is sparse when step == 1 or i % step == 1.
    assert [SWITCH_CONFIG.is_moe_layer("encoder", i) for i in range(4)] == [False, True, False, True]
    assert [type(b.layer[-1].mlp).__name__ for b in models["no_drop_tied"].encoder.block] == \
        ["SwitchTransformersDenseActDense", "SwitchTransformersSparseMLP"] * 2


@pytest.mark.parametrize("name, scan", [("no_drop_tied", False), ("drops_untied", False), ("all_moe", True)])
def test_logits_match_transformers(models, name, scan):
    config = VARIANTS[name].replace(scan_layers=scan)
    params = hf_switch.params_from_hf_state_dict(numpy_state_dict(models[name]), config)
    enc, dec = _batch()
    ours, theirs = _project_logits(params, config, enc, dec), hf_logits(models[name], enc, dec)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(theirs).max() > 0.5
    if VARIANTS[name].moe_expert_capacity < 20:
        # Negative control: the same weights without dropping give other logits, so the drop
        # order (not just the weights) is what matches.
        roomy = config.replace(moe_expert_capacity=64)
        assert np.abs(_project_logits(params, roomy, enc, dec) - theirs).max() > 1e-2


def test_tensor_map_covers_the_model_tree():
    for config in (SWITCH_CONFIG, VARIANTS["drops_untied"], VARIANTS["all_moe"].replace(scan_layers=True)):
        tokens = jnp.ones((1, 4), jnp.int32)
        shapes = jax.eval_shape(lambda: EncoderDecoder(config).init(jax.random.PRNGKey(0), tokens, tokens))
        leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes["params"]))[0]
        assert {tuple(k.key for k in p): tuple(x.shape) for p, x in leaves} == hf_switch.project_shapes(config)


@pytest.mark.parametrize("name, scan", [("no_drop_tied", False), ("drops_untied", False), ("all_moe", True)])
def test_round_trips_are_bit_exact(models, name, scan):
    config = VARIANTS[name].replace(scan_layers=scan)
    state = numpy_state_dict(models[name])
    params = hf_switch.params_from_hf_state_dict(state, config)
    back = hf_switch.params_to_hf_state_dict(params, config)
    # Tied, the embedding and head copies are left out; untied, transformers 5.x needs them all.
    copies = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    expected = {k: v for k, v in state.items() if not (config.tie_word_embeddings and k in copies)}
    assert list(back) == list(expected)
    for key, value in expected.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    again = hf_switch.params_from_hf_state_dict(back, config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), params, again)


def test_directory_round_trip_through_transformers(models, tmp_path):
    for name in ("no_drop_tied", "drops_untied"):
        config, model = VARIANTS[name], models[name]
        params = hf_switch.params_from_hf_state_dict(numpy_state_dict(model), config)
        out = hf_switch.save_hf_checkpoint(params, config, tmp_path / name)
        reloaded = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(str(out)).eval()
        tied = reloaded.lm_head.weight.data_ptr() == reloaded.shared.weight.data_ptr()
        assert tied == config.tie_word_embeddings
        reloaded_state, state = numpy_state_dict(reloaded), numpy_state_dict(model)
        assert sorted(reloaded_state) == sorted(state)
        for key, value in state.items():
            assert np.array_equal(reloaded_state[key], value), key
        enc, dec = _batch(1)  # (transformers may pick another attention kernel on reload: float noise)
        np.testing.assert_allclose(hf_logits(reloaded, enc, dec), hf_logits(model, enc, dec), atol=1e-5)
        again, loaded_config = hf_switch.load_hf_checkpoint(out)
        assert loaded_config == config
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), params, again)


def test_cli_detects_the_model_type(models, tmp_path, capsys):
    source = tmp_path / "switch"
    models["drops_untied"].save_pretrained(str(source))
    assert main(["convert", "from-hf", str(source), str(tmp_path / "ckpt")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_type"] == "switch_transformers"
    params, config = load_params(tmp_path / "ckpt")
    assert config == VARIANTS["drops_untied"]
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    written, hf_config = read_hf_state_dict(tmp_path / "out")
    assert hf_config["model_type"] == "switch_transformers" and hf_config["expert_capacity"] == 3
    state = numpy_state_dict(models["drops_untied"])
    assert sorted(written) == sorted(state)

    (source / "config.json").write_text(json.dumps({**json.loads((source / "config.json").read_text()),
                                                    "model_type": "switch_transformer"}))
    assert main(["convert", "from-hf", str(source), str(tmp_path / "bad")]) != 0
    assert "did you mean 'switch_transformers'" in capsys.readouterr().err


def test_errors_name_the_problem(models):
    state = numpy_state_dict(models["no_drop_tied"])
    missing = {k: v for k, v in state.items() if k != "decoder.block.2.layer.2.mlp.experts.expert_3.wo.weight"}
    with pytest.raises(CheckpointError, match=r"missing key 'decoder.block.2.layer.2.mlp.experts.expert_3.wo.weight' "
                                              r"\(expected shape \(32, 48\)\)"):
        hf_switch.params_from_hf_state_dict(missing, SWITCH_CONFIG)
    untied = {**state, "lm_head.weight": state["shared.weight"] + 1}
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from 'shared.weight'"):
        hf_switch.params_from_hf_state_dict(untied, SWITCH_CONFIG)
    # A checkpoint with MoE every layer read with every-other-layer config: expert keys are unexpected.
    with pytest.raises(CheckpointError, match="unexpected key 'encoder.block.0.layer.1.mlp.router"):
        hf_switch.params_from_hf_state_dict(numpy_state_dict(models["all_moe"]), SWITCH_CONFIG)
    with pytest.raises(ConfigError, match="moe_router='balanced'"):
        hf_switch.config_to_hf(SWITCH_CONFIG.replace(moe_router="balanced"))
    with pytest.raises(ConfigError, match="dense_act_fn"):
        hf_switch.config_from_hf({**hf_switch.config_to_hf(SWITCH_CONFIG), "dense_act_fn": "gelu_new"})
    with pytest.raises(ConfigError, match="scan_layers"):
        SWITCH_CONFIG.replace(scan_layers=True)
    with pytest.raises(ConfigError, match="ffn_activation must be one of gated_gelu, relu"):
        SWITCH_CONFIG.replace(ffn_activation="swiglu")
