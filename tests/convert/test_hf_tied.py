"""transformers 5 saves MT5 tied (no lm_head.weight): import it as CPM-2's untied head with
the factor transformers applies (checked by logits parity), T5 v1.0's ReLU FFN, and a missing
output matrix that names tie_word_embeddings."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpm2_jax.convert import load_hf_checkpoint, read_hf_state_dict  # noqa: E402
from cpm2_jax.convert.hf_mt5 import tied_head_scale  # noqa: E402
from cpm2_jax.errors import CheckpointError  # noqa: E402
from cpm2_jax.model.transformer import EncoderDecoder  # noqa: E402
from tests.convert.hf_models import TEST_CONFIG, hf_logits, random_tied_mt5  # noqa: E402


def _logits(params, config, enc, dec):
    return np.asarray(EncoderDecoder(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))


def _batch():
    rng = np.random.default_rng(0)
    enc = rng.integers(2, TEST_CONFIG.vocab_size, (2, 9))
    enc[1, 5:] = 0
    return enc, rng.integers(2, TEST_CONFIG.vocab_size, (2, 6))


@pytest.mark.parametrize("model_type, ffn", [("mt5", "gated_gelu"), ("mt5", "relu"), ("t5", "relu")])
def test_tied_checkpoint_imports_with_transformers_logits(tmp_path, model_type, ffn):
    config = TEST_CONFIG.replace(ffn_activation=ffn)
    model = random_tied_mt5(config, seed=3, model_type=model_type)
    model.save_pretrained(str(tmp_path))
    state, hf_config = read_hf_state_dict(tmp_path)
    assert "lm_head.weight" not in state and hf_config["tie_word_embeddings"] is True
    # transformers 5: MT5 ties without rescaling, T5 (scale_decoder_outputs) by d_model**-0.5.
    assert tied_head_scale(hf_config) == (1.0 if model_type == "mt5" else config.d_model ** -0.5)
    params, loaded = load_hf_checkpoint(tmp_path)
    assert loaded == config and not loaded.tie_word_embeddings
    enc, dec = _batch()
    np.testing.assert_allclose(_logits(params, loaded, enc, dec), hf_logits(model, enc, dec), atol=2e-5, rtol=1e-5)


def test_older_transformers_tied_mt5_scales_the_head():
    hf = {"model_type": "mt5", "d_model": 64, "transformers_version": "4.46.0"}
    assert tied_head_scale(hf) == 64 ** -0.5


def test_missing_output_matrix_names_tie_word_embeddings(tmp_path):
    random_tied_mt5(seed=1).save_pretrained(str(tmp_path))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
        load_hf_checkpoint(tmp_path)
