"""Input pipeline: throughput, row fill and resume time of span-corruption batches.

Runs the registered bilingual pre-training mixture (2:1 zh:en, packed, as the trainer gets
it from `cpm2_jax.tasks.pipeline.get_batch_iterator`) at the run files' lengths (inputs
512 / targets 114, `span_corruption.feature_lengths_for(512)`, what gin/runs/pretrain.gin
sets) over the data directory (`$CPM2_DATA_DIR`, default ../shared/data) and the configured
vocabulary (`$CPM2_VOCAB`, default: the automatic one, trained once and cached).

* `examples_per_s`: batches of 32 after `--warmup` batches (corpus index, first tokenisation).
* `encoder_fill`, `decoder_fill`: non-padding fraction of the encoder / decoder positions
  over `--fill-batches` (100) batches (targets >= 0.97 / >= 0.9); the same for targets 256
  (CPM2_FACTS' figure) beside it.
* `resume_s_at_100k`: seconds from `BatchIterator.restore(state)` to its first batch for a
  state at step 100,000, in a fresh process (index and vocabulary cold), beside the same
  measurement at step 0 and at a real step-50 state. A straight run to step 100,000 is out of
  reach here (3.2M examples), so that state is the step-50 one advanced along each task's
  record order by its measured records per step (the restore reads the same things at any
  step: one document per task, at the position it names). Side by side: `replay_s_at_50`,
  the same step-50 resume without a saved position (what every resume did before: replay).
* `train_examples_per_s` / `headroom`: the `small` config's train step on the same batches;
  headroom = examples_per_s / train_examples_per_s (target >= 3).

    .venv/bin/python benchmarks/input_pipeline.py [--batches 20] [--fill-batches 100]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import RESULTS_DIR, machine_info, write_report  # noqa: E402  (benchmarks/report.py)

RESULT = RESULTS_DIR / "input_pipeline.json"
RESUME_STEP = 100_000


def fill(iterator, batches: int) -> tuple[float, float]:
    """Non-padding fraction of encoder and decoder positions over `batches` batches."""
    import numpy as np

    enc = dec = enc_total = dec_total = 0
    for _ in range(batches):
        batch = next(iterator)
        enc += int(np.count_nonzero(batch["encoder_input_tokens"]))
        dec += int(np.count_nonzero(batch["decoder_target_tokens"]))
        enc_total += batch["encoder_input_tokens"].size
        dec_total += batch["decoder_target_tokens"].size
    return enc / enc_total, dec / dec_total


def advanced_state(state: dict, steps_from: int, steps_to: int, iterator) -> dict:
    """`state` (taken at step `steps_from`) moved to `steps_to` along each task's record order
    at the records per step measured so far, the document being cut restarting at offset 1."""
    out = copy.deepcopy(state)
    scale = steps_to / steps_from
    stream = out["position"]["stream"]
    stream["examples"] = int(stream["examples"] * scale)
    for leaf in iterator._stream.streams:  # noqa: SLF001 (the benchmark inspects the mixture)
        task = stream["tasks"][leaf.name]
        epoch, position = task["next"]
        consumed = int((epoch * leaf.order.per_epoch + position) * scale)
        epoch, position = divmod(consumed, leaf.order.per_epoch)
        task["current"] = {"epoch": epoch, "position": position, "offset": 1}
        epoch, position = leaf.order.following(epoch, position)
        task["next"] = [epoch, position]
        task["chunks"] = int(task["chunks"] * scale)
    out["step"] = steps_to
    return out


def time_restore(state: dict) -> float:
    """Seconds from restore to the first batch in a fresh process (imports not counted)."""
    script = (
        "import json, sys, time\n"
        "from cpm2_jax.tasks import pipeline\n"
        "state = json.loads(sys.stdin.read())\n"
        "started = time.perf_counter()\n"
        "next(pipeline.BatchIterator.restore(state))\n"
        "print(time.perf_counter() - started)\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(state), capture_output=True, text=True,
                          check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cpm2_pretrain_bilingual")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fill-batches", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=2,
                        help="timed steps of the `small` config's train step (after one compile step); 0 skips")
    args = parser.parse_args()

    from cpm2_jax.tasks import pipeline, settings, span_corruption

    lengths = span_corruption.feature_lengths_for(512)
    vocab_path = settings.vocabulary_path()
    kwargs = dict(feature_lengths=lengths, batch_size=args.batch_size, seed=args.seed)
    iterator = pipeline.get_batch_iterator(args.task, **kwargs)
    started = time.perf_counter()
    for _ in range(args.warmup):
        next(iterator)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - started
    examples_per_s = args.batches * args.batch_size / elapsed

    print(f"fill over {args.fill_batches} batches ...", file=sys.stderr, flush=True)
    encoder_fill, decoder_fill = fill(pipeline.get_batch_iterator(args.task, **kwargs), args.fill_batches)
    cpm2_lengths = {"inputs": 512, "targets": 256}
    fill_256 = fill(pipeline.get_batch_iterator(args.task, **dict(kwargs, feature_lengths=cpm2_lengths)),
                    max(1, args.fill_batches // 10))

    print("resume timings ...", file=sys.stderr, flush=True)
    real = pipeline.get_batch_iterator(args.task, **kwargs)
    start_state = real.state()
    for _ in range(50):
        next(real)
    state_50 = real.state()
    state_100k = advanced_state(state_50, 50, RESUME_STEP, real)
    resume = {"step_0": time_restore(start_state), "step_50": time_restore(state_50),
              "step_100000": time_restore(state_100k)}
    replay_50 = time_restore({k: v for k, v in state_50.items() if k != "position"})

    train_examples_per_s = _train_examples_per_s(batch, args.train_steps) if args.train_steps else None
    result = {
        "examples_per_s": round(examples_per_s, 2),
        "train_examples_per_s": round(train_examples_per_s, 3) if train_examples_per_s else None,
        "headroom": round(examples_per_s / train_examples_per_s, 1) if train_examples_per_s else None,
        "encoder_fill": round(encoder_fill, 4),
        "decoder_fill": round(decoder_fill, 4),
        "resume_s_at_100k": round(resume["step_100000"], 2),
        "resume_s": {k: round(v, 2) for k, v in resume.items()},
        "replay_s_at_50": round(replay_50, 2),
        "fill_at_targets_256": {"encoder_fill": round(fill_256[0], 4), "decoder_fill": round(fill_256[1], 4),
                                "batches": max(1, args.fill_batches // 10)},
        "note": ("fill: non-padding fraction over fill_batches batches (targets >= 0.97 encoder, >= 0.9 decoder); "
                 "resume_s: restore -> first batch in a fresh process, imports excluded (the step-100000 state is "
                 "the step-50 state advanced along the record order at the measured rate; target <= 10 s); "
                 "train_examples_per_s: the `small` config's jitted train step (forward + backward + AdamW, "
                 "float32, one CPU device, 4 accumulated micro-batches of 8) on the same batches; headroom = "
                 "examples_per_s / train_examples_per_s (target >= 3: input never starves training)"),
        "task": args.task,
        "batch_size": args.batch_size,
        "feature_lengths": lengths,
        "packed": True,
        "batches_timed": args.batches,
        "warmup_batches": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "fill_batches": args.fill_batches,
        "vocabulary": str(vocab_path),
        "vocab_size": settings.default_vocabulary().vocab_size,
        "machine": machine_info(),
    }
    result["plot"] = str(plot(result, RESULT.with_suffix(".png")))
    write_report(result, RESULT)
    return 0


def plot(result: dict, path):
    """Resume time by step (saved position vs replay) and row fill at targets 114 vs 256."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["position, step 0", "position, step 50", "position, step 100k", "replay, step 50"]
    values = [*result["resume_s"].values(), result["replay_s_at_50"]]
    axes[0].bar(labels, values, color=["C0", "C0", "C0", "C3"])
    axes[0].set_ylabel("seconds to the first batch (fresh process)")
    axes[0].tick_params(axis="x", labelrotation=15)
    fills = {"targets 114": (result["encoder_fill"], result["decoder_fill"]),
             "targets 256": tuple(result["fill_at_targets_256"][k] for k in ("encoder_fill", "decoder_fill"))}
    for offset, (label, (enc, dec)) in enumerate(fills.items()):
        axes[1].bar([offset * 0.4, 1 + offset * 0.4], [enc, dec], width=0.35, label=label)
    axes[1].set_xticks([0.2, 1.2], ["encoder", "decoder"])
    axes[1].set_ylabel("non-padding fraction")
    axes[1].set_ylim(0, 1.05)
    axes[1].legend()
    fig.suptitle(f"{result['task']}, inputs 512, batch {result['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _train_examples_per_s(batch, steps: int) -> float:
    """Examples/s of the `small` config's train step on `batch` (median of `steps` timed steps)."""
    import statistics

    import jax

    from cpm2_jax.config import get_config
    from cpm2_jax.partitioning import make_mesh
    from cpm2_jax.trainer import Trainer, TrainerConfig

    # 4 micro-batches of 8 (still one AdamW update per 32 examples) keep the step within this
    # machine's memory.
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
