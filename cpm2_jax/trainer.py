"""The jitted train and eval steps of CPM-2 under a device mesh.

Parameters and optimiser state are sharded by the partition rules (`partitioning`); the
batch is split over the data-parallel mesh axes (`data`, and `expert` when the mesh has
one). One train step = one optimiser update on the global batch; with gradient
accumulation the batch is cut into micro-batches inside the step (`lax.scan`) and the
summed gradient equals the one of the whole batch, because the loss is normalised by the
global weight sum:

    L = (sum_tokens w_i * loss_i) / (sum_tokens w_i) + aux       (aux: MoE losses, if any)
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from cpm2_jax import losses, optim
from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError, CPM2Error
from cpm2_jax.inheritance.objective import SUM_KEYS
from cpm2_jax.moe import diagnostics as moe_diagnostics
from cpm2_jax.partitioning import ModelSharding, optimizer_state_specs
from cpm2_jax.train_state import TrainState

# Model inputs a batch may carry (t5x feature names); anything else in a batch is ignored.
MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                  "encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions",
                  "task_index")  # task_index [B]: each row's prompt (cpm2_jax.prompts)
REQUIRED_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


class TrainingDivergedError(CPM2Error, FloatingPointError):
    """The loss or the updated parameters became NaN or Inf; the last good checkpoint is kept."""


# The train-step metric that is 1.0 when every updated parameter is finite (see `all_finite`).
PARAMS_FINITE = "params_finite"


@gin.configurable(module="cpm2_jax.trainer")
@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """How the step trains: optimiser, loss options, accumulation, trainable subset, seed.

    `trainable`: regexes over parameter paths ('encoder/prompt/.*'); None trains everything.
    `seed` seeds parameter initialisation and dropout (dropout key = fold_in(seed, step)).
    """

    optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    trainable: Optional[Sequence[str]] = None
    seed: int = 0


def _apply_model(model: nn.Module, config: ModelConfig, params, batch: Mapping[str, jax.Array], *,
                 enable_dropout: bool, dropout_rng=None):
    """Logits, the summed MoE auxiliary losses (0 for a dense model) and the MoE routing
    diagnostics averaged over layers ({'moe/...': scalar}; {} for a dense model)."""
    inputs = {k: batch[k] for k in MODEL_FEATURES if k in batch}
    rngs = {"dropout": dropout_rng} if enable_dropout else None
    if config.is_moe:
        logits, sown = model.apply({"params": params}, **inputs, enable_dropout=enable_dropout, rngs=rngs,
                                   mutable=["aux_loss", "intermediates"])
        aux_leaves = jax.tree_util.tree_leaves(sown.get("aux_loss", {}))
        aux = sum((jnp.sum(x.astype(jnp.float32)) for x in aux_leaves), jnp.zeros((), jnp.float32))
        return logits, aux, moe_diagnostics.layer_metrics(sown)
    logits = model.apply({"params": params}, **inputs, enable_dropout=enable_dropout, rngs=rngs)
    return logits, jnp.zeros((), jnp.float32), {}


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (one fused reduction in a jitted step)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _loss_weights(batch) -> jax.Array:
    """decoder_loss_weights, else 1 wherever the target is not padding (id 0)."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


