"""The visit lists of kernels.metadata against a brute-force replay: every row of every local
group is stored exactly by its group's visits, every other row of a gmm output is zeroed, an
output block is only revisited on consecutive steps, and every tgmm group (empty ones too) is
opened and closed once."""
import functools

import jax
import numpy as np

from cpm2_jax.kernels.metadata import num_steps, tile_visits

M, TM, E = 37, 4, 5
M_TILES = -(-M // TM)


@functools.lru_cache(maxsize=None)
def _visits(num_groups, for_tgmm):
    return jax.jit(functools.partial(tile_visits, m_tiles=M_TILES, tm=TM, num_groups=num_groups,
                                     for_tgmm=for_tgmm))


def _cases(rng):
    yield np.zeros(E, np.int32)  # no rows
    yield np.array([0, 0, M, 0, 0])  # one group holds every row
    yield np.array([4, 8, 0, 12, 4])  # tile-aligned, sum < m
    for _ in range(12):
        yield rng.multinomial(rng.randint(0, M + 1), np.ones(E) / E).astype(np.int32)


def _replay_gmm(v, sizes, offset, groups):
    """Owner group of every row after the visits (-2: stored zero, -1: never written)."""
    out, current = np.full(M_TILES * TM, -1), None
    for s in range(len(v.tile)):
        t, g = int(v.tile[s]), int(v.group[s])
        rows = np.arange(t * TM, (t + 1) * TM)
        mine = (rows >= v.offsets[g]) & (rows < v.offsets[g + 1]) & bool(v.active[s])
        if v.first[s]:
            assert current != t, "an output tile is revisited after another tile"
            out[rows] = np.where(mine, g, -2)
        else:
            assert current == t
            out[rows] = np.where(mine, g, out[rows])
        current = t
    want = np.full(M_TILES * TM, -2)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for g in range(groups):
        want[starts[offset + g]:starts[offset + g + 1]] = g
    np.testing.assert_array_equal(out, want, err_msg=f"sizes {sizes} offset {offset}")


def _replay_tgmm(v, sizes, offset, groups):
    rows_seen, closed = {}, []
    for s in range(len(v.tile)):
        g = int(v.group[s])
        if v.first[s]:
            assert g not in rows_seen
            rows_seen[g] = 0
        if v.active[s]:
            rows = np.arange(v.tile[s] * TM, (v.tile[s] + 1) * TM)
            rows_seen[g] += int(((rows >= v.offsets[g]) & (rows < v.offsets[g + 1])).sum())
        if v.last[s]:
            closed.append(g)
    assert closed == list(range(groups))
    assert [rows_seen[g] for g in range(groups)] == list(sizes[offset:offset + groups])


def test_visits_store_every_row_once_and_zero_the_rest():
    rng = np.random.RandomState(0)
    for sizes in _cases(rng):
        for offset, groups in ((0, E), (1, 3), (3, 2)):  # all experts, then one shard's experts
            for for_tgmm, replay in ((False, _replay_gmm), (True, _replay_tgmm)):
                v = jax.device_get(_visits(groups, for_tgmm)(sizes, group_offset=offset))
                assert len(v.tile) == num_steps(M_TILES, groups)
                assert ((v.tile >= 0) & (v.tile < M_TILES)).all()
                replay(v, sizes, offset, groups)
