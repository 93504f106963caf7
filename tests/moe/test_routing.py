"""Routers: top-k capacity and drop accounting, aux / z-loss against hand-computed values,
experts-choose, the balanced router and its inference fallback."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax.config import get_config
from cpm2_jax.errors import ConfigError
from cpm2_jax.moe.routing import (Router, capacity_for, load_balancing_loss, route_balanced,
                                  route_experts_choose, route_top_k, router_z_loss)


def logits_preferring(experts_per_token, num_experts, margin=5.0):
    """[1, S, E] logits with expert experts_per_token[s] far ahead for token s."""
    onehot = np.eye(num_experts)[np.asarray(experts_per_token)]
    return jnp.asarray(onehot[None] * margin, jnp.float32)


def test_capacity_formula_and_bad_factor():
    assert capacity_for(16, 4, 1.0) == 4
    assert capacity_for(16, 4, 1.25, k=2) == 10
    assert capacity_for(1, 32, 1.0) == 1  # decoding: one token, at least one slot
    assert capacity_for(8, 2, 10.0) == 8  # never more than S
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="capacity_factor must be > 0"):
            capacity_for(16, 4, bad)
    with pytest.raises(ConfigError, match="moe_capacity_factor must be > 0"):
        get_config("cpm2_moe_tiny", moe_capacity_factor=0.0)


def test_top1_drops_beyond_capacity_in_token_order():
    # 8 tokens, 4 experts, capacity 2: expert 0 is chosen by tokens 0,1,2,5 -> 2 and 5 dropped.
    r = route_top_k(logits_preferring([0, 0, 0, 1, 2, 0, 3, 1], 4), k=1, capacity_factor=1.0)
    assert r.capacity == 2
    assert np.asarray(r.kept[0]).tolist() == [True, True, False, True, True, False, True, True]
    assert np.asarray(r.position[0]).tolist() == [0, 1, 0, 0, 0, 0, 0, 1]
    assert float(r.fraction_dropped()) == pytest.approx(2 / 8)
    np.testing.assert_allclose(np.asarray(r.expert_load()), [2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert np.all(np.asarray(r.weight[0])[~np.asarray(r.kept[0])] == 0)
    p = jax.nn.softmax(logits_preferring([0], 4)[0, 0])
    assert float(r.weight[0, 0]) == pytest.approx(float(p[0]), rel=1e-6)  # Switch: gate = top prob


def test_top2_first_choices_have_priority():
    # Every token's first choice is expert 0, second choice expert 1; capacity 2 (cf 0.5, k 2, S 8, E 4).
    logits = jnp.asarray(np.tile([4.0, 2.0, 0.0, 0.0], (8, 1))[None], jnp.float32)
    r = route_top_k(logits, k=2, capacity_factor=0.5)
    assert r.capacity == 2
    kept = np.asarray(r.kept[0]).reshape(2, 8)  # [choice, token]
    assert kept[0].tolist() == [True, True] + [False] * 6
    assert kept[1].tolist() == [True, True] + [False] * 6
    w = np.asarray(r.weight[0]).reshape(2, 8)
    np.testing.assert_allclose(w[0, 0] + w[1, 0], 1.0, rtol=1e-6)  # GShard: renormalised gates


def test_load_balancing_and_z_loss_by_hand():
    probs = jnp.asarray([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]])
    index = jnp.argmax(probs, axis=-1)[..., None]  # experts 0, 1, 0, 2
    f = np.array([2, 1, 1]) / 4
    p = np.asarray(probs[0]).mean(0)
    assert float(load_balancing_loss(probs, index)) == pytest.approx(3 * float(np.sum(f * p)), rel=1e-6)
    # Perfect balance with uniform probabilities gives exactly 1.
    uniform = jnp.full((1, 4, 4), 0.25)
    assert float(load_balancing_loss(uniform, jnp.arange(4).reshape(1, 4, 1))) == pytest.approx(1.0)
    logits = jnp.asarray([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    z = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3)]
    assert float(router_z_loss(logits)) == pytest.approx((z[0] ** 2 + z[1] ** 2) / 2, rel=1e-6)
    r = route_top_k(logits, k=1, capacity_factor=1.0)
    assert float(r.z_loss) == pytest.approx((z[0] ** 2 + z[1] ** 2) / 2, rel=1e-6)


def test_experts_choose_takes_top_tokens_per_expert():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4))
    r = route_experts_choose(logits, capacity_factor=1.0)
    assert r.capacity == 2 and not r.token_major
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for g in range(2):
        for e in range(4):
            chosen = np.asarray(r.token[g, e * 2:(e + 1) * 2])
            assert set(chosen) == set(np.argsort(-probs[g, :, e])[:2])
            np.testing.assert_allclose(np.asarray(r.weight[g, e * 2:(e + 1) * 2]), probs[g, chosen, e], rtol=1e-6)


def test_balanced_router_train_and_eval_fallback():
    c = get_config("cpm2_moe_tiny")  # 4 experts, balanced
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, c.d_model))
    params = Router(config=c).init(jax.random.PRNGKey(1), x)
    centroids = np.asarray(params["params"]["centroids"].value)
    np.testing.assert_allclose(centroids.T @ centroids, 0.01 * np.eye(4), atol=1e-6)  # orthogonal, gain 0.1
    train = Router(config=c, deterministic=False).apply(params, x)
    assert train.capacity == 4 and train.uniform
    for g in range(3):
        assert np.bincount(np.asarray(train.expert[g]), minlength=4).tolist() == [4] * 4
    assert np.all(np.asarray(train.weight) == 1.0) and float(train.aux_loss) == 0.0
    evaluation = Router(config=c, deterministic=True).apply(params, x)
    np.testing.assert_array_equal(np.asarray(evaluation.expert), np.argmax(np.asarray(x) @ centroids, -1))
    assert evaluation.capacity == 16  # dropless argmax
    balanced_at_eval = Router(config=c.replace(moe_eval_argmax=False), deterministic=True).apply(params, x)
    np.testing.assert_array_equal(np.asarray(balanced_at_eval.expert), np.asarray(train.expert))


def test_centroids_get_no_gradient():
    c = get_config("cpm2_moe_tiny")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, c.d_model))
    params = Router(config=c).init(jax.random.PRNGKey(1), x)
    grads = jax.grad(lambda p: jnp.sum(Router(config=c).apply(p, x).entropy))(params)
    assert float(jnp.abs(grads["params"]["centroids"].value).max()) == 0.0


def test_unknown_router_and_bad_top_k():
    c = get_config("cpm2_moe_tiny", moe_router="top_one")
    with pytest.raises(ConfigError, match="did you mean"):
        Router(config=c).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, c.d_model)))
    with pytest.raises(ConfigError, match="moe_top_k"):
        get_config("cpm2_moe_tiny", moe_top_k=5)


def test_balanced_route_fn_weights_and_positions():
    r = route_balanced(jax.random.normal(jax.random.PRNGKey(3), (2, 12, 3)))
    for g in range(2):
        e, pos = np.asarray(r.expert[g]), np.asarray(r.position[g])
        for k in range(3):
            assert sorted(pos[e == k].tolist()) == [0, 1, 2, 3]