class Trainer:
    """Builds sharded train state and compiled steps for one model, optimiser and mesh."""

    def __init__(self, model_config: ModelConfig, config: TrainerConfig, mesh: jax.sharding.Mesh, *,
                 total_steps: int = 0, rules=None, inheritance=None):
        if config.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
        self.model_config = model_config
        self.config = config
        # Mesh, rules, parameter and batch shardings: the ones eval and infer use too.
        self.sharding = ModelSharding(model_config, mesh, rules)
        self.mesh, self.rules, self.model = mesh, self.sharding.rules, self.sharding.model
        # Knowledge inheritance (cpm2_jax.inheritance.objective.Inheritance) or None; its
        # teacher's params are set by `set_inheritance` once this trainer's mesh exists.
        self.inheritance = None
        self.tx, self.schedule = config.optimizer.build(total_steps)

        self.param_shardings = self.sharding.param_shardings
        param_shapes, param_specs = self.sharding.param_shapes, self.sharding.param_specs
        self.mask = optim.trainable_mask(param_shapes, config.trainable)
        opt_shapes = jax.eval_shape(lambda p: self.tx.init(optim.trainable_subtree(p, self.mask)), param_shapes)
        opt_specs = optimizer_state_specs(opt_shapes, param_shapes, param_specs)
        opt_shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), opt_specs,
                                               is_leaf=lambda x: isinstance(x, PartitionSpec))
        self.replicated = self.sharding.replicated
        self.state_shardings = TrainState(step=self.replicated, params=self.param_shardings,
                                          opt_state=opt_shardings)
        self._state_shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=param_shapes,
                                        opt_state=opt_shapes)

        self.token_metrics = TokenMetrics(self.sharding)
        self.moe_metric_names = self.token_metrics.moe_metric_names
        self.batch_axes = self.sharding.batch_axes
        self.data_parallel_size = self.sharding.data_parallel_size
        self.batch_sharding = self.sharding.batch_sharding
        self._train_step = jax.jit(self._train_step_impl, in_shardings=(self.state_shardings, self.batch_sharding),
                                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
        if inheritance is not None:
            self.set_inheritance(inheritance)

    def set_inheritance(self, inheritance) -> None:
        """Train with a teacher term (knowledge inheritance): the teacher's params become a
        third, frozen argument of the step, sharded by its own rules, never donated."""
        self.inheritance = inheritance
        teacher = inheritance.teacher
        teacher_shardings = teacher.shardings if teacher is not None else None
        self._train_step = jax.jit(self._train_step_impl,
                                   in_shardings=(self.state_shardings, self.batch_sharding, teacher_shardings),
                                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

    # ----------------------------------------------------------------- set-up helpers
    def mesh_and_rules(self):
        """A context in which jitted code runs on this trainer's mesh under its partition rules."""
        return self.sharding.mesh_and_rules()

    def _init_variables(self, rng):
        ones = jnp.ones((1, 8), jnp.int32)
        return self.model.init(rng, ones, ones)

    def init_state(self, rng: Optional[jax.Array] = None) -> TrainState:
        """A fresh state, every array created directly in its final sharding."""
        rng = jax.random.PRNGKey(self.config.seed) if rng is None else rng

        def init(key):
            params = nn.unbox(self._init_variables(key))["params"]
            return TrainState.create(params, self.tx, self.mask)

        with self.mesh_and_rules():
            return jax.jit(init, out_shardings=self.state_shardings)(rng)

    def state_from_params(self, params) -> TrainState:
        """A step-0 state around given parameters (partial restores, fine-tuning starts)."""
        def build(p):
            return TrainState.create(p, self.tx, self.mask)

        with self.mesh_and_rules():
            return jax.jit(build, in_shardings=(self.param_shardings,), out_shardings=self.state_shardings)(params)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs carrying the target shardings: the restore target for orbax."""
        return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      self._state_shapes, self.state_shardings)

    def abstract_params(self):
        return self.abstract_state().params

    # ----------------------------------------------------------------- batches
    def check_batch_size(self, global_batch_size: int) -> None:
        """The global batch must split evenly over the data-parallel devices and micro-batches."""
        self.sharding.check_batch_size(global_batch_size, self.config.grad_accum_steps)

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes (multi-host safe)."""
        check_features(local_batch)
        rows = next(iter(local_batch.values())).shape[0]
        self.check_batch_size(rows * jax.process_count())
        if self.model_config.prompt is not None:  # unknown task index, no <sep> for a middle prompt
            from cpm2_jax.prompts.placement import check_batch

            check_batch(local_batch["encoder_input_tokens"], local_batch.get("task_index"), self.model_config.prompt,
                        "training batch")
        extra = self.inheritance.batch_features if self.inheritance is not None else ()
        keep = [k for k in (*MODEL_FEATURES, "decoder_loss_weights", *extra) if k in local_batch]
        return self.sharding.shard_batch({k: local_batch[k] for k in keep})

    # ----------------------------------------------------------------- steps
    def _micro_batches(self, batch):
        """[B, ...] -> [A, B/A, ...]: micro-batch i takes rows i, i+A, ... so every
        micro-batch stays spread over all data-parallel devices."""
        a = self.config.grad_accum_steps
        spec = NamedSharding(self.mesh, PartitionSpec(None, self.batch_axes or None))

        def split(x):
            x = x.reshape((x.shape[0] // a, a) + x.shape[1:])
            return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), spec)

        return jax.tree_util.tree_map(split, batch)

    def _train_step_impl(self, state: TrainState, batch, teacher_params=None):
        cfg = self.config
        ki = self.inheritance
        accum = cfg.grad_accum_steps
        total_weight = jnp.maximum(jnp.sum(_loss_weights(batch)), 1.0)
        dropout_base = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), state.step)
        # Training mode whatever the dropout rate: MoE routers train differently from how they
        # infer (balanced assignment vs argmax, jitter); a rate-0 dropout is a no-op.
        enable_dropout = True
        trainable = optim.trainable_subtree(state.params, self.mask)

        def objective(sub, micro, index, teacher_out):
            params = optim.merge_subtree(state.params, self.mask, sub)
            logits, aux, moe = _apply_model(self.model, self.model_config, params, micro,
                                            enable_dropout=enable_dropout,
                                            dropout_rng=jax.random.fold_in(dropout_base, index))
            weights = _loss_weights(micro)
            loss_sum, z_sum, _ = losses.weighted_cross_entropy(
                logits, micro["decoder_target_tokens"], weights, label_smoothing=cfg.label_smoothing,
                z_loss=cfg.z_loss)
            correct = losses.weighted_correct(logits, micro["decoder_target_tokens"], weights)
            sums = {"loss_sum": loss_sum, "z_loss_sum": z_sum, "correct": correct, "aux_loss": aux / accum,
                    **{k: v / accum for k, v in moe.items()}}  # MoE diagnostics: means over micro-batches
            if ki is None:
                return loss_sum / total_weight + aux / accum, sums
            sums.update(ki.sums(logits, micro["decoder_target_tokens"], weights, teacher_out))
            mixed, _ = ki.mix(loss_sum / total_weight, sums["kd_sum"] / total_weight, state.step)
            return mixed + aux / accum, sums

        def teacher_out(micro):  # per micro-batch, outside the differentiated function
            return None if ki is None else ki.teacher_outputs(teacher_params, micro)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        sum_keys = (("loss_sum", "z_loss_sum", "correct", "aux_loss") + (() if ki is None else SUM_KEYS)
                    + self.moe_metric_names)
        if accum == 1:
            (_, sums), grads = grad_fn(trainable, batch, 0, teacher_out(batch))
        else:
            def body(carry, xs):
                grads_acc, sums_acc = carry
                micro, index = xs
                (_, sums), grads = grad_fn(trainable, micro, index, teacher_out(micro))
                return (jax.tree_util.tree_map(jnp.add, grads_acc, grads),
                        jax.tree_util.tree_map(jnp.add, sums_acc, sums)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
            zero_sums = {k: jnp.zeros((), jnp.float32) for k in sum_keys}
            (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums),
                                            (self._micro_batches(batch), jnp.arange(accum)))

        updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
        updated = optax.apply_updates(trainable, updates)
        new_params = optim.merge_subtree(state.params, self.mask, updated)
        metrics = {
            "loss": sums["loss_sum"] / total_weight + sums["aux_loss"],
            "cross_entropy": (sums["loss_sum"] - sums["z_loss_sum"]) / total_weight,
            "z_loss": sums["z_loss_sum"] / total_weight,
            "aux_loss": sums["aux_loss"],
            "accuracy": sums["correct"] / total_weight,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32),
            "nonpadding_tokens": total_weight,
            # 1.0 when every updated parameter is finite: the NaN guard judges the state a
            # checkpoint would hold, not only the loss computed before the update.
            PARAMS_FINITE: all_finite(updated).astype(jnp.float32),
            **{k: sums[k] for k in self.moe_metric_names},
        }
        if ki is not None:
            lm = sums["loss_sum"] / total_weight
            metrics.update(ki.metrics(sums, lm, total_weight, state.step))
            metrics["loss"] = ki.mix(lm, metrics["kd_loss"], state.step)[0] + sums["aux_loss"]
        return TrainState(step=state.step + 1, params=new_params, opt_state=opt_state), metrics

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        """One optimiser update; `state` is donated. Metrics stay on device (no host sync)."""
        with self.mesh_and_rules():
            if self.inheritance is not None:
                teacher = self.inheritance.teacher
                return self._train_step(state, dict(batch), None if teacher is None else teacher.params)
            return self._train_step(state, dict(batch))

    def lower_train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        """The lowered train step (for XLA's cost analysis: FLOPs and bytes of one step)."""
        with self.mesh_and_rules():
            return self._train_step.lower(state, dict(batch))

    def eval_step(self, params, batch: Mapping[str, jax.Array]) -> dict:
        """Summed validation loss (no z-loss), weight and correct-token count of one batch."""
        return self.token_metrics.eval_step(params, batch)

    def evaluate(self, params, batches) -> dict[str, float]:
        """Token-weighted loss and accuracy over an iterable of local numpy batches."""
        return self.token_metrics.evaluate(params, (self.shard_batch(local) for local in batches))


