"""Losses against hand-computed values."""
import math

import jax
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


# ------------------------------------------------------------------------------ knowledge inheritance

def _logits_of(probs, temperature):
    """Logits whose softmax at `temperature` is `probs`: z = T ln p."""
    return temperature * jnp.log(jnp.asarray(probs, jnp.float32))


def test_knowledge_inheritance_loss_hand_computed():
    # Two target tokens, three ids, T = 2. Teacher p^(T) and student q^(T) chosen exactly:
    #   token 1: p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4) -> KL = 1/2 ln 2 + 1/4 ln 1/2 = ln(2)/4
    #   token 2: p = (1/3, 1/3, 1/3), q = (1/2, 1/4, 1/4) -> KL = 1/3 ln(2/3) + 2/3 ln(4/3) = ln(32/27)/3
    # The LM term runs at T = 1: softmax(z_s) = q^2 / sum q^2, targets (1, 0) -> p = 2/3 each.
    t = 2.0
    student = jnp.stack([_logits_of([0.25, 0.5, 0.25], t), _logits_of([0.5, 0.25, 0.25], t)])[None]
    teacher = jnp.stack([_logits_of([0.5, 0.25, 0.25], t), _logits_of([1 / 3, 1 / 3, 1 / 3], t)])[None]
    kd = losses.distillation_kl(student, teacher, temperature=t)
    np.testing.assert_allclose(np.asarray(kd)[0], [4 * math.log(2) / 4, 4 * math.log(32 / 27) / 3], rtol=1e-5)
    lm_sum, _, wsum = losses.weighted_cross_entropy(student, jnp.array([[1, 0]]))
    assert float(lm_sum) == pytest.approx(2 * math.log(1.5), rel=1e-6)
    a = 0.3
    total = losses.knowledge_inheritance_mix(lm_sum / wsum, losses.weighted_sum(kd, None) / wsum, jnp.float32(a))
    expected = (1 - a) * math.log(1.5) + a * 4 * (math.log(2) / 4 + math.log(32 / 27) / 3) / 2
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert kd.dtype == jnp.float32


def test_distillation_is_zero_for_equal_distributions_and_upcasts_bfloat16():
    z = jnp.array([[[0.3, -1.0, 2.0, 0.1]]], jnp.bfloat16)
    kd = losses.distillation_kl(z, z, temperature=2.0)
    assert kd.dtype == jnp.float32 and abs(float(kd[0, 0])) < 1e-6


def test_distillation_renormalises_over_shared_ids():
    # The teacher lacks id 2 (its logit -inf after mapping): both distributions are
    # renormalised over ids {0, 1}, and id 2 gets no gradient from the KD term (its mass is
    # learnt from the LM term only).
    t = 2.0
    shared = jnp.array([True, True, False])
    teacher = jnp.array([[_logits_of([0.75, 0.25, 1.0], t)[0], _logits_of([0.75, 0.25, 1.0], t)[1], -jnp.inf]])
    student = _logits_of([0.2, 0.2, 0.6], t)[None]  # over {0, 1}: (1/2, 1/2)
    kd = losses.distillation_kl(student, teacher, t, shared)
    expected = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert float(kd[0]) == pytest.approx(expected, rel=1e-5)
    grad = jax.grad(lambda s: losses.distillation_kl(s, teacher, t, shared).sum())(student)
    assert float(grad[0, 2]) == 0.0 and float(jnp.abs(grad[0, :2]).sum()) > 0
    # Moving mass onto the unmapped id changes nothing as long as the shared ids keep their ratio.
    shifted = student.at[0, 2].add(5.0)
    assert float(losses.distillation_kl(shifted, teacher, t, shared)[0]) == pytest.approx(float(kd[0]), rel=1e-5)


def test_topk_distillation_equals_full_when_k_is_the_vocabulary():
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    t = 2.0
    full = losses.distillation_kl(student, teacher, t)
    order = jnp.argsort(-teacher, axis=-1)
    log_z = jax.nn.logsumexp(teacher / t, axis=-1)
    topk = losses.topk_distillation_kl(student, order, jnp.take_along_axis(teacher, order, -1), log_z, t)
    np.testing.assert_allclose(np.asarray(topk), np.asarray(full), rtol=1e-5, atol=1e-6)
    # A wide, peaked teacher: 1 - sum(p) over all V ids is rounding noise, not an "other" mass.
    wide_s = jnp.asarray(rng.normal(size=(4, 512)), jnp.float32)
    wide_t = jnp.asarray(rng.normal(size=(4, 512)) * 30, jnp.float32)
    wide_order = jnp.argsort(-wide_t, axis=-1)
    wide = losses.topk_distillation_kl(wide_s, wide_order, jnp.take_along_axis(wide_t, wide_order, -1),
                                       jax.nn.logsumexp(wide_t / t, axis=-1), t)
    np.testing.assert_allclose(np.asarray(wide), np.asarray(losses.distillation_kl(wide_s, wide_t, t)), rtol=1e-4)
    # With k < V the rest of the mass is one bucket: KL over (top-k ids, other) by hand.
    k = 3
    ids = order[..., :k]
    part = losses.topk_distillation_kl(student, ids, jnp.take_along_axis(teacher, ids, -1), log_z, t)
    p = np.asarray(jax.nn.softmax(teacher / t)); q = np.asarray(jax.nn.softmax(student / t))
    pi = np.take_along_axis(p, np.asarray(ids), -1); qi = np.take_along_axis(q, np.asarray(ids), -1)
    po, qo = 1 - pi.sum(-1), 1 - qi.sum(-1)
    expected = t * t * ((pi * np.log(pi / qi)).sum(-1) + po * np.log(po / qo))
    np.testing.assert_allclose(np.asarray(part), expected, rtol=1e-4)
