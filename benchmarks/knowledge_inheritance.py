"""Does knowledge inheritance save compute here? (issue 11; CPM2_FACTS "Knowledge inheritance")

A teacher (2+2 layers, d_model 128) is pre-trained once on bilingual span corruption
(../shared/data, the `cpm2_pretrain_bilingual` mixture). A larger student (4+4 layers,
d_model 256) is then trained twice with the same seed, data and step budget: from scratch,
and with KI (L = (1 - a_t) L_LM + a_t T^2 KL, a_t linear from a_0 = 1 to 0 at 40% of the
budget, T = 2, the teacher run inside the jitted step). Both validation-loss curves are saved
(PNG and JSON), and

    steps_ratio = steps KI needs to reach the scratch run's final validation loss / budget
    time_ratio  = the same in training wall-clock, the teacher's forward passes included
                  (the teacher's own pre-training is not counted: KI assumes it exists)

(target: steps_ratio <= 0.7). The figure independent of the baseline: each run's achieved
FLOP/s (XLA's count of the compiled step) as a fraction of a measured float32 matmul peak.

    python benchmarks/knowledge_inheritance.py              # the full run (~22 min on 2 quiet cores)
    python benchmarks/knowledge_inheritance.py --quick      # a short check of the machinery, no result
    python benchmarks/knowledge_inheritance.py --rescore benchmarks/results/knowledge_inheritance.json

Choices, and why (short runs niced on a loaded 2-core machine, /tmp experiments, Nov 30):
- Initialisation std 0.01 for every matrix (`--init_std`), not CPM-2's 0.001. With 0.001 a
  2+2 d128 model sits on the unigram plateau (validation ~5.1-5.2, the unigram
  cross-entropy of the targets) for 200 steps of batch 32 (5.16 at step 100, 4.98 at 200),
  and the previous full run's 4+4 d256 students stayed on it for their whole 300-step
  budget, which makes "steps to reach the scratch run's final loss" meaningless. With 0.01
  the same 2+2 model is at 4.97 by step 50 and 4.80 by step 100. 0.01 keeps the attention
  logits unsaturated without the 1/sqrt(d) scaling CPM-2 does not have (q.k std ~0.2 at
  d_model 256, head_dim 64). Teacher and both students use it: like against like.
- AdamW at 2e-3 with "noam" (warm-up 10% of the run, then 1/sqrt(t)), as before: the
  plateau was the initialisation's, not the optimiser's.
- The teacher trains 800 steps: with std 0.01 that puts it well below the plateau (the
  previous 1600-step std-0.001 teacher reached 4.29); KD can only add what the teacher knows
  and the student does not yet. Its final validation loss is in the JSON beside the
  unigram plateau (`unigram_validation_loss`: the targets' cross-entropy under the training
  targets' unigram counts, add-one smoothed: 5.28 here) and the check `scratch_left_plateau`
  (the scratch run's final loss below it by more than max(0.3, twice the noise): the
  std-0.001 runs sat 0.1-0.25 below the unigram, at 5.05-5.2, since they place sentinels).
- KD as the reference KI run: a_0 = 1, T = 2, N = 40% of the budget. Proxy (a 2+2 d128
  student, std 0.01, 200-step run with N = 80, KD from the earlier 1600-step teacher at
  4.29; the machine's load stopped it at step 75): validation at steps 25 / 50 / 75 was
  6.34 / 4.97 / 4.79 from scratch, 6.75 / 4.83 / 4.74 with T = 2 and 6.18 / 4.99 with T = 1:
  pure KD at T = 2 is behind for the first ~25 steps, then ahead (~20 steps at 4.8), the
  lead shrinking as a_t -> 0. Whether 4+4 d256 ends <= 0.7 is what the full run measures.
- Noise: `evaluation_noise` is the residual standard deviation of the scratch run's last 5
  evaluations around their least-squares line (one seed; `--null_seed` adds a second
  from-scratch run with another seed and reports its own `null_steps_ratio` against the
  first: what "no effect" looks like). Both ratios are read off curves smoothed over 3
  evaluations; `steps_ratio_range` is where the KI curve crosses the target +- that noise,
  and `final_gap_beyond_noise` says whether the final losses differ by more than twice it.
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

from benchmarks import small_pretraining as pre  # noqa: E402
from benchmarks.report import RESULTS_DIR, machine_info, write_report  # noqa: E402

TEACHER_SIZE, STUDENT_SIZE = (128, 2), (256, 4)  # (d_model, layers per stack)
PLATEAU_MARGIN = 0.3  # below the unigram loss by more than this: off the plateau (see the docstring)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher_steps", type=int, default=800,
                   help="the teacher must be well below the unigram plateau to know more than the student learns alone")
    p.add_argument("--teacher_checkpoint", default=None,
                   help="reuse a teacher saved by an earlier run (its pre-training is not counted either way)")
    p.add_argument("--budget", type=int, default=400, help="student steps, both runs")
    p.add_argument("--ki_fraction", type=float, default=0.4, help="N = this fraction of the budget")
    p.add_argument("--alpha", type=float, default=1.0, help="a_0")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--targets", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--init_std", type=float, default=0.01,
                   help="every matrix's init std (CPM-2: 0.001, which holds these sizes on the unigram plateau)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--null_seed", action="store_true",
                   help="a second from-scratch run (seed + 1): the steps ratio of no effect (+~1/3 of the time)")
    p.add_argument("--quick", action="store_true", help="a tiny budget: checks the machinery, not the claim")
    p.add_argument("--name", default="knowledge_inheritance")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.budget, args.eval_every, args.eval_batches = 8, 8, 4, 1
        args.name = args.name + "_quick"
    return args


def configs(vocab_size: int, init_std: float):
    teacher = pre.small_config(*TEACHER_SIZE, vocab_size=vocab_size, init_std=init_std)
    student = pre.small_config(*STUDENT_SIZE, vocab_size=vocab_size, init_std=init_std)
    return teacher, student


def make_trainer(model_config, args, steps, seed=None):
    return pre.make_trainer(model_config, steps=steps, learning_rate=args.learning_rate,
                            warmup_steps=max(1, steps // 10), seed=args.seed if seed is None else seed)


def step_flops(trainer, state, batch) -> float:
    """FLOPs of one compiled train step (XLA's cost analysis), teacher included when there is one."""
    args = (state, batch) if trainer.inheritance is None else (state, batch, trainer.inheritance.teacher.params)
    with trainer.mesh_and_rules():  # the lowered (not compiled) step: no second compilation
        cost = trainer._train_step.lower(*args).cost_analysis()  # pylint: disable=protected-access
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def counting_targets(source, counts: np.ndarray):
    """`source`, adding each batch's weighted target ids to `counts` (the unigram plateau)."""
    try:
        for batch in source:
            weights = batch["decoder_loss_weights"] > 0
            counts += np.bincount(batch["decoder_target_tokens"][weights], minlength=len(counts))[:len(counts)]
            yield batch
    finally:
        pre.close(source)


def unigram_loss(counts: np.ndarray, eval_batches) -> float:
    """Cross-entropy of the validation targets under the (add-one smoothed) training unigram:
    the loss of a model that ignores its context, i.e. the plateau."""
    log_p = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    total = weight = 0.0
    for batch in eval_batches:
        w = batch["decoder_loss_weights"].astype(np.float64)
        total -= float(np.sum(w * log_p[batch["decoder_target_tokens"]]))
        weight += float(w.sum())
    return total / max(weight, 1.0)


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


def evaluation_noise(curve, last: int = 5) -> float:
    """Residual standard deviation of the last `last` evaluations around their least-squares
    line: how much one evaluation moves by itself once the trend is taken out."""
    tail = curve[-last:]
    if len(tail) < 3:
        return 0.0
    x = np.array([p["step"] for p in tail], float)
    y = np.array([p["loss"] for p in tail], float)
    residual = y - np.polyval(np.polyfit(x, y, 1), x)
    return float(np.sqrt(np.sum(residual ** 2) / (len(tail) - 2)))


def compare(scratch: dict, ki: dict, budget: int, window: int = 3) -> dict:
    """steps_ratio / time_ratio on the smoothed curves (mean of the last `window` evaluations),
    the evaluation noise of the scratch run, and the steps range where the KI curve crosses
    the target +- that noise. A gap between the final losses under twice the noise is
    reported as no measurable difference."""
    s_curve, k_curve = smoothed(scratch["curve"], window), smoothed(ki["curve"], window)
    target = s_curve[-1]["loss"]
    step_reached, seconds_reached = reach(k_curve, target)
    noise = evaluation_noise(scratch["curve"])
    early, _ = reach(k_curve, target + noise)
    late, _ = reach(k_curve, target - noise)
    gap = target - k_curve[-1]["loss"]
    return {
        "steps_ratio": round(step_reached / budget, 4) if step_reached is not None else None,
        "time_ratio": round(seconds_reached / scratch["train_seconds"], 4) if seconds_reached is not None else None,
        "steps_ratio_range": [round(early / budget, 4) if early is not None else None,
                              round(late / budget, 4) if late is not None else None],
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


def plot(path, runs: dict, n_inherit, target, lines: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"scratch": "from scratch", "ki": "knowledge inheritance", "scratch_seed1": "from scratch, seed + 1"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_ in runs.items():
        steps = [p["step"] for p in run_["curve"]]
        style = dict(marker=".", label=labels[name], linestyle=":" if name == "scratch_seed1" else "-")
        axes[0].plot(steps, [p["loss"] for p in run_["curve"]], **style)
        axes[1].plot([p["train_s"] for p in run_["curve"]], [p["loss"] for p in run_["curve"]], **style)
    for ax, xlabel in ((axes[0], "student step"), (axes[1], "training seconds (teacher forward included)")):
        ax.axhline(target, color="grey", linestyle=":", label="scratch final (smoothed)")
        for (label, value), color in zip(lines.items(), ("tab:red", "tab:green")):
            ax.axhline(value, color=color, linestyle="--", linewidth=0.8, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(7.0, max(p["loss"] for r in runs.values() for p in r["curve"])))
        ax.legend(fontsize=8)
    axes[0].axvline(n_inherit, color="grey", linestyle="--", linewidth=0.8)
    fig.suptitle(f"Student {STUDENT_SIZE[1]}+{STUDENT_SIZE[1]} d{STUDENT_SIZE[0]}: from scratch vs KI from a "
                 f"{TEACHER_SIZE[1]}+{TEACHER_SIZE[1]} d{TEACHER_SIZE[0]} teacher (a_t -> 0 at the dashed line)")
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
    from cpm2_jax.inheritance.objective import enable_inheritance
    from cpm2_jax.inheritance.schedule import InheritanceConfig

    began = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - began:7.1f}s] {msg}", file=sys.stderr, flush=True)

    vocab_size = pre.model_vocab_size()
    teacher_cfg, student_cfg = configs(vocab_size, args.init_std)
    lengths = {"inputs": args.inputs, "targets": args.targets}

    def train_source(seed):
        return pre.batches(pre.TASK, "train", lengths, args.batch_size, seed=seed)

    eval_batches = pre.take(pre.batches(pre.TASK, "validation", lengths, args.batch_size, shuffle=False),
                            args.eval_batches)
    log(f"model vocabulary {vocab_size} ids; {len(eval_batches)} validation batches")

    counts = np.zeros(vocab_size, np.int64)
    if args.teacher_checkpoint:
        from cpm2_jax.infer import load_checkpoint

        teacher_dir = pathlib.Path(args.teacher_checkpoint)
        params, saved_cfg = load_checkpoint(teacher_dir)
        probe = make_trainer(saved_cfg, args, 1)
        teacher = {"reused": str(teacher_dir), "curve": [{"step": None, "loss": probe.evaluate(params, eval_batches)["loss"]}]}
        pre.take(counting_targets(train_source(args.seed), counts), 200)
        teacher_cfg = saved_cfg
    else:
        teacher = run("teacher", make_trainer(teacher_cfg, args, args.teacher_steps),
                      counting_targets(train_source(args.seed), counts), eval_batches, args.teacher_steps,
                      max(args.eval_every, args.teacher_steps // 8), log)
        teacher_dir = pathlib.Path(tempfile.mkdtemp(prefix="ki_bench_")) / "teacher"
        save_params(teacher.pop("params"), teacher_cfg, teacher_dir)
    plateau = unigram_loss(counts, eval_batches)
    log(f"teacher validation loss {teacher['curve'][-1]['loss']:.4f}; unigram plateau {plateau:.4f}")
    n_inherit = max(1, round(args.ki_fraction * args.budget))

    runs = {}
    plan = [("scratch", args.seed), ("ki", args.seed)] + ([("scratch_seed1", args.seed + 1)] if args.null_seed else [])
    for name, seed in plan:
        trainer = make_trainer(student_cfg, args, args.budget, seed)
        if name == "ki":
            enable_inheritance(trainer, InheritanceConfig(
                teacher_checkpoint=str(teacher_dir), schedule="linear", alpha=args.alpha, inherit_steps=n_inherit,
                temperature=args.temperature), args.budget)
        runs[name] = run(name, trainer, train_source(seed), eval_batches, args.budget, args.eval_every, log)
        runs[name].pop("params")
    scratch, ki = runs["scratch"], runs["ki"]
    comparison = compare(scratch, ki, args.budget)
    target = comparison["scratch_final_validation_loss_smoothed"]
    peak = matmul_peak_gflops()
    for r in (teacher, *runs.values()):
        if r.get("gflop_per_s"):
            r["fraction_of_matmul_peak"] = round(r["gflop_per_s"] / peak, 4)
    png = RESULTS_DIR / f"{args.name}.png"
    teacher_final = teacher["curve"][-1]["loss"]
    plot(png, runs, n_inherit, target, {"unigram plateau": plateau, "teacher final": teacher_final})
    null = {}
    if "scratch_seed1" in runs:
        other = compare(scratch, runs["scratch_seed1"], args.budget)
        null = {"null_steps_ratio": other["steps_ratio"], "null_steps_ratio_range": other["steps_ratio_range"]}
    report = {
        "benchmark": args.name,
        "what": f"validation loss of a {STUDENT_SIZE[1]}+{STUDENT_SIZE[1]} d{STUDENT_SIZE[0]} student trained from "
                f"scratch vs with knowledge inheritance from a pre-trained {TEACHER_SIZE[1]}+{TEACHER_SIZE[1]} "
                f"d{TEACHER_SIZE[0]} teacher, same seed, data and step budget ({pre.TASK})",
        **comparison, **null,
        "target_steps_ratio": 0.7,
        "meets_target": bool(comparison["steps_ratio"] is not None and comparison["steps_ratio"] <= 0.7),
        "scratch_final_validation_loss": round(scratch["curve"][-1]["loss"], 4),
        "ki_final_validation_loss": round(ki["curve"][-1]["loss"], 4),
        "teacher_final_validation_loss": round(teacher_final, 4),
        "unigram_validation_loss": round(plateau, 4),
        "scratch_left_plateau": bool(target < plateau - max(PLATEAU_MARGIN, 2 * comparison["evaluation_noise"])),
        "settings": dict(vars(args)), "inherit_steps": n_inherit,
        "why": "init_std 0.01: CPM-2's 0.001 holds these sizes on the unigram plateau for the whole budget "
               "(see the module docstring); a_0, T and N as the reference KI run (1, 2, ~40-44%)",
        "vocab_size": vocab_size, "teacher_params": _count(teacher_cfg), "student_params": _count(student_cfg),
        "matmul_peak_gflop_per_s": round(peak, 2), "teacher": teacher, **runs,
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
