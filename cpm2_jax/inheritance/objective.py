"""The knowledge-inheritance terms of one (micro-)batch, for the trainer's jitted step.

    L = (1 - a_t) * L_LM + a_t * T^2 * KL(p_teacher^(T) || p_student^(T))

Each term is a weighted sum over target positions, divided by the global batch's weight
sum like the LM loss, so gradient accumulation equals one big step. The teacher is either
run in the step (`Teacher`) or read from precomputed top-k outputs carried by the batch
(`topk.TOPK_FEATURES`).
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from cpm2_jax import losses
from cpm2_jax.inheritance.schedule import InheritanceConfig
from cpm2_jax.inheritance.teacher import Teacher
from cpm2_jax.inheritance.topk import TOPK_FEATURES

SUM_KEYS = ("kd_sum", "agree", "teacher_loss_sum", "teacher_weight")


class Inheritance:
    """A validated InheritanceConfig and its teacher (None when outputs are precomputed)."""

    def __init__(self, config: InheritanceConfig, teacher: Optional[Teacher] = None):
        self.config = config.validate()
        self.teacher = teacher
        if (teacher is None) != bool(config.teacher_outputs):
            raise ValueError("Inheritance needs a Teacher exactly when no precomputed teacher_outputs are set")

    @property
    def batch_features(self) -> tuple[str, ...]:
        """Extra batch features the step reads (the precomputed top-k outputs, if any)."""
        return () if self.teacher is not None else TOPK_FEATURES

    def teacher_outputs(self, teacher_params, micro: Mapping[str, jax.Array]) -> dict:
        """What the terms need from the teacher for this micro-batch (no gradient flows)."""
        if self.teacher is not None:
            return {"logits": self.teacher.logits(teacher_params, micro)}
        return {k: micro[k] for k in TOPK_FEATURES}

    def sums(self, student_logits: jax.Array, targets: jax.Array, weights: jax.Array, teacher: dict) -> dict:
        """Weighted sums: T^2 KL, top-1 agreement, teacher cross-entropy and its weight."""
        t = self.config.temperature
        if "logits" in teacher:
            shared = None if self.teacher is None else self.teacher.shared
            kd = losses.distillation_kl(student_logits, teacher["logits"], t, shared)
            teacher_top1 = jnp.argmax(teacher["logits"], axis=-1)
            known = weights if shared is None else weights * jnp.take(shared, targets).astype(jnp.float32)
            ce, _ = losses.hard_cross_entropy(jnp.where(jnp.isfinite(teacher["logits"]), teacher["logits"], -1e30),
                                              targets)
            teacher_loss, teacher_weight = losses.weighted_sum(ce, known), jnp.sum(known)
        else:
            kd = losses.topk_distillation_kl(student_logits, teacher["teacher_topk_ids"], teacher["teacher_topk_logits"],
                                             teacher["teacher_log_z"], t)
            teacher_top1 = teacher["teacher_topk_ids"][..., 0]
            teacher_loss = teacher_weight = jnp.zeros((), jnp.float32)
        return {"kd_sum": losses.weighted_sum(kd, weights),
                "agree": losses.weighted_correct(student_logits, teacher_top1, weights),
                "teacher_loss_sum": teacher_loss, "teacher_weight": teacher_weight}

    def mix(self, lm: jax.Array, kd: jax.Array, step) -> tuple[jax.Array, jax.Array]:
        """((1 - a_t) * lm + a_t * kd, a_t)."""
        alpha = self.config.alpha_at(step)
        return losses.knowledge_inheritance_mix(lm, kd, alpha), alpha

    def metrics(self, sums: dict, lm: jax.Array, total_weight: jax.Array, step) -> dict:
        metrics = {"lm_loss": lm, "kd_loss": sums["kd_sum"] / total_weight, "ki_alpha": self.config.alpha_at(step),
                   "teacher_agreement": sums["agree"] / total_weight}
        if self.teacher is not None:
            metrics["teacher_loss"] = sums["teacher_loss_sum"] / jnp.maximum(sums["teacher_weight"], 1.0)
        return metrics


def enable_inheritance(trainer, config: InheritanceConfig, train_steps: int):
    """Loads the teacher (or opens its precomputed outputs) and sets it on `trainer`; returns
    the function that makes the training batch source carry what the step needs."""
    from cpm2_jax.inheritance import topk
    from cpm2_jax.inheritance.teacher import load_teacher

    config = config.resolved(train_steps).validate()
    if config.teacher_outputs:
        outputs = topk.TeacherOutputs(config.teacher_outputs).check(config.temperature,
                                                                    trainer.model_config.vocab_size)
        trainer.set_inheritance(Inheritance(config))
        return lambda batches: topk.attach(batches, outputs)
    teacher = load_teacher(config, trainer.model_config, trainer.mesh, trainer.rules)
    trainer.set_inheritance(Inheritance(config, teacher))
    return lambda batches: batches
