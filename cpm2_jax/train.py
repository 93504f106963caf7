"""The training binary: `python -m cpm2_jax.train` / `cpm2 train`, t5x-style.

    python -m cpm2_jax.train --gin_file=models/tiny.gin --gin_file=runs/pretrain.gin \\
        --gin.MIXTURE_OR_TASK_NAME="'cpm2_pretrain_zh'" --gin.TASK_FEATURE_LENGTHS="{'inputs': 128, 'targets': 32}" \\
        --gin.TRAIN_STEPS=1000 --gin.MODEL_DIR="'/tmp/cpm2_run'"

`train()` is one keyword-only function; gin configures it at the edge (`main`). A run
restarted with the same MODEL_DIR resumes from its latest checkpoint, data position
included, and reaches bit-identical parameters to an uninterrupted run.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax import datasets, gin_utils
from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError
from cpm2_jax.metrics_writer import MetricsWriter, ProgressBar
from cpm2_jax.partitioning import build_mesh  # noqa: F401 - also re-exported for the demo
from cpm2_jax.trainer import PARAMS_FINITE, Trainer, TrainerConfig, TrainingDivergedError

VOCAB_SIZE_FLAG = "--gin.cpm2_jax.model_config.vocab_size"


def _require(**values) -> None:
    missing = [name for name, value in values.items() if gin_utils.is_required(value) or value is None]
    if missing:
        raise ConfigError(f"train: required argument(s) not set: {', '.join(missing)} (gin: train.{missing[0]} "
                          f"or the run file's macro)")


def initial_state(trainer: Trainer, ckpts: ckpt_lib.Checkpoints, checkpoint_cfg: ckpt_lib.CheckpointConfig,
                  model_config: ModelConfig, log: Callable[[str], None]) -> tuple[Any, Optional[dict]]:
    """(state, data position of the restored step or None): the newest readable checkpoint of
    this run (a damaged newer step is reported and left on disk), else a partial restore from
    `checkpoint_cfg.restore_from` (any checkpoint, either layer layout; only the parameters it
    lacks are initialised), else a fresh initialisation."""
    resumed = ckpts.restore_latest(trainer.abstract_state(), model_config=dataclasses.asdict(model_config), log=log)
    if resumed is not None:
        state, data_state, _, step = resumed
        log(f"resumed from checkpoint step {step} in {ckpts.directory}")
        return state, data_state
    if checkpoint_cfg.restore_from:
        params, plan = ckpt_lib.restore_partial(
            checkpoint_cfg.restore_from, trainer.abstract_params(), lambda names: init_params_subset(trainer, names),
            assignment_map=checkpoint_cfg.assignment_map, fallback_to_scratch=checkpoint_cfg.fallback_to_scratch)
        loaded = sum(s is not None for s in plan.values())
        log(f"initialised {loaded} of {len(plan)} parameters from {checkpoint_cfg.restore_from}, the rest fresh")
        from cpm2_jax.prompts.init import after_restore  # a fresh prompt reads the restored embedding

        params = after_restore(params, plan, model_config, log)
        return trainer.state_from_params(params), None
    return trainer.init_state(), None


def init_params_subset(trainer: Trainer, names) -> dict[str, jax.Array]:
    """{name: fresh value} of the named parameters only, each created in its sharding: the
    model's init is jitted with just these outputs, so XLA never materialises the others
    (the values equal those of a full `trainer.init_state()`)."""
    import flax.linen as nn

    from cpm2_jax import param_paths

    names = list(names)
    shardings = param_paths.flatten(trainer.param_shardings)

    def init(key):
        flat = param_paths.flatten(nn.unbox(trainer._init_variables(key))["params"])  # pylint: disable=protected-access
        return {n: flat[n] for n in names}

    with trainer.mesh_and_rules():
        return jax.jit(init, out_shardings={n: shardings[n] for n in names})(jax.random.PRNGKey(trainer.config.seed))


def _finite(metrics: Mapping[str, float]) -> bool:
    return all(math.isfinite(float(v)) for v in metrics.values())


def prepare_model_dir(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """Creates MODEL_DIR (and its missing parents) and checks that files can be written in
    it; returns the directories this created, deepest first (removed again if the run is
    rejected before training starts). A file in the way or a read-only place is a
    ConfigError naming the path."""
    created = [p for p in (model_dir / "checkpoints", model_dir, *model_dir.parents) if not p.exists()]
    blocker = next((p for p in (model_dir, *model_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = "is a file" if blocker == model_dir else f"cannot be created: {str(blocker)!r} is a file"
        raise ConfigError(f"MODEL_DIR {str(model_dir)!r} {what}, not a directory (--gin.MODEL_DIR)")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        probe = model_dir / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        remove_empty_dirs(created)
        raise ConfigError(f"MODEL_DIR {str(model_dir)!r} is not writable: {err.strerror or err} "
                          f"(--gin.MODEL_DIR)") from None
    return created


def remove_empty_dirs(directories: Sequence[pathlib.Path]) -> None:
    """rmdir each directory (deepest first) that exists and is empty; anything else stays."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            pass


