"""How much of the loss is distillation at step t: the weight a_t of

    L = (1 - a_t) * L_LM + a_t * T^2 * KL(p_teacher^(T) || p_student^(T))

Schedules (pure functions of the step, traced inside the jitted step):
    linear              a_t = a_0 * max(0, 1 - t / N)    (default, the reference KI code)
    constant            a_t = a_0
    inherit_then_train  a_t = 1 for t < N, then 0        (pure distillation, then pure LM)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import jax
import jax.numpy as jnp

from cpm2_jax.errors import ConfigError

SCHEDULES = ("linear", "constant", "inherit_then_train")


def alpha_at(step, *, schedule: str = "linear", alpha: float = 1.0, inherit_steps: int = 1) -> jax.Array:
    """a_t of the named schedule at `step` (an int or a traced int32), float32."""
    t = jnp.asarray(step, jnp.float32)
    if schedule == "linear":
        return jnp.asarray(alpha, jnp.float32) * jnp.maximum(0.0, 1.0 - t / inherit_steps)
    if schedule == "constant":
        return jnp.full((), alpha, jnp.float32)
    if schedule == "inherit_then_train":
        return jnp.where(t < inherit_steps, 1.0, 0.0).astype(jnp.float32)
    raise ConfigError(f"unknown knowledge-inheritance schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


@gin.configurable(module="cpm2_jax.inheritance")
@dataclasses.dataclass(frozen=True)
class InheritanceConfig:
    """Where the teacher comes from and how its term is weighted.

    teacher_checkpoint: a checkpoint of this project run inside the step (converted dir or
      training run); teacher_outputs: a directory of precomputed top-k teacher outputs
      (`cpm2 teacher-topk`).
      With both set, the precomputed outputs are used (the checkpoint names where they came from).
    schedule / alpha (a_0) / inherit_steps (N) / temperature (T): see `alpha_at`; N = None is
      `inherit_fraction` of the run's steps (the reference run: 44%).
    teacher_dtype: 'bfloat16' holds and runs the teacher in bf16 (None: as saved).
    teacher_vocabulary / student_vocabulary: vocabulary files, needed when the teacher's
      vocabulary differs from the student's (its ids are mapped by piece; sentinels to sentinels).
    """

    teacher_checkpoint: Optional[str] = None
    teacher_outputs: Optional[str] = None
    schedule: str = "linear"
    alpha: float = 1.0
    inherit_steps: Optional[int] = None
    inherit_fraction: float = 0.44
    temperature: float = 2.0
    teacher_dtype: Optional[str] = None
    teacher_vocabulary: Optional[str] = None
    student_vocabulary: Optional[str] = None

    def validate(self) -> "InheritanceConfig":
        """Raises ConfigError naming the bad field (gin: InheritanceConfig.<field>)."""
        where = "cpm2_jax.inheritance.InheritanceConfig"
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule: unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.schedule != "constant" and self.inherit_steps is None:
            raise ConfigError(f"{where}.inherit_steps (N) is not set; set it or call resolved(train_steps)")
        if self.schedule != "constant" and self.inherit_steps <= 0:
            raise ConfigError(f"{where}.inherit_steps (N) must be > 0, got {self.inherit_steps}")
        if not self.temperature > 0:
            raise ConfigError(f"{where}.temperature (T) must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha (a_0) must be in [0, 1], got {self.alpha}")
        if not (self.teacher_checkpoint or self.teacher_outputs):
            raise ConfigError(f"{where}: set teacher_checkpoint (TEACHER_CHECKPOINT_PATH) or teacher_outputs")
        if self.teacher_dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"{where}.teacher_dtype must be 'float32' or 'bfloat16', got {self.teacher_dtype!r}")
        return self

    def resolved(self, train_steps: int) -> "InheritanceConfig":
        """N = inherit_fraction * train_steps when inherit_steps is None (at least 1 step)."""
        if self.inherit_steps is not None:
            return self
        return dataclasses.replace(self, inherit_steps=max(1, round(self.inherit_fraction * train_steps)))

    def alpha_at(self, step) -> jax.Array:
        return alpha_at(step, schedule=self.schedule, alpha=self.alpha, inherit_steps=self.inherit_steps)