def check_features(local_batch: Mapping[str, np.ndarray]) -> None:
    missing = [k for k in REQUIRED_FEATURES if k not in local_batch]
    if missing:
        raise ConfigError(f"batch lacks feature(s) {missing}; it has {sorted(local_batch)}")


class TokenMetrics:
    """Teacher-forced validation metrics of parameters placed by a ModelSharding: token loss
    (no z-loss), token accuracy and the MoE routing diagnostics. The trainer's validation and
    `cpm2 eval` both use it (no optimiser state is built for it)."""

    def __init__(self, sharding: ModelSharding):
        self.sharding = sharding
        self.model_config = sharding.model_config
        self.moe_metric_names = self._moe_metric_names()
        self._eval_step = jax.jit(self._eval_step_impl, in_shardings=(sharding.param_shardings,
                                                                      sharding.batch_sharding),
                                  out_shardings=sharding.replicated)

    def _moe_metric_names(self) -> tuple[str, ...]:
        """The MoE diagnostics this model reports (shapes only: nothing runs)."""
        if not self.model_config.is_moe:
            return ()
        ones = jnp.ones((1, 8), jnp.int32)
        batch = {"encoder_input_tokens": ones, "decoder_input_tokens": ones, "decoder_target_tokens": ones}
        with self.sharding.mesh_and_rules():
            moe = jax.eval_shape(lambda p: _apply_model(self.sharding.model, self.model_config, p, batch,
                                                        enable_dropout=True, dropout_rng=jax.random.PRNGKey(0))[2],
                                 self.sharding.param_shapes)
        return tuple(moe)

    def _eval_step_impl(self, params, batch):
        logits, _, moe = _apply_model(self.sharding.model, self.model_config, params, batch, enable_dropout=False)
        weights = _loss_weights(batch)
        loss_sum, z_sum, weight_sum = losses.weighted_cross_entropy(
            logits, batch["decoder_target_tokens"], weights, z_loss=0.0)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum,
                "correct": losses.weighted_correct(logits, batch["decoder_target_tokens"], weights), **moe}

    def eval_step(self, params, batch: Mapping[str, jax.Array]) -> dict:
        """Summed validation loss (no z-loss), weight and correct-token count of one placed batch."""
        with self.sharding.mesh_and_rules():
            return self._eval_step(params, dict(batch))

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the model's features -> global arrays over the batch axes."""
        check_features(local_batch)
        keep = [k for k in (*MODEL_FEATURES, "decoder_loss_weights") if k in local_batch]
        return self.sharding.shard_batch({k: local_batch[k] for k in keep})

    def evaluate(self, params, placed_batches) -> dict[str, float]:
        """Token-weighted loss and accuracy (and MoE diagnostics, batch means) over placed batches."""
        totals = {k: 0.0 for k in ("loss_sum", "weight_sum", "correct", *self.moe_metric_names)}
        count = 0
        for placed in placed_batches:
            out = jax.device_get(self.eval_step(params, placed))
            for k in totals:
                totals[k] += float(out[k])
            count += 1
        if count == 0 or totals["weight_sum"] == 0:
            raise ConfigError("evaluation saw no batches (or no target tokens): is the split empty?")
        return {"loss": totals["loss_sum"] / totals["weight_sum"],
                "accuracy": totals["correct"] / totals["weight_sum"],
                "tokens": totals["weight_sum"], "batches": count,
                **{k: totals[k] / count for k in self.moe_metric_names}}  # MoE diagnostics: batch means
