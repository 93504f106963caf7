"""Losses against hand-computed values."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax import losses


def test_cross_entropy_hand_computed():
    # logits [0, ln 2, 0]: Z = 1 + 2 + 1 = 4, p(target=1) = 1/2 -> loss ln 2; z-loss z * (ln 4)^2.
    logits = jnp.array([[0.0, math.log(2.0), 0.0]])
    soft = losses.smoothed_targets(jnp.array([1]), 3)
    loss, z = losses.cross_entropy_with_logits(logits, soft, z_loss=1e-2)
    assert float(z[0]) == pytest.approx(1e-2 * math.log(4.0) ** 2, rel=1e-6)
    assert float(loss[0]) == pytest.approx(math.log(2.0) + 1e-2 * math.log(4.0) ** 2, rel=1e-6)


def test_weighted_sum_and_accuracy():
    logits = jnp.array([[[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]]])  # predictions 0, 1, 0
    targets = jnp.array([[0, 0, 1]])
    weights = jnp.array([[1.0, 1.0, 0.0]])  # the third token is padding
    total, z, wsum = losses.weighted_cross_entropy(logits, targets, weights)
    expected = math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(2.0))
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert float(z) == 0.0 and float(wsum) == 2.0
    assert float(losses.weighted_correct(logits, targets, weights)) == 1.0


def test_label_smoothing_perfect_prediction_costs_nothing():
    # A model predicting exactly the smoothed distribution: loss minus the constant is 0.
    e, vocab = 0.1, 4
    q = np.array([1 - e, e / 3, e / 3, e / 3])
    logits = jnp.log(jnp.asarray(q))[None, None, :]
    total, _, _ = losses.weighted_cross_entropy(logits, jnp.array([[0]]), label_smoothing=e)
    assert abs(float(total)) < 1e-5
    soft = losses.smoothed_targets(jnp.array([2]), vocab, e)
    np.testing.assert_allclose(np.asarray(soft)[0], [e / 3, e / 3, 1 - e, e / 3], rtol=1e-6)


def test_bfloat16_logits_are_upcast():
    logits = jnp.array([[[1.0, 2.0, 3.0]]], jnp.bfloat16)
    total, _, _ = losses.weighted_cross_entropy(logits, jnp.array([[2]]))
    assert total.dtype == jnp.float32
    expected = -math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
    assert float(total) == pytest.approx(expected, rel=1e-3)
