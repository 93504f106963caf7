"""Input-pipeline throughput: span-corruption batches (inputs 512 / targets 256, batch 32).

Runs the registered bilingual pre-training mixture (2:1 zh:en, packed, as the trainer gets
it from `cpm2_jax.tasks.pipeline.get_batch_iterator`) over the data directory
(`$CPM2_DATA_DIR`, default ../shared/data) and the configured vocabulary (`$CPM2_VOCAB`,
default: the automatic one, trained once and cached). Warm-up batches (shuffle buffer
fill, first tokenisation) are excluded. Prints one JSON object as the last line and
writes it to benchmarks/results/input_pipeline.json.

    .venv/bin/python benchmarks/input_pipeline.py [--batches 20] [--warmup 3]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import RESULTS_DIR, machine_info, write_report  # noqa: E402  (benchmarks/report.py)

RESULT = RESULTS_DIR / "input_pipeline.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cpm2_pretrain_bilingual")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=2,
                        help="timed steps of the `small` config's train step (after one compile step); 0 skips")
    args = parser.parse_args()

    import numpy as np

    from cpm2_jax.tasks import pipeline, settings

    lengths = {"inputs": 512, "targets": 256}
    vocab_path = settings.vocabulary_path()
    iterator = pipeline.get_batch_iterator(args.task, feature_lengths=lengths, batch_size=args.batch_size,
                                           seed=args.seed)
    started = time.perf_counter()
    for _ in range(args.warmup):
        next(iterator)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    real_tokens = 0
    for _ in range(args.batches):
        batch = next(iterator)
        real_tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
    elapsed = time.perf_counter() - started
    examples_per_s = args.batches * args.batch_size / elapsed
    train_examples_per_s = _train_examples_per_s(batch, args.train_steps) if args.train_steps else None
    result = {
        "examples_per_s": round(examples_per_s, 2),
        "train_examples_per_s": round(train_examples_per_s, 3) if train_examples_per_s else None,
        "headroom": round(examples_per_s / train_examples_per_s, 1) if train_examples_per_s else None,
        "note": ("train_examples_per_s: the `small` config's jitted train step (forward + backward + "
                 "AdamW, float32, one CPU device, 4 accumulated micro-batches of 8) on the same 512/256 x 32 "
                 "batches; headroom = "
                 "examples_per_s / train_examples_per_s (target >= 3: input never starves training)"),
        "task": args.task,
        "batch_size": args.batch_size,
        "feature_lengths": lengths,
        "packed": True,
        "batches_timed": args.batches,
        "warmup_batches": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "encoder_tokens_per_s": round(real_tokens / elapsed, 1),
        "vocabulary": str(vocab_path),
        "vocab_size": settings.default_vocabulary().vocab_size,
        "machine": machine_info(),
    }
    write_report(result, RESULT)
    return 0


def _train_examples_per_s(batch, steps: int) -> float:
    """Examples/s of the `small` config's train step on `batch` (median of `steps` timed steps)."""
    import statistics

    import jax

    from cpm2_jax.config import get_config
    from cpm2_jax.partitioning import make_mesh
    from cpm2_jax.trainer import Trainer, TrainerConfig

    # 4 micro-batches of 8 (still one AdamW update per 32 examples) keep the step within this
    # machine's memory: the [32, 256, 52736] float32 logits alone are 1.7 GB.
    trainer = Trainer(get_config("small"), TrainerConfig(grad_accum_steps=4),
                      make_mesh({"data": 1}, jax.devices()[:1]), total_steps=steps + 1)
    state = trainer.init_state()
    sharded = trainer.shard_batch(batch)
    state, metrics = trainer.train_step(state, sharded)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = trainer.train_step(state, sharded)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    rows = next(iter(batch.values())).shape[0]
    return rows / statistics.median(times)


if __name__ == "__main__":
    raise SystemExit(main())
