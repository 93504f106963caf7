"""HF MT5 <-> project conversion: logits parity with transformers, bit-exact round trips,
safetensors/pytorch_model.bin directories, and errors that name the offending key."""
from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpm2_jax.convert import (config_from_hf, config_to_hf, load_hf_checkpoint,  # noqa: E402
                              params_from_hf_state_dict, params_to_hf_state_dict, read_hf_state_dict,
                              save_hf_checkpoint)
from cpm2_jax.convert.hf_mt5 import project_shapes  # noqa: E402
from cpm2_jax.errors import CheckpointError, ConfigError  # noqa: E402
from cpm2_jax.model.attention import relative_position_bucket  # noqa: E402
from cpm2_jax.model.transformer import EncoderDecoder  # noqa: E402
from tests.convert.hf_models import TEST_CONFIG, hf_logits, numpy_state_dict, random_mt5  # noqa: E402

# (encoder valid lengths per row, decoder valid lengths per row, encoder length, decoder length).
# The last case has padded rows, encoder offsets past 64 and past max_distance 128, and decoder
# offsets past 32, so the log-spaced buckets and the last (clipped) bucket are all used.
CASES = [
    ([6], [5], 6, 5),
    ([9, 4], [7, 3], 9, 7),
    ([150, 97, 12], [70, 41, 9], 150, 70),
]


@pytest.fixture(scope="module")
def hf_model():
    return random_mt5()


@pytest.fixture(scope="module")
def hf_state(hf_model):
    return numpy_state_dict(hf_model)


def _batch(enc_valid, dec_valid, enc_len, dec_len, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, TEST_CONFIG.vocab_size, (len(enc_valid), enc_len))
    dec = rng.integers(2, TEST_CONFIG.vocab_size, (len(dec_valid), dec_len))
    enc[np.arange(enc_len)[None, :] >= np.asarray(enc_valid)[:, None]] = 0
    dec_mask = np.arange(dec_len)[None, :] < np.asarray(dec_valid)[:, None]
    dec[~dec_mask] = 0
    return enc, dec, dec_mask


def _project_logits(params, config, enc, dec):
    model = EncoderDecoder(config)
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))


def test_config_round_trip(hf_model):
    assert config_from_hf(config_to_hf(TEST_CONFIG)) == TEST_CONFIG
    assert config_from_hf(hf_model.config) == TEST_CONFIG
    assert config_from_hf(hf_model.config, scan_layers=True).scan_layers


def test_config_rejects_other_architectures():
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        config_from_hf({**config_to_hf(TEST_CONFIG), "feed_forward_proj": "gated-silu"})
    with pytest.raises(ConfigError, match="model_type"):
        config_from_hf({**config_to_hf(TEST_CONFIG), "model_type": "bart"})


@pytest.mark.parametrize("scan", [False, True])
def test_tensor_map_covers_the_model_tree(scan):
    config = TEST_CONFIG.replace(scan_layers=scan)
    model = EncoderDecoder(config)
    tokens = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))[0]
    tree = {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}
    assert tree == project_shapes(config)


def test_relative_position_buckets_match_transformers():
    from transformers.models.mt5.modeling_mt5 import MT5Attention

    offsets = np.arange(-400, 401)
    for bidirectional in (True, False):
        ours = np.asarray(relative_position_bucket(jnp.asarray(offsets), bidirectional=bidirectional))
        theirs = MT5Attention._relative_position_bucket(torch.tensor(offsets), bidirectional=bidirectional).numpy()
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_logits_match_transformers(hf_model, hf_state, scan):
    config = config_from_hf(hf_model.config, scan_layers=scan)
    params = params_from_hf_state_dict(hf_state, config)
    for enc_valid, dec_valid, enc_len, dec_len in CASES:
        enc, dec, dec_mask = _batch(enc_valid, dec_valid, enc_len, dec_len)
        ours, theirs = _project_logits(params, config, enc, dec), hf_logits(hf_model, enc, dec)
        diff = np.abs(ours - theirs)[dec_mask].max()
        assert diff <= 1e-4, f"lengths {enc_len}/{dec_len}: max abs diff {diff}"
        assert np.abs(theirs).max() > 1.0  # the comparison is not between near-zero logits


def test_a_wrong_mapping_would_be_caught(hf_model, hf_state):
    """Negative control: reversing the head order of one query projection moves the logits."""
    params = params_from_hf_state_dict(hf_state, TEST_CONFIG)
    kernel = params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    params["encoder"]["layers_0"]["attention"]["query"]["kernel"] = kernel[:, ::-1, :]
    enc, dec, dec_mask = _batch(*CASES[1])
    diff = np.abs(_project_logits(params, TEST_CONFIG, enc, dec) - hf_logits(hf_model, enc, dec))[dec_mask].max()
    assert diff > 1e-2


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_round_trips_are_bit_exact(hf_state, scan):
    config = TEST_CONFIG.replace(scan_layers=scan)
    params = params_from_hf_state_dict(hf_state, config)
    back = params_to_hf_state_dict(params, config)
    expected = {k: v for k, v in hf_state.items() if not k.endswith("embed_tokens.weight")}
    assert list(back) == list(expected)
    for key, value in expected.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    # project -> HF -> project
    again = params_from_hf_state_dict(back, config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), params, again)


