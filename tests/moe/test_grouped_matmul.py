"""The grouped matmul: ragged_dot and the batched backends against a per-expert loop; backend choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.errors import ConfigError
from cpm2_jax.moe.grouped_matmul import grouped_matmul, select_backend


def test_ragged_and_batched_match_a_loop():
    rng = np.random.RandomState(0)
    sizes = np.array([3, 0, 5, 2])
    lhs = rng.randn(12, 6).astype(np.float32)  # 10 routed rows + 2 trailing (dropped) rows
    rhs = rng.randn(4, 6, 5).astype(np.float32)
    expected = np.zeros((12, 5), np.float32)
    start = 0
    for e, n in enumerate(sizes):
        expected[start:start + n] = lhs[start:start + n] @ rhs[e]
        start += n
    got = grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), backend="ragged_dot")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    batched = rng.randn(2, 4, 3, 6).astype(np.float32)  # [G, E, C, K]
    for backend in ("padded", "einsum"):
        got = grouped_matmul(jnp.asarray(batched), jnp.asarray(rhs), backend=backend)
        np.testing.assert_allclose(np.asarray(got), np.einsum("geck,ekn->gecn", batched, rhs), rtol=1e-5, atol=1e-5)


def test_backend_selection():
    assert select_backend("einsum", routed_rows=8, padded_rows=8) == "einsum"
    assert select_backend("auto", routed_rows=8, padded_rows=8, platform="cpu") == "padded"
    assert select_backend("auto", routed_rows=8, padded_rows=8, platform="gpu") == "ragged_dot"
    # The balanced router's argmax fallback needs capacity S per expert: padding would waste E x.
    assert select_backend("auto", routed_rows=64, padded_rows=64 * 32, platform="cpu") == "ragged_dot"
    with pytest.raises(ConfigError, match="did you mean 'padded'"):
        select_backend("paded", routed_rows=1, padded_rows=1)
    with pytest.raises(ConfigError, match="kernel"):
        grouped_matmul(jnp.zeros((2, 2)), jnp.zeros((1, 2, 2)), jnp.array([2]), backend="pallas")