def check_vocabulary(model_config: ModelConfig, dataset_cfg: datasets.DatasetConfig) -> None:
    """Every id the task's vocabularies produce must index the model's embedding: a larger
    vocabulary is a ConfigError naming both sizes and the flag that fixes it."""
    import gin

    with gin.unlock_config():
        from cpm2_jax.tasks import pipeline
    provider = pipeline.get_provider(dataset_cfg.mixture_or_task_name)
    for feature, spec in provider.output_features.items():
        size = int(spec.vocabulary.vocab_size)
        if size > model_config.vocab_size:
            raise ConfigError(
                f"the vocabulary of {dataset_cfg.mixture_or_task_name!r} (feature {feature!r}) has {size} ids but "
                f"the model's vocab_size is {model_config.vocab_size}: ids >= {model_config.vocab_size} have no "
                f"embedding row. Set {VOCAB_SIZE_FLAG}={-(-size // 128) * 128} (or use a model file whose "
                f"vocab_size is >= {size}), or a smaller vocabulary")


def check_batch_ids(batch: Mapping[str, Any], vocab_size: int, step: int) -> None:
    """Token ids of one host batch must lie in [0, vocab_size) (a cheap numpy max)."""
    import numpy as np

    for key in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens"):
        if key in batch and np.size(batch[key]):
            high, low = int(np.max(batch[key])), int(np.min(batch[key]))
            if high >= vocab_size or low < 0:
                bad = high if high >= vocab_size else low
                raise ConfigError(f"step {step}: batch feature {key!r} holds token id {bad}, outside the model's "
                                  f"vocab_size {vocab_size}; set {VOCAB_SIZE_FLAG} to at least {high + 1} or "
                                  f"use a vocabulary of at most {vocab_size} ids")


def _diverged(step: int, metrics: Mapping[str, float], kept: str) -> TrainingDivergedError:
    if metrics.get(PARAMS_FINITE, 1.0) != 1.0:
        what = (f"the parameters after the update of step {step} are not finite (loss before it "
                f"{metrics.get('loss', float('nan')):.4g}, grad_norm {metrics.get('grad_norm', float('nan')):.4g})")
    else:
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        what = f"{bad} is not finite"
    return TrainingDivergedError(
        f"training diverged at step {step}: {what}; stopped without saving, {kept}. Lower the learning rate "
        f"(OptimizerConfig.learning_rate), lengthen the warm-up, keep gradient clipping on, or use float32 "
        f"compute, then rerun to resume from that checkpoint.")


def train(*, model_config: ModelConfig, train_dataset_cfg: datasets.DatasetConfig, model_dir: str, train_steps: int,
          trainer_cfg: TrainerConfig = TrainerConfig(), inheritance_cfg=None,
          checkpoint_cfg: ckpt_lib.CheckpointConfig = ckpt_lib.CheckpointConfig(),
          eval_dataset_cfg: Optional[datasets.DatasetConfig] = None, eval_period: int = 0, eval_steps: int = 20,
          mesh_shape: Optional[Mapping[str, int]] = None, log_period: int = 10,
          get_dataset_fn: Callable[..., Any] = datasets.get_dataset, progress: bool = True,
          gin_config_str: str = "") -> dict[str, Any]:
    """Trains for `train_steps` optimiser steps in total (resuming counts earlier steps),
    saving checkpoints to `<model_dir>/checkpoints` and metrics to `<model_dir>` (TensorBoard
    `train/`, `validation/`, and metrics.jsonl). Returns the final step, metrics and checkpoint."""
    _require(model_config=model_config, train_dataset_cfg=train_dataset_cfg, model_dir=model_dir,
             train_steps=train_steps)
    if train_steps < 0:
        raise ConfigError(f"TRAIN_STEPS must be >= 0, got {train_steps}")
    model_dir = pathlib.Path(model_dir).expanduser().absolute()
    created = prepare_model_dir(model_dir)
    try:
        return _train(model_config=model_config, train_dataset_cfg=train_dataset_cfg, model_dir=model_dir,
                      train_steps=train_steps, trainer_cfg=trainer_cfg, checkpoint_cfg=checkpoint_cfg,
                      eval_dataset_cfg=eval_dataset_cfg, eval_period=eval_period, eval_steps=eval_steps,
                      mesh_shape=mesh_shape, log_period=log_period, get_dataset_fn=get_dataset_fn,
                      progress=progress, gin_config_str=gin_config_str, inheritance_cfg=inheritance_cfg)
    except BaseException:
        remove_empty_dirs(created)  # a rejected run leaves no new empty directory behind
        raise


