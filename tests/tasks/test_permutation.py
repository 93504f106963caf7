"""The O(1) record permutation: a bijection for every size, seeded, uniform enough to shuffle."""
import numpy as np
import pytest

from cpm2_jax.tasks.permutation import Permutation, mix


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 100, 1023, 1025, 28502])
def test_bijection_of_every_size(n):
    values = Permutation(n, key=11)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    assert [Permutation(n, key=11)[i] for i in range(min(n, 20))] == values[:20].tolist()


def test_seeded_and_out_of_range():
    a, b = Permutation(1000, 1)(np.arange(1000)), Permutation(1000, 2)(np.arange(1000))
    assert np.array_equal(a, Permutation(1000, 1)(np.arange(1000))) and not np.array_equal(a, b)
    with pytest.raises(IndexError):
        Permutation(10, 0)[10]
    assert mix(1, 2) != mix(2, 1) and mix(1, 2) == mix(1, 2)


def test_positions_are_spread_like_a_random_permutation():
    """Where the first 100 records of a 10,000-record file land: spread over the whole epoch
    (mean near n/2, every tenth of the epoch hit), and consecutive positions far apart."""
    n = 10_000
    perm = Permutation(n, key=5)
    inverse = np.empty(n, np.int64)
    inverse[perm(np.arange(n))] = np.arange(n)
    landing = inverse[:100]
    assert abs(landing.mean() - n / 2) < 0.15 * n
    assert len(set((landing * 10 // n).tolist())) == 10
    gaps = np.abs(np.diff(perm(np.arange(1000))))
    assert np.median(gaps) > n / 10
