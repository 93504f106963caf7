"""The evaluation binary: `python -m cpm2_jax.eval` / `cpm2 eval`, t5x-style.

Runs the seqio evaluator of every task in a mixture (or one task) against a checkpoint:
generation metrics decode with `cpm2_jax.decoding` (greedy by default), scoring metrics use
the teacher-forced log-likelihood, and every task also gets its token loss and accuracy.
Per-task metrics go to `<output_dir>/eval_<split>.json` and TensorBoard (`<output_dir>/eval/`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from cpm2_jax import checkpoints as ckpt_lib
from cpm2_jax import datasets, decoding, gin_utils
from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError, DataError
from cpm2_jax.metrics_writer import MetricsWriter
from cpm2_jax.partitioning import ModelSharding
from cpm2_jax.trainer import TokenMetrics


def _batches(dataset, batch_size: int):
    """(indices, stacked features) of an enumerated seqio model dataset, the last batch padded
    with zero rows (so every call has the same shape; pad rows carry no loss weight)."""
    rows = []
    for index, example in dataset.as_numpy_iterator():
        rows.append((int(index), example))
        if len(rows) == batch_size:
            yield _stack(rows, batch_size)
            rows = []
    if rows:
        yield _stack(rows, batch_size)


def _stack(rows, batch_size):
    indices = [i for i, _ in rows]
    keys = rows[0][1].keys()
    out = {}
    for k in keys:
        arrays = [np.asarray(ex[k]) for _, ex in rows]
        pad = [np.zeros_like(arrays[0])] * (batch_size - len(arrays))
        out[k] = np.stack(arrays + pad)
    return indices, out


def prediction_rows(tokens: np.ndarray, eos_id: int = decoding.EOS_ID) -> list[list[int]]:
    """seqio predictions from decoded rows [batch, T]: every row T ids long (its output, its
    EOS, then pad 0), so seqio's `np.array(predictions)` is rectangular whatever length each
    output has; the vocabulary's decode stops at the EOS, so each decodes to its own text."""
    rows = []
    for row in np.asarray(tokens):
        ids = decoding.strip_after_eos(row, eos_id)
        ended = ids + [eos_id] if len(ids) < len(row) else ids
        rows.append(ended + [0] * (len(row) - len(ended)))
    return rows