def _train(*, model_config, train_dataset_cfg, model_dir: pathlib.Path, train_steps, trainer_cfg, checkpoint_cfg,
           eval_dataset_cfg, eval_period, eval_steps, mesh_shape, log_period, get_dataset_fn, progress,
           gin_config_str, inheritance_cfg=None) -> dict[str, Any]:
    mesh = build_mesh(mesh_shape)
    trainer = Trainer(model_config, trainer_cfg, mesh, total_steps=train_steps)
    with_teacher = lambda batches: batches  # noqa: E731
    if inheritance_cfg is not None:  # knowledge inheritance: a teacher term in the loss (cpm2_jax.inheritance)
        from cpm2_jax.inheritance.objective import enable_inheritance

        with_teacher = enable_inheritance(trainer, inheritance_cfg, train_steps)
    trainer.check_batch_size(train_dataset_cfg.batch_size)
    if eval_dataset_cfg is not None:
        trainer.check_batch_size(eval_dataset_cfg.batch_size)
    ckpts = ckpt_lib.Checkpoints(model_dir / "checkpoints", keep=checkpoint_cfg.keep,
                                 async_save=checkpoint_cfg.async_save)
    # The data comes first: a bad task name fails before anything compiles.
    latest = ckpts.latest_step()
    data_state = ckpts.read_json(latest, "data") if latest is not None else {}
    data_step = int(data_state.get("step", latest)) if latest is not None else 0
    shard = dict(shard_index=jax.process_index(), num_shards=jax.process_count())
    # The real pipeline continues from the saved data position in constant time; other sources replay.
    resume = (lambda saved: {"data_state": saved}) if get_dataset_fn is datasets.get_dataset else (lambda saved: {})
    batches = get_dataset_fn(train_dataset_cfg, start_step=data_step, **resume(data_state), **shard)
    if get_dataset_fn is datasets.get_dataset:
        check_vocabulary(model_config, train_dataset_cfg)  # before anything compiles
    bar = ProgressBar(0, train_steps, enabled=False)  # replaced once the start step is known
    state, restored_data = initial_state(trainer, ckpts, checkpoint_cfg, model_config, bar.write)
    if restored_data is not None and int(restored_data.get("step", int(jax.device_get(state.step)))) != data_step:
        # An unreadable newer step was skipped: the data restarts where the restored step was.
        _close(batches)
        data_step = int(restored_data.get("step", int(jax.device_get(state.step))))
        batches = get_dataset_fn(train_dataset_cfg, start_step=data_step, **resume(restored_data), **shard)
    if get_dataset_fn is datasets.get_dataset:  # the real pipeline: its vocabulary goes into every step
        ckpts.vocabulary = ckpt_lib.task_vocabulary(train_dataset_cfg.mixture_or_task_name)
    start = int(jax.device_get(state.step))
    batches = with_teacher(batches)
    first = None
    if start < train_steps:  # the first batch is checked before training starts
        first = next(batches)
        check_batch_ids(first, model_config.vocab_size, start + 1)
    # Training starts: only now is anything of the run's written (a rejected run leaves
    # config.gin and metrics.jsonl as they were); rows after the restored step are replayed.
    if gin_config_str and jax.process_index() == 0:
        (model_dir / "config.gin").write_text(gin_config_str)
    writer = MetricsWriter(model_dir, resume_step=start)
    bar = ProgressBar(start, train_steps, enabled=progress)
    record = ckpt_lib.config_record(model_config, gin_config_str,
                                    {"train_dataset": _jsonable(dataclasses.asdict(train_dataset_cfg))})

    def run_eval(params, step) -> dict[str, float]:
        source = get_dataset_fn(eval_dataset_cfg, start_step=0, **shard)
        taken = []
        for _ in range(eval_steps):
            try:
                taken.append(next(source))
            except StopIteration:
                break
        _close(source)
        if not taken:
            raise ConfigError(f"the {eval_dataset_cfg.split!r} split of {eval_dataset_cfg.mixture_or_task_name!r} "
                              f"gave no batch of {eval_dataset_cfg.batch_size} examples; use a smaller eval batch "
                              f"size or another split, or set eval_dataset_cfg = None")
        result = trainer.evaluate(params, taken)
        del source
        gc.collect()
        writer.write(step, result, prefix="validation")
        bar.write(f"step {step}: validation loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}")
        return result

    pending: list[tuple[int, dict, int]] = []
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    clock = time.perf_counter()

    def flush() -> None:
        """Fetches pending step metrics, stops on NaN/Inf, writes them."""
        nonlocal clock, last_train
        if not pending:
            return
        fetched = jax.device_get([m for _, m, _ in pending])
        now = time.perf_counter()
        tokens_per_s = sum(t for _, _, t in pending) / max(now - clock, 1e-9)
        clock = now
        for (step, _, _), metrics in zip(pending, fetched):
            metrics = {k: float(v) for k, v in metrics.items()}
            if not _finite(metrics) or metrics.get(PARAMS_FINITE, 1.0) != 1.0:
                pending.clear()
                ckpts.wait()
                good = ckpts.latest_step()
                kept = (f"the last good checkpoint, step {good}, is kept in {ckpts.directory}" if good is not None
                        else "no checkpoint had been written yet")
                raise _diverged(step, metrics, kept)
            metrics.pop(PARAMS_FINITE, None)
            metrics["tokens_per_s"] = tokens_per_s * jax.process_count()
            writer.write(step, metrics, prefix="train")
            last_train = metrics
        bar.update(len(pending), last_train)
        pending.clear()
        writer.flush()

    def save(current) -> None:
        flush()
        ckpts.save(current, data_state=batches.state(), config=record)

    try:
        for step in range(start, train_steps):
            local = first if step == start else next(batches)
            check_batch_ids(local, model_config.vocab_size, step + 1)
            state, metrics = trainer.train_step(state, trainer.shard_batch(local))
            done = step + 1
            pending.append((done, metrics, datasets.batch_tokens(local)))
            if len(pending) >= max(log_period, 1):
                flush()
            if checkpoint_cfg.period and done % checkpoint_cfg.period == 0 and done != train_steps:
                save(state)
            if eval_dataset_cfg is not None and eval_period and done % eval_period == 0:
                flush()
                last_eval = run_eval(state.params, done)
        flush()
        final_step = int(jax.device_get(state.step))
        ckpts.save(state, data_state=batches.state(), config=record)
        if model_config.prompt is not None:
            write_prompt_files(state.params, model_config, model_dir, train_dataset_cfg, bar.write)
        if eval_dataset_cfg is not None and (not eval_period or final_step % eval_period or final_step == start):
            last_eval = run_eval(state.params, final_step)
        ckpts.wait()
    finally:
        bar.close()
        writer.close()
        ckpts.close()
        # Drop the data iterator now: a tf.data generator iterator finalised during interpreter
        # shutdown can hang the process after training has finished.
        _close(batches)
        del batches
        gc.collect()
    return {"step": final_step, "train": last_train, "validation": last_eval,
            "checkpoint": str(ckpts.step_dir(final_step)), "model_dir": str(model_dir),
            "start_step": start}


