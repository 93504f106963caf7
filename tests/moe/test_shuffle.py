"""BASE token shuffle: a permutation that mixes every group into every other, undone exactly,
with gather-only gradients; the MoE layer routes the shuffled groups in training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.moe import layer as layer_lib
from cpm2_jax.moe.layer import MoeBlock
from cpm2_jax.moe.shuffle import can_shuffle, make_shuffle, shuffle, unshuffle


def test_shuffle_mixes_all_groups_and_unshuffle_undoes_it():
    g, s = 4, 12
    plan = make_shuffle(jax.random.PRNGKey(0), g, s)
    ids = jnp.arange(g * s, dtype=jnp.float32).reshape(g, s, 1)  # token id = 12 * group + place
    out = np.asarray(shuffle(ids, plan))[..., 0].astype(int)
    assert sorted(out.ravel().tolist()) == list(range(g * s))  # a permutation of all tokens
    for new_group in out:  # every new group holds S/G tokens of every old group
        assert sorted(np.bincount(new_group // s, minlength=g).tolist()) == [s // g] * g
    assert not np.array_equal(out, np.asarray(ids)[..., 0])
    np.testing.assert_array_equal(np.asarray(unshuffle(shuffle(ids, plan), plan)), np.asarray(ids))
    # Different keys, different shuffles.
    other = np.asarray(shuffle(ids, make_shuffle(jax.random.PRNGKey(1), g, s)))[..., 0]
    assert not np.array_equal(out, other)


def test_shuffle_gradients_are_the_inverse_permutation():
    g, s, d = 2, 6, 3
    plan = make_shuffle(jax.random.PRNGKey(3), g, s)
    x = jax.random.normal(jax.random.PRNGKey(4), (g, s, d))
    w = jax.random.normal(jax.random.PRNGKey(5), (g, s, d))
    grad = jax.grad(lambda x: jnp.sum(shuffle(x, plan) * w))(x)
    # d/dx sum(P(x) * w) = P^T(w) = unshuffle(w).
    np.testing.assert_allclose(np.asarray(grad), np.asarray(unshuffle(w, plan)), rtol=0, atol=0)
    grad = jax.grad(lambda x: jnp.sum(jnp.sin(unshuffle(shuffle(x, plan), plan))))(x)
    np.testing.assert_allclose(np.asarray(grad), np.cos(np.asarray(x)), rtol=1e-6)


def test_can_shuffle():
    assert can_shuffle(4, 8) and not can_shuffle(1, 8) and not can_shuffle(3, 8)


@pytest.mark.parametrize("backend", ["padded", "ragged_dot"])
def test_moe_layer_routes_the_shuffled_groups_in_training(monkeypatch, backend):
    """Layer output with the shuffle == unshuffle(layer without shuffle on the shuffled groups),
    values and gradients; without a dropout rng or at inference, no shuffle."""
    c = get_config("cpm2_moe_tiny", moe_router="balanced", init_std=0.05, moe_backend=backend, dropout_rate=0.0)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, c.d_model))  # 4 groups of 16 (one per sequence)
    params = nn.unbox(jax.jit(MoeBlock(config=c).init)(jax.random.PRNGKey(1), x))["params"]
    plans = []
    monkeypatch.setattr(layer_lib, "make_shuffle", lambda *a: plans.append(make_shuffle(*a)) or plans[-1])

    def shuffled_layer(p, x):
        return MoeBlock(config=c, deterministic=False).apply({"params": p}, x, rngs={"dropout": jax.random.PRNGKey(7)})

    def reference(p, x, plan):
        plain = MoeBlock(config=c.replace(moe_shuffle_tokens=False), deterministic=False)
        return unshuffle(plain.apply({"params": p}, shuffle(x, plan)), plan)

    y = shuffled_layer(params, x)
    assert len(plans) == 1
    plan = plans[0]
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference(params, x, plan)), rtol=1e-5, atol=1e-6)
    plain = MoeBlock(config=c, deterministic=False).apply({"params": params}, x)  # no rng: no shuffle
    assert float(jnp.max(jnp.abs(plain - y))) > 1e-4  # the shuffle changed which tokens share a group
    assert len(plans) == 1
    probe = jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
    got = jax.grad(lambda p, x: jnp.sum(shuffled_layer(p, x) * probe), argnums=(0, 1))(params, x)
    want = jax.grad(lambda p, x: jnp.sum(reference(p, x, plan) * probe), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
