"""Balanced assignment: exactly equal loads, total affinity within 1% of the exact optimum
(scipy's linear_sum_assignment on the problem with every expert expanded into C slots)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from cpm2_jax.errors import ConfigError
from cpm2_jax.moe.assignment import AuctionSettings, balanced_assignment, sinkhorn_prices


def exact_optimum(scores: np.ndarray) -> float:
    s, e = scores.shape
    expanded = np.repeat(scores, s // e, axis=1)  # column e*C + c: slot c of expert e
    rows, cols = linear_sum_assignment(-expanded)
    return float(expanded[rows, cols].sum())


@pytest.mark.parametrize("tokens,experts", [(8, 2), (24, 3), (64, 8), (128, 8), (256, 32)])
def test_equal_loads_and_near_optimal(tokens, experts):
    solve = jax.jit(balanced_assignment)
    for seed in range(4):
        scores = np.random.RandomState(seed).randn(tokens, experts).astype(np.float32) * 0.1
        index, _ = solve(jnp.asarray(scores))
        index = np.asarray(index)
        assert np.bincount(index, minlength=experts).tolist() == [tokens // experts] * experts
        got = float(scores[np.arange(tokens), index].sum())
        best = exact_optimum(scores)
        assert got <= best + 1e-4
        assert best - got <= 0.01 * abs(best), (got, best)


def test_under_vmap_and_exhausted_round_budget_still_balanced():
    scores = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 8))
    tight = AuctionSettings(sinkhorn_iterations=0, max_rounds_per_phase=1)  # leaves tokens unassigned
    index, rounds = jax.jit(jax.vmap(lambda a: balanced_assignment(a, tight)))(scores)
    assert np.all(np.asarray(rounds) == 1)
    for row in np.asarray(index):
        assert np.bincount(row, minlength=8).tolist() == [8] * 8


def test_trivial_cases():
    # Affinities that already prefer a balanced assignment are solved exactly.
    scores = jnp.asarray(np.kron(np.eye(4), np.ones((3, 1))), jnp.float32)  # tokens 3i..3i+2 like expert i
    solve = jax.jit(balanced_assignment)  # one program, not the auction's loops op by op
    index, _ = solve(scores)
    assert np.asarray(index).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    index, _ = solve(jnp.ones((5, 1)))  # a single expert takes everything
    assert np.asarray(index).tolist() == [0] * 5


def test_sinkhorn_prices_balance_the_soft_assignment():
    scores = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
    g = jax.jit(sinkhorn_prices, static_argnums=(1, 2, 3))(scores, 16, 0.5, 200)
    p = jax.nn.softmax((scores - g) / 0.5, axis=-1)
    np.testing.assert_allclose(np.asarray(p.sum(0)), [16] * 4, rtol=1e-3)


def test_tokens_not_divisible_by_experts():
    with pytest.raises(ConfigError, match="multiple of the number of experts"):
        balanced_assignment(jnp.zeros((10, 4)))


@pytest.mark.parametrize("experts", [1, 5, 80])
def test_best_two_matches_argmax_and_masked_max(experts):
    """Both paths of best_two (tournament, reductions) equal argmax + masked max, ties included."""
    from cpm2_jax.moe.assignment import best_two

    values = np.round(np.random.RandomState(experts).randn(experts, 300), 1).astype(np.float32)  # many ties
    best, v1, v2 = jax.jit(best_two)(jnp.asarray(values))
    ref_best = values.argmax(axis=0)
    masked = np.where(np.arange(experts)[:, None] == ref_best[None, :], -np.inf, values)
    np.testing.assert_array_equal(np.asarray(best), ref_best)
    np.testing.assert_array_equal(np.asarray(v1), values.max(axis=0))
    np.testing.assert_array_equal(np.asarray(v2), masked.max(axis=0))


def test_exact_two_key_sort_when_the_packed_key_does_not_fit(monkeypatch):
    """Groups too large for the packed uint32 key fall back to the exact (owner, -bid) sort:
    forced here, it gives the same guarantees."""
    from cpm2_jax.moe import assignment

    monkeypatch.setattr(assignment, "_MIN_BID_BITS", 33)
    for seed in range(3):
        scores = np.random.RandomState(seed).randn(128, 8).astype(np.float32) * 0.1
        index = np.asarray(jax.jit(balanced_assignment)(jnp.asarray(scores))[0])
        assert np.bincount(index, minlength=8).tolist() == [16] * 8
        best = exact_optimum(scores)
        assert best - float(scores[np.arange(128), index].sum()) <= 0.01 * abs(best)