def _scalar(value) -> Optional[float]:
    value = getattr(value, "value", value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _use_checkpoint_vocabulary(step_dir, settings) -> None:
    """The tasks' configured vocabulary becomes the checkpoint's, unless one was set explicitly
    (gin `configure.vocabulary` or $CPM2_VOCAB), so eval scores with the vocabulary the model
    was trained with, whatever sits in the vocabulary cache."""
    import os

    saved = ckpt_lib.saved_vocabulary(step_dir)
    explicit = getattr(settings, "_overrides", {}).get("vocabulary") or os.environ.get(settings.VOCAB_ENV)
    if saved is not None and not explicit:
        settings.set_vocabulary_path(saved.path)


def evaluate(*, model_config: Optional[ModelConfig] = None, dataset_cfg: datasets.DatasetConfig, checkpoint_path: str,
             output_dir: Optional[str] = None, mesh_shape: Optional[Mapping[str, int]] = None,
             num_examples: Optional[int] = None, decode_method: str = "greedy", num_beams: int = 4,
             max_new_tokens: Optional[int] = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for every task of `dataset_cfg.mixture_or_task_name`.

    The model config and the vocabulary are the checkpoint's; `model_config` (a model gin file
    bound to `evaluate.model_config`) or a configured vocabulary override them.
    """
    for name, value in (("dataset_cfg", dataset_cfg), ("checkpoint_path", checkpoint_path)):
        if gin_utils.is_required(value) or value is None:
            raise ConfigError(f"evaluate: {name} is not set (bind it in the run file or with --gin.NAME=value)")
    import gin
    import seqio

    with gin.unlock_config():
        from cpm2_jax.tasks import pipeline, settings
    settings.configure()
    step_dir = ckpt_lib.resolve(checkpoint_path)
    step = ckpt_lib.step_number(step_dir)
    _use_checkpoint_vocabulary(step_dir, settings)
    if model_config is None or gin_utils.is_required(model_config):
        model_config = ckpt_lib.saved_model_config(step_dir)
        if model_config is None:
            raise ConfigError(f"checkpoint {str(step_dir)!r} records no model config; include a model gin file "
                              f"and bind cpm2_jax.eval.evaluate.model_config = %MODEL_CONFIG")
    provider = pipeline.get_provider(dataset_cfg.mixture_or_task_name)
    lengths = dict(dataset_cfg.task_feature_lengths)

    sharding = ModelSharding.for_shape(model_config, mesh_shape)
    token_metrics = TokenMetrics(sharding)
    params, _ = ckpt_lib.load_params(step_dir, model_config, target=sharding.abstract_params())
    with sharding.mesh_and_rules():  # the steps' weight layouts, once for every task and batch
        weights = decoding.prepare_decode_weights(params, config=model_config)
    batch_size = dataset_cfg.batch_size
    sharding.check_batch_size(batch_size)
    new_tokens = max_new_tokens or lengths.get("targets", 128)
    # Every process reads the whole split (seqio computes the metrics on all of it, on every
    # process); each feeds its own rows of every global batch to the mesh, and the outputs are
    # gathered back to every process.
    rows = batch_size // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

    def local(batch):
        return {k: v[mine] for k, v in batch.items()}

    def on_mesh(batch):
        return token_metrics.shard_batch(local(batch))

    def tagged(dataset, name: str, task_index: Optional[int]):
        """The dataset's batches, each row with the task's prompt row (`task_index`), checked
        against the prompt table (an unknown task index or a missing <sep> is one line)."""
        for indices, batch in _batches(dataset, batch_size):
            if task_index is not None:
                batch["task_index"] = np.full(batch_size, task_index, np.int32)
            if model_config.prompt is not None:
                from cpm2_jax.prompts.placement import check_batch

                check_batch(batch["encoder_input_tokens"], batch.get("task_index"), model_config.prompt,
                            f"eval task {name!r}")
            yield indices, batch

    def model_fns(name: str, task_index: Optional[int]):
        def predict_fn(dataset):
            out = []
            for indices, batch in tagged(dataset, name, task_index):
                with sharding.mesh_and_rules():
                    placed = on_mesh(batch)
                    decoded = decoding.decode(params, placed["encoder_input_tokens"], config=model_config,
                                              method=decode_method, max_new_tokens=new_tokens, num_beams=num_beams,
                                              task_index=placed.get("task_index"), weights=weights)
                    tokens = np.asarray(multihost_utils.process_allgather(decoded.tokens, tiled=True))
                out.extend(zip(indices, prediction_rows(tokens)))
            return out

        def score_fn(dataset):
            out = []
            for indices, batch in tagged(dataset, name, task_index):
                with sharding.mesh_and_rules():
                    placed = on_mesh(batch)
                    _, totals = decoding.score(params, placed["encoder_input_tokens"],
                                               placed["decoder_target_tokens"], config=model_config,
                                               task_index=placed.get("task_index"))
                    totals = np.asarray(multihost_utils.process_allgather(totals, tiled=True))
                out.extend((i, float(totals[r])) for r, i in enumerate(indices))
            return out

        return predict_fn, score_fn

    # One seqio evaluator per task: a prompt-tuned model serves the k-th task of a mixture
    # (seqio's order, by name) with prompt row k, as training does (tasks.streams.MixtureStream
    # tags each example with it); a single task takes row 0. seqio's feature converter keeps
    # model features only, so the row is added to each batch here.
    leaves = list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]
    if model_config.prompt is not None and isinstance(provider, seqio.Mixture) \
            and len(leaves) > model_config.prompt.num_tasks:
        rows = model_config.prompt.num_tasks
        raise DataError(f"eval task {leaves[rows].name!r} of mixture {provider.name!r} has task index {rows}, but "
                        f"the prompt table has {rows} task(s) (0..{rows - 1})")
    results: dict[str, dict[str, float]] = {}
    for index, task in enumerate(leaves):
        task_index = index if model_config.prompt is not None and isinstance(provider, seqio.Mixture) else None
        evaluator = seqio.Evaluator(task.name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
                                    eval_split=dataset_cfg.split, sequence_length=lengths, num_examples=num_examples,
                                    seed=dataset_cfg.seed, use_memory_cache=True, logger_cls=())
        if not evaluator.eval_tasks:
            continue
        predict_fn, score_fn = model_fns(task.name, task_index)
        future, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn, score_fn=score_fn)
        computed = future.result() or {}
        model_ds = evaluator.cached_model_datasets[task.name]
        teacher_forced = token_metrics.evaluate(
            params, (on_mesh(b) for _, b in tagged(model_ds, task.name, task_index)))
        metrics = {"token_loss": teacher_forced["loss"], "token_accuracy": teacher_forced["accuracy"],
                   "examples": float(len(evaluator.cached_task_datasets[task.name])),
                   **{k: teacher_forced[k] for k in token_metrics.moe_metric_names}}  # MoE routing diagnostics
        for key, value in (computed.get(task.name) or {}).items():
            number = _scalar(value)
            if number is not None:
                metrics[key] = number
        results[task.name] = metrics
    if not results:
        raise ConfigError(f"{provider.name!r} has no task with a {dataset_cfg.split!r} split to evaluate")

    if output_dir and jax.process_index() == 0:
        out = pathlib.Path(output_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(step_dir), "step": step, "split": dataset_cfg.split, "tasks": results}
        (out / f"eval_{dataset_cfg.split}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
        writer = MetricsWriter(out / "eval")
        for task_name, metrics in results.items():
            writer.write(step, metrics, prefix=task_name)
        writer.close()
    return results


# ------------------------------------------------------------------------------ the edge
def configurable_evaluate():
    return gin_utils.register_once(evaluate, "evaluate", "cpm2_jax.eval")


def add_flags(parser: argparse.ArgumentParser) -> None:
    from cpm2_jax import distributed

    gin_utils.add_gin_flags(parser)
    distributed.add_flags(parser)


def run(args) -> int:
    from cpm2_jax import distributed

    distributed.initialize_from_args(args)
    entry = configurable_evaluate()
    gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
    gin_utils.check_required_macros("eval")
    results = gin_utils.call_configured(entry)
    if jax.process_index() == 0:
        print(json.dumps(results, ensure_ascii=False))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return gin_utils.binary_main("python -m cpm2_jax.eval", __doc__, add_flags, run, argv)


if __name__ == "__main__":
    from cpm2_jax.tf_import import default_jax_platforms, quiet_tensorflow_import

    default_jax_platforms()
    quiet_tensorflow_import()
    sys.exit(main())