def test_round_trip_from_project_params_is_bit_exact():
    """project -> HF -> project from boxed jax arrays in the scanned layout (as model.init gives)."""
    config = TEST_CONFIG.replace(scan_layers=True)
    rng = np.random.default_rng(1)
    flat = {path: jnp.asarray(rng.normal(size=shape).astype(np.float32))
            for path, shape in project_shapes(config).items()}
    params = {}
    for path, value in flat.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = nn.Partitioned(value, names=(None,) * value.ndim)
    again = params_from_hf_state_dict(params_to_hf_state_dict({"params": params}, config), config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b, strict=True), nn.unbox(params), again)


def test_bfloat16_from_torch_tensors(hf_model, hf_state):
    config = TEST_CONFIG.replace(param_dtype="bfloat16")
    torch_bf16 = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    params = params_from_hf_state_dict(torch_bf16, config)
    assert params["token_embedder"]["embedding"].dtype == jnp.bfloat16
    back = params_to_hf_state_dict(params, config)
    for key, value in back.items():
        np.testing.assert_array_equal(value.astype(np.float32), torch_bf16[key].float().numpy())


def test_hf_directory_round_trip_through_transformers(hf_model, hf_state, tmp_path):
    params = params_from_hf_state_dict(hf_state, TEST_CONFIG)
    out = save_hf_checkpoint(params, TEST_CONFIG, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = transformers.MT5ForConditionalGeneration.from_pretrained(str(out)).eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
    enc, dec, _ = _batch(*CASES[1])
    np.testing.assert_array_equal(hf_logits(reloaded, enc, dec), hf_logits(hf_model, enc, dec))
    again, config = load_hf_checkpoint(out)
    assert config == TEST_CONFIG
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), params, again)


def test_reads_transformers_save_pretrained_and_sharded_dirs(hf_model, hf_state, tmp_path):
    params = params_from_hf_state_dict(hf_state, TEST_CONFIG)
    hf_model.save_pretrained(str(tmp_path / "hf"))  # transformers' own writer
    sharded = save_hf_checkpoint(params, TEST_CONFIG, tmp_path / "sharded", max_shard_bytes=100_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    for directory in (tmp_path / "hf", sharded):
        again, _ = load_hf_checkpoint(directory)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), params, again)


def test_pytorch_bin_loads_with_weights_only_and_refuses_pickled_code(hf_model, hf_state, tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_to_hf(TEST_CONFIG)))
    torch.save(hf_model.state_dict(), directory / "pytorch_model.bin")
    again, _ = load_hf_checkpoint(directory)
    np.testing.assert_array_equal(again["decoder"]["logits_dense"]["kernel"], hf_state["lm_head.weight"].T)

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch.save({"shared.weight": Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_hf_state_dict(directory)
    assert not marker.exists()


def test_wrong_shape_missing_and_unexpected_keys_are_named(hf_state):
    bad = dict(hf_state)
    bad["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(CheckpointError) as err:
        params_from_hf_state_dict(bad, TEST_CONFIG)
    message = str(err.value)
    assert "'encoder.block.1.layer.1.DenseReluDense.wi_0.weight'" in message
    assert "(128, 64)" in message and "(100, 64)" in message

    missing = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match=r"missing key 'lm_head.weight' \(expected shape \(512, 64\)\)"):
        params_from_hf_state_dict(missing, TEST_CONFIG)

    extra = {**hf_state, "decoder.block.3.layer.0.layer_norm.weight": np.ones(64, np.float32)}
    with pytest.raises(CheckpointError, match="unexpected key 'decoder.block.3.layer.0.layer_norm.weight'"):
        params_from_hf_state_dict(extra, TEST_CONFIG)

    untied = {**hf_state, "encoder.embed_tokens.weight": hf_state["shared.weight"] + 1}
    with pytest.raises(CheckpointError, match="encoder.embed_tokens.weight"):
        params_from_hf_state_dict(untied, TEST_CONFIG)

    # A checkpoint of another size: every layer key names its shape.
    with pytest.raises(CheckpointError, match="expected shape"):
        params_from_hf_state_dict(hf_state, TEST_CONFIG.replace(d_ff=256))


def test_params_that_do_not_match_the_config_are_named(hf_state, tmp_path):
    params = params_from_hf_state_dict(hf_state, TEST_CONFIG)
    with pytest.raises(CheckpointError, match=r"unscanned \(encoder/layers_0/...\) layers .* scan_layers=True"):
        params_to_hf_state_dict(params, TEST_CONFIG.replace(scan_layers=True))
    params["decoder"]["decoder_norm"]["scale"] = np.ones(32, np.float32)
    with pytest.raises(CheckpointError, match=r"'decoder/decoder_norm/scale': expected shape \(64,\), found \(32,\)"):
        save_hf_checkpoint(params, TEST_CONFIG, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_output_directory_is_never_clobbered_or_half_written(hf_state, tmp_path, monkeypatch):
    params = params_from_hf_state_dict(hf_state, TEST_CONFIG)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not empty"):
        save_hf_checkpoint(params, TEST_CONFIG, out)
    assert (out / "keep.txt").read_text() == "precious"

    import safetensors.numpy

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(params, TEST_CONFIG, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir, no partial output
    monkeypatch.undo()

    save_hf_checkpoint(params, TEST_CONFIG, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