def write_prompt_files(params, model_config: ModelConfig, model_dir: pathlib.Path,
                       dataset_cfg: datasets.DatasetConfig, log) -> None:
    """A prompt-tuned run ends with its prompts as files, `<model_dir>/prompts/<task>.prompt.npz`
    (placement and backbone fingerprint inside: `cpm2 infer --prompt FILE`). Parameters sharded
    over several processes are not gathered on one host: `cpm2 convert to-prompts` writes them
    from the checkpoint."""
    from cpm2_jax.prompts.files import save_run_prompts

    if jax.process_count() > 1:
        log(f"prompt files: run `cpm2 convert to-prompts {model_dir} {model_dir / 'prompts'}` on one host")
        return
    for path in save_run_prompts(params, model_config, model_dir / "prompts", dataset_cfg.mixture_or_task_name):
        log(f"prompt file {path}")


def _close(source) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        close()


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# ------------------------------------------------------------------------------ the edge
def configurable_train():
    """`train` registered with gin (once) as `cpm2_jax.train.train`: the run files bind it."""
    return gin_utils.register_once(train, "train", "cpm2_jax.train")


def add_flags(parser: argparse.ArgumentParser) -> None:
    from cpm2_jax import distributed

    gin_utils.add_gin_flags(parser)
    distributed.add_flags(parser)
    parser.add_argument("--no_progress", action="store_true", help="no console progress bar")


def run(args) -> int:
    """Parses gin, starts multi-host if asked, trains; prints the summary as one JSON line."""
    import json

    import gin

    from cpm2_jax import distributed

    distributed.initialize_from_args(args)
    entry = configurable_train()
    gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
    gin_utils.check_required_macros("train")
    config_text = gin.config_str()
    summary = gin_utils.call_configured(entry, progress=not args.no_progress, gin_config_str=config_text)
    if jax.process_index() == 0:
        out = pathlib.Path(summary["model_dir"])
        (out / "operative_config.gin").write_text(gin.operative_config_str())
        print(json.dumps({k: v for k, v in summary.items()}, default=float))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return gin_utils.binary_main("python -m cpm2_jax.train", __doc__, add_flags, run, argv)


if __name__ == "__main__":
    from cpm2_jax.tf_import import default_jax_platforms, quiet_tensorflow_import

    default_jax_platforms()
    quiet_tensorflow_import()
    sys.exit(main())
