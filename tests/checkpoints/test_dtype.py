"""A checkpoint saved in float32 restores into a bfloat16 config (the prompt-tuning backbone)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax.checkpoints import load_params, save_params
from cpm2_jax.config import get_config
from cpm2_jax.model import EncoderDecoder


def test_float32_checkpoint_restores_as_bfloat16(tmp_path):
    config = get_config("tiny").replace(d_model=16, d_ff=32, num_heads=2, head_dim=8, num_encoder_layers=1,
                                        num_decoder_layers=1, vocab_size=64)
    ones = jnp.ones((1, 4), jnp.int32)
    params = jax.jit(lambda: EncoderDecoder(config).init(jax.random.PRNGKey(0), ones, ones))()["params"]
    save_params(params, config, tmp_path / "ckpt")
    restored, _ = load_params(tmp_path / "ckpt", config.replace(param_dtype="bfloat16"))
    want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), params)
    got_leaves, want_leaves = jax.tree.leaves(restored), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for got, expected in zip(got_leaves, want_leaves):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
