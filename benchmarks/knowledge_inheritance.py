"""Does knowledge inheritance save compute here? (issue 11; CPM2_FACTS "Knowledge inheritance")

A teacher (2+2 layers, d_model 128) is pre-trained once on bilingual span corruption
(../shared/data, the `cpm2_pretrain_bilingual` mixture). A larger student (4+4 layers,
d_model 256) is then trained twice with the same seed, data and step budget: from scratch,
and with KI (L = (1 - a_t) L_LM + a_t T^2 KL, a_t linear from 1 to 0 at 40% of the budget,
T = 2, the teacher run inside the jitted step). Both validation-loss curves are saved (PNG
and JSON), and

    steps_ratio = steps KI needs to reach the scratch run's final validation loss / budget
    time_ratio  = the same in training wall-clock, the teacher's forward passes included
                  (the teacher's own pre-training is not counted: KI assumes it exists)

(target: steps_ratio <= 0.7). The figure independent of the baseline: each run's achieved
FLOP/s (XLA's count of the compiled step) as a fraction of a measured float32 matmul peak.

    python benchmarks/knowledge_inheritance.py              # the full run (< 30 min on 2 cores)
    python benchmarks/knowledge_inheritance.py --quick      # a short check of the machinery
    python benchmarks/knowledge_inheritance.py --rescore benchmarks/results/knowledge_inheritance.json

Both ratios are read off the curves smoothed over 3 evaluations (a validation loss moves by
~0.05-0.1 between evaluations here), and `final_gap_beyond_noise` says whether the two runs'
final losses differ by more than twice the scratch run's evaluation noise.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import RESULTS_DIR, machine_info, write_report  # noqa: E402

TASK = "cpm2_pretrain_bilingual"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher_steps", type=int, default=1600,
                   help="the teacher must get past the unigram plateau (~5.0 validation loss, broken at ~400-800 "
                        "steps of batch 32) to know more than the student learns alone")
    p.add_argument("--budget", type=int, default=300, help="student steps, both runs")
    p.add_argument("--ki_fraction", type=float, default=0.4, help="N = this fraction of the budget")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--targets", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny budget: checks the machinery, not the claim")
    p.add_argument("--name", default="knowledge_inheritance")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.budget, args.eval_every, args.eval_batches = 8, 8, 4, 1
        args.name = args.name + "_quick"
    return args


def configs(vocab_size: int):
    from cpm2_jax.config import get_config

    base = get_config("tiny").replace(vocab_size=vocab_size, dropout_rate=0.0)
    teacher = base.replace(d_model=128, d_ff=256, num_heads=4, head_dim=32, num_encoder_layers=2,
                           num_decoder_layers=2)
    student = base.replace(d_model=256, d_ff=512, num_heads=4, head_dim=64, num_encoder_layers=4,
                           num_decoder_layers=4)
    return teacher, student


def make_trainer(model_config, args, steps):
    from cpm2_jax.optim import OptimizerConfig
    from cpm2_jax.partitioning import make_mesh
    from cpm2_jax.trainer import Trainer, TrainerConfig

    opt = OptimizerConfig(learning_rate=args.learning_rate, warmup_steps=max(1, steps // 10))
    return Trainer(model_config, TrainerConfig(optimizer=opt, seed=args.seed), make_mesh({"data": 1}),
                   total_steps=steps)


def step_flops(trainer, state, batch) -> float:
    """FLOPs of one compiled train step (XLA's cost analysis), teacher included when there is one."""
    args = (state, batch) if trainer.inheritance is None else (state, batch, trainer.inheritance.teacher.params)
    with trainer.mesh_and_rules():  # the lowered (not compiled) step: no second compilation
        cost = trainer._train_step.lower(*args).cost_analysis()  # pylint: disable=protected-access
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def run(name, trainer, batches, eval_batches, steps, eval_every, log) -> dict:
    """Trains `steps` steps; validation loss at 0 and every `eval_every` steps. Training time
    excludes evaluation; the first step's call also compiles, so it counts as a mean step."""
    state = trainer.init_state()
    curve = [{"step": 0, "loss": trainer.evaluate(state.params, eval_batches)["loss"], "train_s": 0.0}]
    log(f"{name}: step 0 validation loss {curve[0]['loss']:.4f}")
    first = trainer.shard_batch(next(batches))
    flops = step_flops(trainer, state, first)
    later_s, first_s = 0.0, 0.0
    for step in range(1, steps + 1):
        batch = first if step == 1 else trainer.shard_batch(next(batches))
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        if step == 1:
            first_s = elapsed
        else:
            later_s += elapsed
        if step % eval_every == 0 or step == steps:
            loss = trainer.evaluate(state.params, eval_batches)["loss"]
            curve.append({"step": step, "loss": loss, "later_s": later_s})
            shown = {k: round(float(v), 4) for k, v in jax.device_get(metrics).items()
                     if k in ("loss", "lm_loss", "kd_loss", "ki_alpha", "teacher_agreement")}
            log(f"{name}: step {step} validation loss {loss:.4f}, {later_s:.1f}s {shown}")
    per_step = later_s / max(steps - 1, 1)
    for point in curve[1:]:
        point["train_s"] = round(point.pop("later_s") + per_step, 4)
    return {"curve": curve, "params": state.params, "train_seconds": round(later_s + per_step, 3),
            "first_call_seconds": round(first_s, 3), "seconds_per_step": round(per_step, 4),
            "step_gflop": round(flops / 1e9, 3), "gflop_per_s": round(flops / per_step / 1e9, 2) if per_step else None}


def smoothed(curve, window: int = 3) -> list[dict]:
    """The curve with each loss replaced by the mean of the last `window` evaluations (fewer at
    the start): a single lucky validation batch set must not count as reaching a loss."""
    out = []
    for i, point in enumerate(curve):
        span = curve[max(1 if i else 0, i - window + 1):i + 1]
        out.append(dict(point, loss=sum(p["loss"] for p in span) / len(span)))
    return out


def reach(curve, target) -> tuple[float | None, float | None]:
    """(step, train seconds) at which the curve first reaches `target`, linearly interpolated
    between evaluations; (None, None) if it never does."""
    for a, b in zip(curve, curve[1:]):
        if b["loss"] <= target:
            if a["loss"] <= target:
                return a["step"], a["train_s"]
            f = (a["loss"] - target) / (a["loss"] - b["loss"])
            return a["step"] + f * (b["step"] - a["step"]), a["train_s"] + f * (b["train_s"] - a["train_s"])
    return None, None


def compare(scratch: dict, ki: dict, budget: int, window: int = 3) -> dict:
    """steps_ratio / time_ratio on the smoothed curves (mean of the last `window` evaluations),
    and the evaluation noise: the standard deviation of the scratch run's last `window`
    evaluations around their mean. A gap between the two final losses smaller than twice that
    noise is reported as no measurable difference."""
    import statistics

    s_curve, k_curve = smoothed(scratch["curve"], window), smoothed(ki["curve"], window)
    target = s_curve[-1]["loss"]
    step_reached, seconds_reached = reach(k_curve, target)
    tail = [p["loss"] for p in scratch["curve"][-window:]]
    noise = statistics.pstdev(tail) if len(tail) > 1 else 0.0
    gap = target - k_curve[-1]["loss"]
    return {
        "steps_ratio": round(step_reached / budget, 4) if step_reached is not None else None,
        "time_ratio": round(seconds_reached / scratch["train_seconds"], 4) if seconds_reached is not None else None,
        "smoothing_window_evals": window,
        "scratch_final_validation_loss_smoothed": round(target, 4),
        "ki_final_validation_loss_smoothed": round(k_curve[-1]["loss"], 4),
        "ki_step_reaching_scratch_final": step_reached, "ki_seconds_reaching_scratch_final": seconds_reached,
        "evaluation_noise": round(noise, 4),
        "final_gap_beyond_noise": bool(gap > 2 * noise),
    }


def matmul_peak_gflops(size: int = 1024, reps: int = 5) -> float:
    """A float32 [size, size] x [size, size] XLA matmul on this CPU: the reachable peak."""
    x = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def plot(path, scratch, ki, n_inherit, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_, label in ((scratch, "from scratch"), (ki, "knowledge inheritance")):
        steps = [p["step"] for p in run_["curve"]]
        axes[0].plot(steps, [p["loss"] for p in run_["curve"]], marker=".", label=label)
        axes[1].plot([p["train_s"] for p in run_["curve"]], [p["loss"] for p in run_["curve"]], marker=".",
                     label=label)
    for ax, xlabel in ((axes[0], "student step"), (axes[1], "training seconds (teacher forward included)")):
        ax.axhline(target, color="grey", linestyle=":", label="scratch final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.legend()
    axes[0].axvline(n_inherit, color="grey", linestyle="--", linewidth=0.8)
    fig.suptitle("Student 4+4 d256: from scratch vs KI from a 2+2 d128 teacher (a_t -> 0 at the dashed line)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rescore(path: str) -> dict:
    """Recomputes the comparison of a saved result (e.g. after a change of the smoothing) without
    training again; the curves, settings and timings are the saved run's."""
    import json

    report = json.loads(pathlib.Path(path).read_text())
    report.update(compare(report["scratch"], report["ki"], report["settings"]["budget"]))
    report["rescored"] = "comparison recomputed from the saved curves (python benchmarks/knowledge_inheritance.py --rescore PATH)"
    return write_report(report, pathlib.Path(path))


def main(argv=None) -> dict:
    if argv is None and "--rescore" in sys.argv:
        return rescore(sys.argv[sys.argv.index("--rescore") + 1])
    args = parse_args(argv)
    from cpm2_jax.convert.native import save_params
    from cpm2_jax.datasets import DatasetConfig, get_dataset
    from cpm2_jax.inheritance.objective import enable_inheritance
    from cpm2_jax.inheritance.schedule import InheritanceConfig
    from cpm2_jax.tasks import settings

    began = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - began:7.1f}s] {msg}", file=sys.stderr, flush=True)

    vocab = settings.resolved_vocabulary()
    vocab_size = -(-vocab.vocab_size // 128) * 128
    teacher_cfg, student_cfg = configs(vocab_size)
    lengths = {"inputs": args.inputs, "targets": args.targets}
    train_data = DatasetConfig(TASK, lengths, split="train", batch_size=args.batch_size, seed=args.seed)
    valid_data = DatasetConfig(TASK, lengths, split="validation", batch_size=args.batch_size, shuffle=False,
                               seed=args.seed)
    source = get_dataset(valid_data)
    eval_batches = [next(source) for _ in range(args.eval_batches)]
    del source
    log(f"vocabulary {vocab.vocab_size} ids (model {vocab_size}); {len(eval_batches)} validation batches")

    teacher = run("teacher", make_trainer(teacher_cfg, args, args.teacher_steps), get_dataset(train_data),
                  eval_batches, args.teacher_steps, max(args.eval_every, args.teacher_steps // 5), log)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="ki_bench_"))
    save_params(teacher.pop("params"), teacher_cfg, workdir / "teacher")
    n_inherit = max(1, round(args.ki_fraction * args.budget))

    runs = {}
    for name in ("scratch", "ki"):
        trainer = make_trainer(student_cfg, args, args.budget)
        if name == "ki":
            enable_inheritance(trainer, InheritanceConfig(
                teacher_checkpoint=str(workdir / "teacher"), schedule="linear", alpha=1.0, inherit_steps=n_inherit,
                temperature=args.temperature), args.budget)
        runs[name] = run(name, trainer, get_dataset(train_data), eval_batches, args.budget, args.eval_every, log)
        runs[name].pop("params")
    scratch, ki = runs["scratch"], runs["ki"]
    target = scratch["curve"][-1]["loss"]
    peak = matmul_peak_gflops()
    for r in (teacher, scratch, ki):
        r["fraction_of_matmul_peak"] = round(r["gflop_per_s"] / peak, 4) if r["gflop_per_s"] else None
    png = RESULTS_DIR / f"{args.name}.png"
    plot(png, scratch, ki, n_inherit, target)
    report = {
        "benchmark": args.name,
        "what": "validation loss of a 4+4 d256 student trained from scratch vs with knowledge inheritance from a "
                "pre-trained 2+2 d128 teacher, same seed, data and step budget (cpm2_pretrain_bilingual)",
        **compare(scratch, ki, args.budget),
        "target_steps_ratio": 0.7,
        "scratch_final_validation_loss": round(target, 4),
        "ki_final_validation_loss": round(ki["curve"][-1]["loss"], 4),
        "settings": {k: v for k, v in vars(args).items()}, "inherit_steps": n_inherit,
        "vocab_size": vocab_size, "teacher_params": _count(teacher_cfg), "student_params": _count(student_cfg),
        "matmul_peak_gflop_per_s": round(peak, 2), "teacher": teacher, "scratch": scratch, "ki": ki,
        "plot": str(png.relative_to(RESULTS_DIR.parents[1])), "wall_seconds": round(time.perf_counter() - began, 1),
        "machine": machine_info(),
    }
    return write_report(report, RESULTS_DIR / f"{args.name}.json")


def _count(config) -> int:
    from cpm2_jax.model import EncoderDecoder

    ones = jnp.ones((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: EncoderDecoder(config).init(jax.random.PRNGKey(0), ones, ones))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


if __name__ == "__main__":
    main()
