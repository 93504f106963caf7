"""The InfMoE schedule: both constraints hold whenever some order satisfies them (brute force
over all orders, T <= 7); never worse than in-order on simulated makespan; the simulator by hand;
the K-aware lower bound against the best order."""
import itertools

import numpy as np
import pytest

from cpm2_jax.offload import schedule as S


def random_case(rng, t):
    b = 1.0
    c = list(rng.choice([0.25, 0.5, 1.0, 1.5, 2.0, 3.0], size=t) * rng.uniform(0.8, 1.2, size=t))
    return c, b, int(rng.integers(2, 5))


def max_resident(tl: S.Timeline) -> int:
    events = sorted([(s, 1) for s in tl.load_start] + [(e, -1) for e in tl.compute_end], key=lambda x: (x[0], x[1]))
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return peak


def test_simulator_by_hand():
    # b = 1, K = 2, c = [2, 2, 2]: load3 waits for expert 1's slot (free at 3), compute never waits.
    tl = S.simulate([0, 1, 2], [2.0, 2.0, 2.0], 1.0, 2)
    assert tl.load_start == (0.0, 1.0, 3.0) and tl.compute_start == (1.0, 3.0, 5.0) and tl.makespan == 7.0
    assert tl.compute_wait == 0.0
    # K = 1: nothing overlaps.
    assert S.simulate([0, 1], [2.0, 2.0], 1.0, 1).makespan == 6.0
    # A resident expert computes first and hides the first load.
    tl = S.simulate([1, 0], [1.0, 1.0], 1.0, 2, resident=[1])
    assert tl.load_end == (0.0, 1.0) and tl.makespan == 2.0
    # Deadlock: the only slot is held by a resident expert scheduled after a streamed one.
    assert S.simulate([0, 1], [1.0, 1.0], 1.0, 1, resident=[1]).makespan == float("inf")


def test_k_lower_bound_is_never_beaten_and_is_reached():
    """k_lower_bound against the best of all orders (T <= 6, light experts included: the last
    expert computes after its load); the by-hand case where it is the optimum."""
    rng = np.random.default_rng(7)
    slack = []
    for _ in range(150):
        t, k = int(rng.integers(2, 7)), int(rng.integers(2, 5))
        c = list(rng.choice([0.05, 0.25, 1.0, 3.0, 6.0], size=t) * rng.uniform(0.8, 1.2, size=t))
        best = min(S.simulate(p, c, 1.0, k).makespan for p in itertools.permutations(range(t)))
        bound = S.k_lower_bound(c, 1.0, k)
        assert bound <= best + 1e-9, (c, k, bound, best)
        assert bound >= S.lower_bound(c, 1.0, range(t)) - 1e-9
        slack.append(best - bound)
    assert min(slack) < 1e-9  # reached in some cases
    # K = 2, one heavy expert of 5 with three light ones of 0.1: the link idles 5 - 1 while it runs.
    c = [5.0, 0.1, 0.1, 0.1]
    assert S.k_lower_bound(c, 1.0, 2) == pytest.approx(4 + 4.0 + 0.1)
    assert min(S.simulate(p, c, 1.0, 2).makespan for p in itertools.permutations(range(4))) == pytest.approx(8.1)


@pytest.mark.parametrize("seed", range(3))
def test_constraints_hold_whenever_satisfiable_and_never_worse_than_inorder(seed):
    rng = np.random.default_rng(seed)
    satisfiable = 0
    for _ in range(60):
        t = int(rng.integers(2, 8))
        c, b, k = random_case(rng, t)
        experts = list(range(t))
        order = S.infmoe_order(c, b, k)
        assert sorted(order) == experts
        tl = S.simulate(order, c, b, k)
        assert max_resident(tl) <= k
        base = S.simulate(S.inorder(experts), c, b, k).makespan
        assert tl.makespan <= base + 1e-9
        assert tl.makespan >= S.lower_bound(c, b, experts) - 1e-9
        exists = any(S.facts_constraints(p, c, b, k) for p in itertools.permutations(experts))
        if exists:
            satisfiable += 1
            assert S.facts_constraints(order, c, b, k), (c, b, k, order)
            assert tl.makespan == pytest.approx(b + sum(c))  # the optimum: only the first load shows
    assert satisfiable >= 5  # the random cases exercise the satisfiable branch


def test_prefix_constraints_equal_the_simulated_ones():
    rng = np.random.default_rng(7)
    for _ in range(300):
        t = int(rng.integers(2, 7))
        c, b, k = random_case(rng, t)
        order = list(rng.permutation(t))
        tl = S.simulate(order, c, b, k)
        no_stall = all(abs(s - i * b) < 1e-9 for i, s in enumerate(tl.load_start))
        assert S.facts_constraints(order, c, b, k) == (no_stall and tl.compute_wait < 1e-9)


def test_degrades_gracefully_and_puts_cached_experts_first():
    # Loads dominate (all computations short): no order hides them; still never worse than in-order.
    c = [0.1] * 6
    order = S.infmoe_order(c, 1.0, 3)
    assert S.simulate(order, c, 1.0, 3).makespan <= S.simulate(S.inorder(range(6)), c, 1.0, 3).makespan
    # Skewed experts (one heavy, many light): the heavy one first hides the others' loads.
    c = [0.2, 0.2, 0.2, 0.2, 4.0]
    order = S.infmoe_order(c, 1.0, 3)
    assert order[0] == 4
    assert S.simulate(order, c, 1.0, 3).makespan < S.simulate(S.inorder(range(5)), c, 1.0, 3).makespan
    # Cached experts go first and cost no load.
    loads = [1.0, 0.0, 1.0, 0.0]
    order = S.infmoe_order([1.0, 1.0, 1.0, 1.0], loads, 3, resident=[1, 3])
    assert set(order[:2]) == {1, 3}
    # Large T uses the bounded search and still returns a permutation quickly.
    rng = np.random.default_rng(0)
    c = list(rng.zipf(1.5, size=32).clip(max=20) * 0.3)
    order = S.infmoe_order(c, 1.0, 4)
    assert sorted(order) == list(range(32))
    assert S.simulate(order, c, 1.0, 4).makespan <= S.simulate(S.inorder(range(32)), c, 1.0, 4).makespan + 1e-9


def test_zero_compute_experts_are_left_out():
    assert S.infmoe_order([0.0, 1.0, 0.0, 2.0], 1.0, 2) in ([3, 1], [1, 3])
    with pytest.raises(ValueError):
        S.infmoe_order([1.0], 1.0, 0)
