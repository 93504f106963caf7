"""Optimisers and learning-rate schedules (optax), CPM-2's recipe by default.

CPM2_FACTS "Pre-training": Adam, weight decay 0.01, gradient clipping 1.0, learning rate 1e-3
with "noam" decay (linear warm-up, then proportional to 1/sqrt(step)).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import optax

from cpm2_jax.errors import ConfigError, closest
from cpm2_jax.param_paths import path_name  # noqa: F401 - re-exported: the one path-name helper


def noam_schedule(peak: float = 1e-3, warmup_steps: int = 1000) -> Callable[[jax.Array], jax.Array]:
    """lr(t) = peak * min(t / warmup, sqrt(warmup / t)): linear warm-up to `peak` at
    t = warmup, then proportional to 1/sqrt(t) (continuous at the peak)."""
    if warmup_steps < 1:
        raise ConfigError(f"noam_schedule: warmup_steps must be >= 1, got {warmup_steps}")

    def schedule(step):
        t = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
        return peak * jnp.minimum(t / warmup_steps, jnp.sqrt(warmup_steps / t))

    return schedule


def rsqrt_schedule(peak: float = 1e-2, warmup_steps: int = 10000):
    """t5x's default: peak * 1/sqrt(max(t, warmup)) * sqrt(warmup) (constant during warm-up)."""
    def schedule(step):
        t = jnp.maximum(jnp.asarray(step, jnp.float32), warmup_steps)
        return peak * jnp.sqrt(warmup_steps / t)

    return schedule


def make_schedule(name: str = "noam", peak: float = 1e-3, warmup_steps: int = 1000, total_steps: int = 0):
    """A schedule by name: noam, rsqrt, constant, linear (warm-up then linear decay to 0), cosine."""
    if name == "noam":
        return noam_schedule(peak, warmup_steps)
    if name == "rsqrt":
        return rsqrt_schedule(peak, warmup_steps)
    if name == "constant":
        return optax.constant_schedule(peak)
    if name in ("linear", "cosine"):
        if total_steps <= warmup_steps:
            raise ConfigError(f"{name} schedule needs total_steps > warmup_steps ({total_steps} <= {warmup_steps})")
        if name == "linear":
            return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps),
                                         optax.linear_schedule(peak, 0.0, total_steps - warmup_steps)], [warmup_steps])
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps)
    known = ("noam", "rsqrt", "constant", "linear", "cosine")
    raise ConfigError(f"unknown learning-rate schedule {name!r}{closest(name, known)}; known: {', '.join(known)}")


def decay_mask(params):
    """Weight decay on everything but RMSNorm scales (leaves named `scale`), as the CPM-2 code
    excludes its LayerNorm parameters; by name, so scanned (stacked) scales are excluded too."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "scale", params)


OPTIMIZERS = ("adamw", "adafactor", "sgd")


def make_optimizer(name: str = "adamw", learning_rate=1e-3, *, weight_decay: float = 0.01,
                   clip_norm: Optional[float] = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   ) -> optax.GradientTransformation:
    """The optimiser by name, with global-norm gradient clipping in front."""
    if name == "adamw":
        tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    elif name == "adafactor":
        tx = optax.adafactor(learning_rate, weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask)
    elif name == "sgd":
        tx = optax.sgd(learning_rate)
    else:
        raise ConfigError(f"unknown optimizer {name!r}{closest(name, OPTIMIZERS)}; known: {', '.join(OPTIMIZERS)}")
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


@gin.configurable(module="cpm2_jax.optim")
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything that builds the optimiser and its schedule; CPM-2's pre-training recipe by
    default (CPM2_FACTS "Pre-training"): Adam(W), wd 0.01, clip 1.0, peak 1e-3, noam."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "noam"
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    clip_norm: Optional[float] = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def build(self, total_steps: int = 0) -> tuple[optax.GradientTransformation, Callable]:
        """(optax transformation, learning-rate schedule) for a run of `total_steps`."""
        schedule = make_schedule(self.schedule, self.learning_rate, self.warmup_steps, total_steps)
        tx = make_optimizer(self.name, schedule, weight_decay=self.weight_decay, clip_norm=self.clip_norm,
                            b1=self.b1, b2=self.b2, eps=self.eps)
        return tx, schedule


# ---------------------------------------------------------------------------------------
# Trainable subsets (prompt tuning, partial fine-tuning): gradients and optimiser state for
# a subtree alone; the rest of the parameters is frozen and never differentiated.

def _subtrees(name: str) -> list[str]:
    """'a/b/c' -> ['a', 'a/b', 'a/b/c']: the path and every subtree holding it."""
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def trainable_mask(params, patterns: Optional[Sequence[str]]) -> Any:
    """A bool tree: True where a regex matches the parameter's WHOLE path ('prompt/table') or a
    whole subtree path holding it ('prompt', 'encoder/layers_0'), never part of a name:
    'prompt' does not select 'prompt_table_extra/...'. All True when `patterns` is None. A
    pattern that matches nothing, or does not compile, is an error naming it."""
    if patterns is None:
        return jax.tree_util.tree_map(lambda _: True, params)
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ConfigError(f"trainable pattern {p!r} is not a regular expression: {err}") from None
    used = set()

    def decide(path, _):
        names = _subtrees(path_name(path))
        hit = False
        for i, pattern in enumerate(compiled):
            if any(pattern.fullmatch(n) for n in names):
                used.add(i)
                hit = True
        return hit

    mask = jax.tree_util.tree_map_with_path(decide, params)
    unused = [patterns[i] for i in range(len(patterns)) if i not in used]
    if unused:
        names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ConfigError(f"trainable pattern {unused[0]!r} matches no parameter"
                          f"{closest(unused[0], names)}; parameters look like {names[0]!r}")
    return mask


def trainable_subtree(params, mask):
    """The params tree with frozen leaves replaced by optax.MaskedNode (an empty subtree):
    the tree the optimiser sees, so its state exists for trainable parameters only."""
    return jax.tree_util.tree_map(lambda p, m: p if m else optax.MaskedNode(), params, mask)


def merge_subtree(params, mask, subtree):
    """Inverse of `trainable_subtree`: the full params with the trainable leaves taken from
    `subtree` (MaskedNode positions keep the frozen value)."""
    return jax.tree_util.tree_map(lambda m, p, s: s if m else p, mask, params, subtree)
