"""Tiny dense and MoE models shared by the offload tests (weights large enough that logits
are well separated, experts made to differ)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax.config import get_config
from cpm2_jax.model.transformer import EncoderDecoder


@functools.lru_cache(maxsize=None)
def tiny(moe: bool = True, scan: bool = False, experts: int = 4, vocab: int = 96, seed: int = 0, sparse_step: int = 1,
         std: float = 0.3, spread: bool = True):
    size = "cpm2_moe_tiny" if moe else "tiny"
    kw = dict(num_experts=experts, moe_encoder_sparse_step=sparse_step,
              moe_decoder_sparse_step=sparse_step) if moe else {}
    c = get_config(size, vocab_size=vocab, init_std=std, scan_layers=scan, **kw)
    enc = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(EncoderDecoder(c).init(jax.random.PRNGKey(seed), enc, enc)["params"])
    if moe and spread:  # experts of one layer differ more (upcycled-alike weights would route trivially)
        def spread(path, a):
            names = [getattr(k, "key", "") for k in path]
            if "experts" in names and a.ndim >= 2:
                axis = 1 if scan else 0
                shape = [1] * a.ndim
                shape[axis] = a.shape[axis]
                return a * (1 + 0.3 * jnp.arange(a.shape[axis]).reshape(shape))
            return a
        params = jax.tree_util.tree_map_with_path(spread, params)
    return c, params


def inputs(batch: int = 2, length: int = 7, vocab: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
    tokens[1:, length - 2:] = 0  # padding in the second row
    return tokens
