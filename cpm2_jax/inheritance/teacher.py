"""The teacher of knowledge inheritance: any checkpoint of this project, with its own config
and its own sharding by the partition rules, run inside the student's jitted train step.

Its parameters are a separate, frozen argument of the step: no gradient, no optimiser
state, never donated. A teacher with a smaller vocabulary (a subset of the student's) reads
the batch through the student->teacher id map (ids it lacks become unk) and its logits are
scattered onto the student's ids; the ids it lacks get -inf and are left out of the KL
(`losses.distillation_kl`, renormalised over the shared ids).
"""
from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import CheckpointError, ConfigError
from cpm2_jax.inheritance.vocab_map import IdMap, map_vocabularies
from cpm2_jax.partitioning import shardings_for

_INPUT_FEATURES = ("encoder_input_tokens", "decoder_input_tokens")
# What the teacher model reads from a batch (a plain encoder-decoder: no prompt's task_index).
_TEACHER_FEATURES = _INPUT_FEATURES + ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
                                       "decoder_positions")


class Teacher:
    """A frozen model placed on the student's mesh: `params` (sharded), `logits(params, batch)`."""

    def __init__(self, params, config: ModelConfig, mesh, rules, *, student_vocab_size: int,
                 id_map: Optional[IdMap] = None, dtype: Optional[str] = None):
        from cpm2_jax.model import EncoderDecoder

        if dtype:
            config = config.replace(dtype=dtype, param_dtype=dtype)
            params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
        if id_map is None and config.vocab_size != student_vocab_size:
            raise ConfigError(f"the teacher's vocab_size {config.vocab_size} differs from the student's "
                              f"{student_vocab_size}: set cpm2_jax.inheritance.InheritanceConfig.teacher_vocabulary "
                              "and .student_vocabulary so its ids can be mapped")
        if id_map is not None:
            if len(id_map.old_to_new) > config.vocab_size:
                raise ConfigError(f"the teacher's vocabulary has {len(id_map.old_to_new)} ids, more than its model's "
                                  f"vocab_size {config.vocab_size}")
            if id_map.new_size > student_vocab_size:
                raise ConfigError(f"the student's vocabulary has {id_map.new_size} ids, more than its model's "
                                  f"vocab_size {student_vocab_size}")
            if id_map.is_identity and config.vocab_size == student_vocab_size:
                id_map = None
        self.config = config
        self.student_vocab_size = student_vocab_size
        self.id_map = id_map
        self.model = EncoderDecoder(config)
        ones = jnp.ones((1, 8), jnp.int32)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), ones, ones))
        self.shardings = shardings_for(boxed, mesh, rules)["params"]
        self.params = jax.device_put(params, self.shardings)
        if id_map is not None:
            keep = np.nonzero(id_map.old_to_new >= 0)[0]
            self._src = jnp.asarray(keep, jnp.int32)
            self._dst = jnp.asarray(id_map.old_to_new[keep], jnp.int32)
            self._to_teacher = jnp.asarray(id_map.new_to_old(student_vocab_size), jnp.int32)
            self.shared = jnp.asarray(id_map.shared_mask(student_vocab_size))
        else:
            self.shared = None

    def logits(self, params, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The teacher's float32 logits on the student's ids [B, L, V_student] (inference mode;
        ids it lacks hold -inf). Pure: called inside the jitted step."""
        inputs = {k: batch[k] for k in _TEACHER_FEATURES if k in batch}
        if self.id_map is not None:
            inputs.update({k: jnp.take(self._to_teacher, inputs[k]) for k in _INPUT_FEATURES})
        if self.config.is_moe:
            out, _ = self.model.apply({"params": params}, **inputs, enable_dropout=False, mutable=["aux_loss"])
        else:
            out = self.model.apply({"params": params}, **inputs, enable_dropout=False)
        out = jax.lax.stop_gradient(out.astype(jnp.float32))
        if self.id_map is None:
            return out
        mapped = jnp.full(out.shape[:-1] + (self.student_vocab_size,), -jnp.inf, jnp.float32)
        return mapped.at[..., self._dst].set(out[..., self._src])


def load_teacher(cfg, student_config: ModelConfig, mesh, rules) -> Teacher:
    """The teacher of `cfg` (InheritanceConfig) loaded from its checkpoint onto the mesh."""
    from cpm2_jax.infer import check_params, load_checkpoint

    id_map = None  # the vocabularies first: cheap checks before the checkpoint is read
    if cfg.teacher_vocabulary or cfg.student_vocabulary:
        if not (cfg.teacher_vocabulary and cfg.student_vocabulary):
            raise ConfigError("cpm2_jax.inheritance.InheritanceConfig: set both teacher_vocabulary and "
                              "student_vocabulary (KI_TEACHER_VOCABULARY, KI_STUDENT_VOCABULARY) or neither")
        id_map = map_vocabularies(cfg.teacher_vocabulary, cfg.student_vocabulary)
    try:
        params, config = load_checkpoint(cfg.teacher_checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"teacher checkpoint (TEACHER_CHECKPOINT_PATH): {err}") from None
    check_params(params, config, f"{cfg.teacher_checkpoint!r} (teacher)")
    return Teacher(params, config, mesh, rules, student_vocab_size=student_config.vocab_size, id_map=id_map,
                   dtype=cfg.teacher_dtype)
