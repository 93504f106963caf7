"""The split MoE block (route / per-expert compute with weights as arguments / combine) equals
`MoeBlock` at inference for every router, and experts can run in any order."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.moe.layer import MoeBlock
from cpm2_jax.offload import split_moe

CASES = [("balanced", 1, 1.0, {}), ("top_k", 1, 1.0, {}), ("top_k", 2, 2.0, {"moe_group_size": 8}),
         ("experts_choose", 1, 1.0, {}),
         ("top_k", 1, 4.0, {"moe_expert_norm": False, "ffn_activation": "relu", "moe_router_bias": True})]


def setup(router, k, cf, extra, shape=(2, 16, 64)):
    c = get_config("cpm2_moe_tiny", moe_router=router, moe_top_k=k, moe_capacity_factor=cf, init_std=0.05,
                   **extra)
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = nn.unbox(MoeBlock(config=c).init(jax.random.PRNGKey(1), x))["params"]
    # Make the experts differ from one another (and the router bias non-zero).
    params = jax.tree.map(lambda a: a * (1 + 0.2 * jnp.arange(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1)))
                          if a.ndim > 1 else a + 0.3, params)
    return c, params, x


@pytest.mark.parametrize("router,k,cf,extra", CASES)
def test_split_path_equals_moe_block(router, k, cf, extra):
    c, params, x = setup(router, k, cf, extra)
    expected = MoeBlock(config=c, deterministic=True).apply({"params": params}, x)
    got = split_moe.moe_resident(c, params, x)
    assert float(jnp.abs(expected).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_single_token_steps_and_any_expert_order():
    """Decoding steps (one token per sequence) and experts run in reverse order."""
    c, params, x = setup("top_k", 2, 2.0, {}, shape=(3, 1, 64))
    expected = MoeBlock(config=c, deterministic=True).apply({"params": params}, x)
    routed = split_moe.route(c, params["router"], x)
    counts = np.asarray(routed.counts)
    assert counts.sum() == 6 and len(counts) == c.num_experts
    out = split_moe.empty_output(routed)
    starts = split_moe.offsets(counts)
    for e in reversed(range(c.num_experts)):
        if counts[e]:
            out = split_moe.expert_step(out, routed.rows, starts[e], counts[e],
                                        split_moe.expert_weights(params["experts"], e),
                                        tile=split_moe.bucket(int(counts[e])), activation=c.ffn_activation,
                                        dtype=c.dtype)
    got = split_moe.combine(out, routed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_bucket():
    assert [split_moe.bucket(n) for n in (0, 1, 2, 3, 4, 5, 31, 32, 33)] == [1, 1, 2, 4, 4, 8, 32, 32, 64]
