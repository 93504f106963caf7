"""A seeded permutation of record indices computed one index at a time, in O(1).

The global shuffle reads record `permutation(epoch)[i]` at position i of an epoch. A
materialised `rng.permutation(n)` costs O(n) time and memory at every (re)start; this one
is a 4-round Feistel network over the smallest even number of bits covering n, with cycle
walking (re-encrypt until the value falls below n), so any position maps to its record
directly and a resume at any step costs the same:

    (L, R) -> (R, L xor F_k(R)),   F_k(x) = splitmix64(x xor k) & mask,   k = round key

A Feistel network is a bijection of [0, 2^bits) whatever F is; cycle walking restricts
it to a bijection of [0, n) (expected walk < 4 steps, since 2^bits < 4n).
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
ROUNDS = 4


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def mix(*values: int) -> int:
    """One 64-bit key from several non-negative integers (seed, epoch, shard, counter, ...)."""
    state = np.zeros(1, np.uint64)
    for value in values:
        state = splitmix64(state ^ np.uint64(int(value) & 0xFFFFFFFFFFFFFFFF))
    return int(state[0])


class Permutation:
    """Bijection of range(n) seeded by `key`; `perm[i]` or `perm(array)` in O(1) per index."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        self._keys = [np.uint64(mix(key, r)) for r in range(ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (splitmix64(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, indices) -> np.ndarray:
        x = np.asarray(indices, np.uint64)
        if x.size and (int(x.max()) >= self.n):
            raise IndexError(f"index {int(x.max())} out of range for a permutation of {self.n}")
        out = self._encrypt(x)
        walking = out >= self.n
        while walking.any():
            out[walking] = self._encrypt(out[walking])
            walking = out >= self.n
        return out.astype(np.int64)

    def __getitem__(self, index: int) -> int:
        return int(self(np.asarray([index]))[0])

    def __len__(self) -> int:
        return self.n
