"""BASE layers' token shuffle: before balanced assignment, every routing group is refilled with
tokens drawn from all groups (CPM2_FACTS "Mixture of experts": tokens are shuffled across
workers), so that a group - one worker's share under data parallelism - is a random sample of
the whole batch rather than a few whole sequences, whose tokens are alike.

As in BASE's all-to-all: each group's tokens are permuted at random, then new group j takes
chunk j (S / G tokens) of every old group:

    x1[g, s] = x[g, perm[g, s]]                                 (random, per group)
    x2 = x1.reshape(G, G, S/G, d).swapaxes(0, 1).reshape(G, S, d)  (the exchange)

Under a mesh that splits groups over devices the exchange is XLA's all-to-all. Both steps are
permutations; `unshuffle` undoes them, and their gradients are gathers (dispatch.take_rows).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from cpm2_jax.moe.dispatch import take_rows


@flax.struct.dataclass
class Shuffle:
    """The per-group permutation [G, S] and its inverse."""

    perm: jax.Array
    inverse: jax.Array


def can_shuffle(groups: int, group_size: int) -> bool:
    """The exchange needs G > 1 groups whose size G divides."""
    return groups > 1 and group_size % groups == 0


def make_shuffle(key: jax.Array, groups: int, group_size: int) -> Shuffle:
    perm = jax.vmap(lambda k: jax.random.permutation(k, group_size))(jax.random.split(key, groups))
    perm = perm.astype(jnp.int32)
    inverse = jax.vmap(lambda p: jnp.zeros_like(p).at[p].set(jnp.arange(group_size, dtype=jnp.int32)))(perm)
    return Shuffle(perm=perm, inverse=inverse)


def _exchange(x: jax.Array) -> jax.Array:
    """[G, S, ...]: new group j takes chunk j of every group (an involution)."""
    g, s = x.shape[:2]
    return jnp.swapaxes(x.reshape((g, g, s // g) + x.shape[2:]), 0, 1).reshape(x.shape)


def shuffle(x: jax.Array, plan: Shuffle) -> jax.Array:
    """x [G, S, d] -> the shuffled groups."""
    return _exchange(take_rows(x, plan.perm, plan.inverse[:, None, :]))


def unshuffle(y: jax.Array, plan: Shuffle) -> jax.Array:
    """Inverse of `shuffle`: token rows back to their own group and place."""
    return take_rows(_exchange(y), plan.inverse, plan.perm[:, None, :])
