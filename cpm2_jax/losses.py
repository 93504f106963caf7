"""Training losses, computed in float32 whatever the model's dtype.

The language-model loss is token cross-entropy with loss weights (padding and packed
gaps weigh 0) and T5's z-loss, which keeps the softmax normaliser near 1:

    loss_i = -sum_v q_iv log p_iv + z * (log Z_i)^2,   p = softmax(logits), Z = sum_v exp(logits)

`q` is the one-hot target, optionally label-smoothed. The knowledge-inheritance terms
(teacher logits mixed in, CPM2_FACTS "Knowledge inheritance") are at the end.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def smoothed_targets(targets: jax.Array, vocab_size: int, label_smoothing: float = 0.0) -> jax.Array:
    """One-hot targets [..., vocab]; with smoothing e: 1-e on the target, e/(V-1) elsewhere."""
    confidence = 1.0 - label_smoothing
    low = label_smoothing / max(vocab_size - 1, 1)
    one_hot = jax.nn.one_hot(targets, vocab_size, dtype=jnp.float32)
    return one_hot * (confidence - low) + low


def cross_entropy_with_logits(logits: jax.Array, soft_targets: jax.Array, z_loss: float = 0.0
                              ) -> tuple[jax.Array, jax.Array]:
    """Per-token loss and its z-loss part: (-sum_v q log softmax(x) + z (log Z)^2, z (log Z)^2).

    Float32 throughout; log Z is the log-sum-exp of the logits (stable: max subtracted)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_softmax = logits - log_z[..., None]
    loss = -jnp.sum(soft_targets * log_softmax, axis=-1)
    z_part = z_loss * jnp.square(log_z)
    return loss + z_part, z_part


def hard_cross_entropy(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy_with_logits` for one-hot targets, without materialising the one-hot
    [..., vocab] tensor: -log p_target = log Z - x_target (a gather instead of a product)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    z_part = z_loss * jnp.square(log_z)
    return log_z - target_logit + z_part, z_part


def smoothing_constant(vocab_size: int, label_smoothing: float) -> float:
    """The entropy of the smoothed target distribution: subtracting it makes a perfect
    prediction cost 0 (reported loss comparable with and without smoothing)."""
    if label_smoothing <= 0.0:
        return 0.0
    confidence = 1.0 - label_smoothing
    low = label_smoothing / max(vocab_size - 1, 1)
    return -(confidence * jnp.log(confidence) + (vocab_size - 1) * low * jnp.log(low + 1e-20))


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array] = None, *,
                           label_smoothing: float = 0.0, z_loss: float = 0.0
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed (not averaged) weighted cross-entropy over all tokens.

    Returns (loss_sum, z_loss_sum, weight_sum). The trainer divides by the weight sum of
    the whole global batch, so gradient accumulation over micro-batches equals one big step.
    """
    vocab = logits.shape[-1]
    if label_smoothing > 0.0:
        soft = smoothed_targets(targets, vocab, label_smoothing)
        loss, z_part = cross_entropy_with_logits(logits, soft, z_loss)
        loss = loss - smoothing_constant(vocab, label_smoothing)
    else:
        loss, z_part = hard_cross_entropy(logits, targets, z_loss)
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(loss * w), jnp.sum(z_part * w), jnp.sum(w)


def weighted_correct(logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
    """Weighted count of tokens whose argmax prediction is the target (accuracy numerator).

    The argmax is the first index holding the maximum, found with two plain reductions (the
    max is shared with the loss's log-sum-exp): XLA:CPU's variadic (value, index) argmax
    reduction over a 52,736-wide vocabulary costs several times more."""
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    first = jnp.min(jnp.where(logits == best, index, vocab), axis=-1)
    hit = (first == targets).astype(jnp.float32)
    return jnp.sum(hit if weights is None else hit * weights.astype(jnp.float32))


# ------------------------------------------------------------------------------ knowledge inheritance
#
# KI (Qin et al., 2021; CPM2_FACTS "Knowledge inheritance"), per target position with loss
# weight w_i > 0:
#
#     L = (1 - a_t) * L_LM + a_t * T^2 * KL(p_teacher^(T) || p_student^(T)),
#     p^(T) = softmax(z / T)
#
# When the teacher knows only some of the student's ids (a smaller vocabulary mapped onto
# the student's), both distributions are renormalised over the shared ids: the ids the
# teacher lacks are learnt from the LM term alone.

def _masked_log_softmax(logits: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """log softmax over the ids where `mask` is True (others -inf); float32."""
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 2.0,
                    shared: Optional[jax.Array] = None) -> jax.Array:
    """Per-position T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) over the student's ids.

    `teacher_logits` are already on the student's ids ([..., V_student]); `shared` [V_student]
    (bool) marks the ids the teacher has: both softmaxes are renormalised over them and the
    rest contribute nothing (None: every id is shared)."""
    log_p = _masked_log_softmax(teacher_logits / temperature, shared)
    log_q = _masked_log_softmax(student_logits / temperature, shared)
    p = jnp.exp(log_p)
    terms = jnp.where(p > 0, p * (log_p - jnp.where(p > 0, log_q, 0.0)), 0.0)
    return temperature ** 2 * jnp.sum(terms, axis=-1)


def topk_distillation_kl(student_logits: jax.Array, topk_ids: jax.Array, topk_logits: jax.Array,
                         teacher_log_z: jax.Array, temperature: float = 2.0) -> jax.Array:
    """T^2 * KL over the teacher's k best ids plus one "other" bucket holding the rest of the mass.

    From precomputed teacher outputs: its top-k raw logits and ids [..., k] and
    log Z_T = logsumexp(z_teacher / T) over its whole vocabulary [...]. With k = V the other
    bucket is empty and this equals `distillation_kl`."""
    s = student_logits.astype(jnp.float32) / temperature
    log_zs = jax.nn.logsumexp(s, axis=-1)
    ids = topk_ids.astype(jnp.int32)
    log_q = jnp.take_along_axis(s, ids, axis=-1) - log_zs[..., None]
    log_p = topk_logits.astype(jnp.float32) / temperature - teacher_log_z[..., None].astype(jnp.float32)
    p = jnp.exp(log_p)
    kl = jnp.sum(p * (log_p - log_q), axis=-1)
    # The other bucket: teacher mass 1 - sum p (from its log Z), student mass outside the k ids.
    p_other = jnp.clip(1.0 - jnp.sum(p, axis=-1), 0.0, 1.0)
    hit = jnp.zeros(s.shape, bool)
    hit = jnp.put_along_axis(hit, ids, True, axis=-1, inplace=False)
    log_q_other = jax.nn.logsumexp(jnp.where(hit, -jnp.inf, s), axis=-1) - log_zs
    # k = V leaves no student id outside the k (log q_other = -inf) and a rounding-level p_other.
    safe = (p_other > 1e-7) & jnp.isfinite(log_q_other)
    other = jnp.where(safe, p_other * (jnp.log(jnp.where(safe, p_other, 1.0)) - jnp.where(safe, log_q_other, 0.0)),
                      0.0)
    return temperature ** 2 * (kl + other)


def weighted_sum(values: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
    """sum_i w_i v_i in float32 (w = 1 when None)."""
    values = values.astype(jnp.float32)
    return jnp.sum(values if weights is None else values * weights.astype(jnp.float32))


def knowledge_inheritance_mix(lm: jax.Array, kd: jax.Array, alpha: jax.Array) -> jax.Array:
    """(1 - a_t) * L_LM + a_t * L_KD (L_KD already carries the T^2 factor)."""
    return (1.0 - alpha) * lm + alpha * kd
