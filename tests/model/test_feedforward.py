"""Gated-GELU feed-forward against a numpy reference of wo(gelu(wi_0 x) * wi_1 x)."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from cpm2_jax.model.feedforward import MlpBlock, gated_gelu


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_gated_gelu_matches_numpy():
    rng = np.random.default_rng(1)
    x, wi0, wi1, wo = (rng.normal(size=s).astype(np.float32) for s in [(2, 3, 8), (8, 16), (8, 16), (16, 8)])
    want = (np_gelu_tanh(x @ wi0) * (x @ wi1)) @ wo
    got = gated_gelu(jnp.asarray(x), jnp.asarray(wi0), jnp.asarray(wi1), jnp.asarray(wo))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_block_uses_its_three_matrices_and_no_bias():
    block = MlpBlock(d_ff=16)
    x = jnp.ones((1, 2, 8))
    params = nn.unbox(block.init(jax.random.PRNGKey(0), x))["params"]
    assert sorted(params) == ["wi_0", "wi_1", "wo"]
    np.testing.assert_allclose(np.asarray(block.apply({"params": params}, x)),
                               np.asarray(gated_gelu(x, params["wi_0"], params["wi_1"], params["wo"])), rtol=1e-6)
