"""Prompt tuning vs full fine-tuning on real data, and where the prompt should sit (issue 12;
CPM2_FACTS "Prompt tuning": on LCQMC, front 88.38 / back 88.50 / middle 89.20 / front+middle+back 90.65).

1. Pre-trains a small CPM-2 on ../shared/data (span corruption on `cpm2_pretrain_bilingual`,
   benchmarks/small_pretraining.py, with a share of `en_zh` translation batches: see below;
   by default 2+2 layers d_model 128, init std 0.01: the KI benchmark's teacher, which leaves
   the unigram plateau in ~100 steps). `--backbone PATH` saves it there, or reuses it when
   the file exists (then the pre-training flags are not used).
2. From that backbone, on `translation_match` (an (English, Chinese) pair with `<sep>` between
   them -> 是/否, balanced: the local stand-in for LCQMC) and on `man_summary_zh` (a Chinese
   man page's DESCRIPTION -> its NAME line), the same examples, batches and step budget for:
   full fine-tuning (every parameter) and prompt tuning (the backbone frozen, one prompt of
   `--prompt_length` vectors at front / middle / back / front+middle+back; the generation
   input has no `<sep>`, so there: front / back / front+back), AdamW, constant learning
   rate; dropout `--dropout` (0) on the pair task and `--gen_dropout` (0.1) on the
   generation task, every arm of a task alike.
3. Every `--eval_every` steps the validation metric:
   - pair task: accuracy by rank classification (t5x/seqio style): the teacher-forced
     log-likelihood of each label string (是 or 否, EOS included, `decoding.score`), the
     larger wins; never "no label". Beside it the majority-class baseline of the same
     examples and its binomial standard error; an arm is "above chance" when its best
     accuracy exceeds majority + 2 standard errors.
   - generation task: ROUGE-L F1 (characters, %, `tasks/metrics.summary_metrics`) of greedy
     outputs against the references, on the whole validation split.
   Beside each metric the validation loss (pair: the true label's negative log-likelihood,
   label + EOS; generation: the teacher-forced token loss), which moves where the metric
   does not. An arm "beats chance" when its best metric is above the line (pair) or above
   its own untuned score at step 0 (generation). "Steps to converge": the first evaluation
   within 1% (relative) of the arm's best metric; null for an arm that does not beat chance.
4. Before the pair arms, a linear probe of the frozen encoder (`frozen_probe`): what signal a
   prompt, which only steers the backbone's own computation, has to work with.
Writes a table (JSON, printed last), benchmarks/results/prompt_tuning.json and a PNG of the
curves. The default budget is meant for under 45 minutes on 2 quiet CPU cores.

Learning rates: full fine-tuning 1e-3 (AdamW on this small model; 3e-4 learnt nothing in 300
steps of the first run). Prompt tuning: Lester et al. use 0.3 with Adafactor, whose step is
relative to the parameter's RMS; AdamW's first steps are ~lr per element, so the default
`--prompt_lr` is 0.3 x the RMS of the embedding rows the prompt starts from
(`prompt_init_rms`; 0.018 after 300 pre-training steps, so ~0.005: the paper's 0.005 too).

Backbone data: `--translation_share` (default 0.25) of the pre-training batches are `en_zh`
translation pairs (train split; translation_match's validation pairs come from other
programs and are never seen). Span corruption on monolingual text gives the model no
cross-lingual signal at all: with it alone (300 steps, val loss 4.45) full fine-tuning stayed
at exactly 0.50 for 150 steps (always one label); a translation-match judgement needs a
backbone that has seen aligned text, as CPM-2's did.

Earlier run (tiny backbone, init std 0.001, first-token argmax): every arm at chance, front
prompts never produced a label; that backbone sat on the unigram plateau.
`--quick` runs every code path once on a toy budget and writes prompt_tuning_quick.{json,png},
which are no result.

    python benchmarks/prompt_tuning.py [--quick] [--backbone /tmp/pt_backbone.msgpack]
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import small_pretraining as pre  # noqa: E402
from benchmarks.report import RESULTS_DIR, machine_info, write_report  # noqa: E402

PAIR_TASK, GEN_TASK = "translation_match", "man_summary_zh"
PLACEMENTS = ("front", "middle", "back", "front+middle+back")
# A generation input is one text: no <sep>, so no middle; its split prompt is front+back.
GEN_PLACEMENTS = ("front", "back", "front+back")
TRANSLATION_TASK = "en_zh"  # the pairs' train split as translation (validation never seen)
LABELS = ("否", "是")  # tasks/local.py MATCH_LABELS
CONVERGED_FRACTION = 0.99
LESTER_RELATIVE_LR = 0.3  # Adafactor lr with parameter scaling: each step ~0.3 x the prompt's RMS


def log(msg: str) -> None:
    print(f"[prompt_tuning {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def backbone_params(config, args):
    """The pre-trained backbone: loaded from `--backbone` when that file exists (its own earlier
    output), else pre-trained here (and saved there when given). Returns (params, info)."""
    import flax.serialization
    import jax

    path = pathlib.Path(args.backbone) if args.backbone else None
    trainer = pre.make_trainer(config, steps=args.pretrain_steps, learning_rate=args.pretrain_lr,
                               warmup_steps=max(args.pretrain_steps // 10, 1))
    if path is not None and path.exists():
        template = jax.device_get(trainer.init_state().params)
        params = flax.serialization.from_bytes(template, path.read_bytes())
        log(f"backbone loaded from {path}")
        return params, {"loaded_from": str(path)}
    lengths = {"inputs": args.pretrain_len, "targets": args.pretrain_len // 4}
    spans = pre.batches(pre.TASK, "train", lengths, args.pretrain_batch)
    pairs = pre.batches(TRANSLATION_TASK, "train", lengths, args.pretrain_batch) if args.translation_share else None
    start = time.perf_counter()
    state, metrics = pre.pretrain(trainer, interleaved(spans, pairs, args.translation_share), args.pretrain_steps,
                                  log=log, log_every=max(args.pretrain_steps // 10, 1))
    for source in (spans, pairs):
        pre.close(source)
    val = pre.take(pre.batches(pre.TASK, "validation", lengths, args.pretrain_batch, shuffle=False), 4)
    info = {"train_loss": round(metrics["loss"], 4),
            "span_corruption_validation_loss": round(trainer.evaluate(state.params, val)["loss"], 4),
            "seconds": round(time.perf_counter() - start, 1)}
    params = jax.device_get(state.params)
    if path is not None:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(flax.serialization.to_bytes(params))
        tmp.replace(path)
        info["saved_to"] = str(path)
    log(f"backbone: {info}")
    return params, info


def interleaved(first, second, share: float, seed: int = 0):
    """Batches of `first`, each replaced by the next of `second` with probability `share`
    (a fixed draw per step, so every run sees the same sequence)."""
    import numpy as np

    draws = np.random.default_rng(seed)
    while True:
        yield next(second) if second is not None and draws.random() < share else next(first)


def fitting_pairs_dir(enc_len: int) -> dict:
    """Points the local tasks at a temporary data directory whose `en_zh` pairs fit `enc_len`
    input tokens whole; returns the kept counts.

    translation_match inputs are `英文：{en}<sep>中文：{zh}`; one cut to fit loses its Chinese
    side and its `<sep>`, so it is no pair any more (and a middle prompt has no place: the
    trainer rejects such a batch). Pairs whose input does not fit are left out (counted in the
    report); the generation task is linked unchanged. The shared data is only read.
    """
    import json
    import tempfile

    from cpm2_jax.tasks import settings
    from cpm2_jax.tasks.downstream import SEP

    vocab = settings.default_vocabulary()
    shared = settings.data_dir()
    out = pathlib.Path(tempfile.mkdtemp(prefix="cpm2_prompt_tuning_"))
    kept = {}
    for split in ("train", "validation"):
        n = total = 0
        with open(shared / f"en_zh_{split}.jsonl", encoding="utf-8") as src, \
                open(out / f"en_zh_{split}.jsonl", "w", encoding="utf-8") as dst:
            for line in src:
                record = json.loads(line)
                total += 1
                if len(vocab.encode(f"英文：{record['en']}{SEP}中文：{record['zh']}")) < enc_len:  # + EOS
                    dst.write(line)
                    n += 1
        kept[split] = {"kept": n, "of": total}
        (out / f"{GEN_TASK}_{split}.jsonl").symlink_to(shared / f"{GEN_TASK}_{split}.jsonl")
    settings.set_task_dir("local", out)
    return kept


def label_ids():
    """[2, 2] token ids of each label string followed by EOS (the rank-classification candidates)."""
    import numpy as np

    from cpm2_jax.decoding import EOS_ID
    from cpm2_jax.tasks.settings import default_vocabulary

    vocab = default_vocabulary()
    rows = [vocab.encode(label) + [EOS_ID] for label in LABELS]
    width = max(map(len, rows))
    return np.array([r + [0] * (width - len(r)) for r in rows], np.int32)


def rank_accuracy(params, config, val, candidates) -> tuple[float, float]:
    """Rank classification over the label strings: (accuracy, mean log-likelihood of the true label)."""
    import numpy as np

    from cpm2_jax.decoding import score

    hits = total = 0
    true_ll = 0.0
    for b in val:
        enc, tgt = b["encoder_input_tokens"], b["decoder_target_tokens"]
        rows = tgt[:, 0] > 0
        lls = np.stack([np.asarray(score(params, enc, np.broadcast_to(c, (len(enc), len(c))), config=config)[1])
                        for c in candidates], axis=1)
        truth = np.array([[np.array_equal(t[:len(c)], c) for c in candidates] for t in tgt]).argmax(1)
        hits += int(np.sum((lls.argmax(1) == truth) & rows))
        total += int(rows.sum())
        true_ll += float(np.sum(lls[np.arange(len(enc)), truth] * rows))
    return hits / max(total, 1), true_ll / max(total, 1)


def majority(val) -> tuple[float, int]:
    """(share of the most frequent label, examples) of a pair-task validation set."""
    import collections

    counts = collections.Counter(int(t) for b in val for t in b["decoder_target_tokens"][:, 0] if t > 0)
    total = sum(counts.values())
    return max(counts.values()) / total, total


def rouge(params, config, val, max_new_tokens) -> float:
    """ROUGE-L F1 (%) of greedy outputs on `val` (tasks/metrics.summary_metrics)."""
    import numpy as np

    from cpm2_jax.decoding import greedy, strip_after_eos
    from cpm2_jax.tasks import metrics
    from cpm2_jax.tasks.settings import default_vocabulary

    vocab = default_vocabulary()
    refs, outs = [], []
    for b in val:
        tokens = np.asarray(greedy(params, b["encoder_input_tokens"], config=config,
                                   max_new_tokens=max_new_tokens).tokens)
        for row, tgt in zip(tokens, b["decoder_target_tokens"]):
            if tgt[0] > 0:
                refs.append(vocab.decode(strip_after_eos(tgt)))
                outs.append(vocab.decode(strip_after_eos(row)))
    return metrics.summary_metrics(refs, outs)["rouge_l"]


def side_features(encode, params, batches):
    """Per pair: the frozen encoder's outputs (`encode(params, tokens)`) averaged over each side
    of `<sep>` (a, c) as [a, c, |a - c|, a * c] (sentence-pair features, Conneau et al. 2017),
    and the label."""
    import numpy as np

    from cpm2_jax.tasks.downstream import SEP
    from cpm2_jax.tasks.settings import default_vocabulary

    sep = default_vocabulary().encode(SEP)[-1]
    yes = label_ids()[LABELS.index("是"), 0]
    feats, labels = [], []
    for b in batches:
        tokens = b["encoder_input_tokens"]
        states = np.asarray(encode(params, tokens))
        for row, h, target in zip(tokens, states, b["decoder_target_tokens"]):
            at = np.flatnonzero(row == sep)
            if target[0] == 0 or len(at) == 0:
                continue
            a, c = h[:at[0]].mean(0), h[at[0] + 1:int((row > 0).sum())].mean(0)
            feats.append(np.concatenate([a, c, np.abs(a - c), a * c]))
            labels.append(int(target[0] == yes))
    return np.array(feats), np.array(labels)


def logistic_accuracy(x_train, y_train, x_val, y_val, steps: int = 2000, lr: float = 0.1, l2: float = 1e-3) -> float:
    """Validation accuracy of an L2-regularised logistic regression (full-batch gradient descent
    on standardised features)."""
    import numpy as np

    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    w, b = np.zeros(x_train.shape[1]), 0.0
    for _ in range(steps):
        g = 1 / (1 + np.exp(-(x_train @ w + b))) - y_train
        w -= lr * (x_train.T @ g / len(y_train) + l2 * w)
        b -= lr * g.mean()
    return float(np.mean((x_val @ w + b > 0) == y_val))


def frozen_probe(backbone, config, data, args) -> dict:
    """What a frozen encoder offers the pair task: a linear probe on its outputs (side_features,
    `--probe_batches` training batches, the arms' validation examples), for the pre-trained
    backbone and for the same model at initialisation. A prompt steers the frozen network's
    own computation; a probe near chance says the encoder output carries no linearly readable
    match signal for it to steer towards."""
    import jax

    from cpm2_jax.model.transformer import EncoderDecoder

    model = EncoderDecoder(config)
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode))  # compiled once
    fresh = jax.device_get(pre.make_trainer(config, steps=1, learning_rate=1e-3).init_state().params)
    train = data["train"][:args.probe_batches]
    out = {}
    for name, params in (("backbone", backbone), ("initialisation", fresh)):
        x_train, y_train = side_features(encode, params, train)
        x_val, y_val = side_features(encode, params, data["val"])
        out[name] = round(logistic_accuracy(x_train, y_train, x_val, y_val), 4)
    out["train_examples"], out["validation_examples"] = int(len(y_train)), int(len(y_val))
    log(f"linear probe of the frozen encoder: {out}")
    return out


def converged_at(curve, good: bool):
    """The first evaluation within 1% (relative) of the best metric; None when the arm never did anything."""
    best = max(c["metric"] for c in curve)
    return next(c["step"] for c in curve if c["metric"] >= CONVERGED_FRACTION * best) if good else None


def tune(backbone, base_config, task, variant, data, args):
    """One fine-tuning arm; returns its curve and summary."""
    import jax
    import numpy as np

    from cpm2_jax.prompts import PromptConfig
    from cpm2_jax.prompts import init as prompt_init

    if variant == "full":
        config, trainable, lr = base_config, None, args.full_lr
        params = backbone
    else:
        prompt = PromptConfig(length=args.prompt_length, placement=variant, init="vocab")
        config, trainable, lr = base_config.replace(prompt=prompt), ["prompt"], args.prompt_lr
    steps = data["steps"]
    trainer = pre.make_trainer(config, steps=steps, learning_rate=lr, schedule="constant",
                               weight_decay=0.0, trainable=trainable, seed=1)
    if variant != "full":
        fresh = jax.device_get(trainer.init_state().params)
        params = prompt_init.initialize({**backbone, "prompt": fresh["prompt"]}, config)
    state = trainer.state_from_params(params)

    def evaluate(p):
        """(metric, loss): the pair task's loss is the true label's negative log-likelihood
        (label + EOS), the generation task's the teacher-forced token loss."""
        if task == PAIR_TASK:
            acc, true_ll = rank_accuracy(p, config, data["val"], data["candidates"])
            return acc, -true_ll
        return rouge(p, config, data["val"], args.gen_targets), trainer.evaluate(p, data["val"])["loss"]

    metric, loss = evaluate(state.params)
    curve = [{"step": 0, "metric": round(metric, 4), "loss": round(loss, 4), "train_s": 0.0}]
    train_s, first_step_s, train_losses = 0.0, 0.0, []
    for step, batch in zip(range(1, steps + 1), data["train"]):
        t = time.perf_counter()
        state, m = trainer.train_step(state, trainer.shard_batch(batch))
        train_losses.append(float(m["loss"]))
        if step == 1:  # compilation included
            first_step_s = time.perf_counter() - t
        else:
            train_s += time.perf_counter() - t
        if step % data["eval_every"] == 0 or step == steps:
            metric, loss = evaluate(state.params)
            curve.append({"step": step, "metric": round(metric, 4), "loss": round(loss, 4),
                          "train_loss": round(float(np.mean(train_losses[-data["eval_every"]:])), 4),
                          "train_s": round(train_s, 1)})
            log(f"{task} / {variant} step {step}: metric {metric:.4f}, validation loss {loss:.4f}")
    best = max(c["metric"] for c in curve[1:])
    good = best > (data["chance_line"] if task == PAIR_TASK else curve[0]["metric"])
    leaves = zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(trainer.mask))
    trained = int(sum(np.prod(x.shape) for x, m in leaves if m))
    out = {"task": task, "variant": variant, "learning_rate": lr, "initial_metric": curve[0]["metric"],
           "best_metric": best, "final_metric": curve[-1]["metric"], "initial_loss": curve[0]["loss"],
           "best_loss": min(c["loss"] for c in curve), "final_loss": curve[-1]["loss"],
           "beats_chance": bool(good), "steps_to_converge": converged_at(curve[1:], good),
           "trained_parameters": trained, "train_seconds": round(train_s, 1),
           "seconds_per_step": round(train_s / max(len(train_losses) - 1, 1), 4),
           "first_step_seconds": round(first_step_s, 1), "curve": curve}
    log(f"{task} / {variant}: best {best:.4f}, final {out['final_metric']:.4f}, beats chance {good}, "
        f"converged at {out['steps_to_converge']} ({train_s:.0f} s training, {trained:,} trained parameters)")
    return out


def task_data(task, args):
    """The arms' shared data: the task's step budget and that many training batches (one fixed
    order), the validation batches and the chance line."""
    pair = task == PAIR_TASK
    steps, batch = (args.tune_steps, args.batch) if pair else (args.gen_steps, args.gen_batch)
    lengths = {"inputs": args.pair_len, "targets": 4} if pair else {"inputs": args.gen_len, "targets": args.gen_targets}
    train = pre.take(pre.batches(task, "train", lengths, batch, seed=1, pack=False), steps)
    val_batches = args.pair_val // batch if pair else 10 ** 6  # the generation task: its whole split
    val = pre.take(pre.batches(task, "validation", lengths, batch, pack=False, epochs=1, shuffle=False),
                   max(val_batches, 1))
    data = {"train": train, "val": val, "steps": steps, "eval_every": args.eval_every if pair else args.gen_eval_every}
    if pair:
        share, n = majority(val)
        se = math.sqrt(share * (1 - share) / n)
        data.update(candidates=label_ids(), chance_line=share + 2 * se,
                    chance={"majority_class_accuracy": round(share, 4), "standard_error": round(se, 4),
                            "examples": n})
    else:
        data.update(chance={"examples": sum(int((b["decoder_target_tokens"][:, 0] > 0).sum())
                                                             for b in val)})
    return data


def plot(runs, chance, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in (PAIR_TASK, GEN_TASK) if any(r["task"] == t for r in runs)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 7), squeeze=False)
    for ax, loss_ax, task in zip(axes[0], axes[1], tasks):
        for r in (r for r in runs if r["task"] == task):
            steps = [c["step"] for c in r["curve"]]
            ax.plot(steps, [c["metric"] for c in r["curve"]], marker=".", label=f"{r['variant']} (lr {r['learning_rate']:g})")
            loss_ax.plot(steps, [c["loss"] for c in r["curve"]], marker=".", label=r["variant"])
        loss_ax.set_yscale("log")
        loss_ax.set_title(f"{task}: validation loss (" + ("true label + EOS, nats" if task == PAIR_TASK
                                                          else "per target token") + ")")
        loss_ax.set_xlabel("fine-tuning step")
        loss_ax.legend(fontsize=8)
        if task == PAIR_TASK:
            c = chance[task]
            ax.axhline(c["majority_class_accuracy"], color="grey", ls="--", label="majority class")
            ax.axhline(c["majority_class_accuracy"] + 2 * c["standard_error"], color="grey", ls=":",
                       label="majority + 2 s.e.")
        ax.set_title(f"{task}: " + ("accuracy (rank classification)" if task == PAIR_TASK else "ROUGE-L F1 (%)"))
        ax.set_xlabel("fine-tuning step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def embedding_rms(params) -> float:
    import numpy as np

    from cpm2_jax.prompts.init import _embedding

    return float(np.sqrt(np.mean(np.square(np.asarray(_embedding(params), np.float32)))))


def pair_summary(pair: dict, standard_error: float) -> dict:
    """The paper's question on the pair task's table: does the middle prompt beat front and back,
    by how much, against the standard error of a difference of two accuracies. With no prompt
    above chance there is no best placement (None): ties at chance rank nothing."""
    prompts = {v: pair[v]["best_metric"] for v in PLACEMENTS if v in pair}
    margin = pair["middle"]["best_metric"] - max(pair["front"]["best_metric"], pair["back"]["best_metric"])
    above = any(pair[v]["beats_chance"] for v in prompts)
    return {"best_placement": max(prompts, key=prompts.get) if above else None,
            "middle_beats_front_and_back": margin > 0,
            "middle_margin_over_front_and_back": round(margin, 4),
            "difference_standard_error": round(math.sqrt(2) * standard_error, 4),
            "any_prompt_beats_chance": above}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the machinery only")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="encoder layers = decoder layers")
    p.add_argument("--init_std", type=float, default=0.01,
                   help="the backbone's initial weight std (CPM-2's 0.001 holds a small model on the "
                        "unigram plateau: see benchmarks/knowledge_inheritance.py)")
    p.add_argument("--pretrain_steps", type=int, default=1000)
    p.add_argument("--pretrain_batch", type=int, default=32)
    p.add_argument("--pretrain_len", type=int, default=64)
    p.add_argument("--pretrain_lr", type=float, default=2e-3)
    p.add_argument("--translation_share", type=float, default=0.25,
                   help="share of pre-training batches that are en_zh translation (train split) instead of span "
                        "corruption: the backbone's only cross-lingual signal (0: monolingual only)")
    p.add_argument("--backbone", default=None, help="msgpack file: reused when it exists, else written after pre-training")
    p.add_argument("--tune_steps", type=int, default=1500, help="pair-task steps per arm")
    p.add_argument("--eval_every", type=int, default=250, help="pair-task evaluation interval")
    p.add_argument("--gen_eval_every", type=int, default=50, help="generation-task evaluation interval")
    p.add_argument("--batch", type=int, default=32, help="pair-task batch")
    p.add_argument("--gen_steps", type=int, default=300, help="generation-task steps per arm")
    p.add_argument("--gen_batch", type=int, default=16)
    p.add_argument("--pair_len", type=int, default=64, help="pair-task input tokens (pairs that do not fit are left out)")
    p.add_argument("--pair_val", type=int, default=1024, help="pair-task validation examples")
    p.add_argument("--gen_len", type=int, default=128)
    p.add_argument("--gen_targets", type=int, default=32)
    p.add_argument("--prompt_length", type=int, default=20)
    p.add_argument("--probe_batches", type=int, default=120, help="pair-task training batches for the linear probe")
    p.add_argument("--prompt_lr", type=float, default=None,
                   help="AdamW learning rate of the prompt (default: 0.3 x the RMS of the backbone's embedding rows, "
                        "Lester et al.'s Adafactor 0.3 with parameter scaling, in AdamW's absolute steps)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="pair-task dropout, every arm (0.1 halved the step rate on the CPU and kept full fine-tuning "
                        "at chance longer)")
    p.add_argument("--gen_dropout", type=float, default=0.1,
                   help="generation-task dropout, every arm (without it full fine-tuning overfits the 401 examples "
                        "within 100 steps)")
    p.add_argument("--full_lr", type=float, default=1e-3)
    p.add_argument("--name", default=None, help="results file stem (default prompt_tuning, prompt_tuning_quick with --quick)")
    p.add_argument("--tasks", default=f"{PAIR_TASK},{GEN_TASK}")
    p.add_argument("--variants", default="full," + ",".join(PLACEMENTS + GEN_PLACEMENTS[-1:]),
                   help="arms to run; each task runs those that apply to it (the generation task has no middle)")
    args = p.parse_args(argv)
    if args.quick:  # every code path once, not a result
        args.pretrain_steps, args.tune_steps, args.gen_steps, args.pair_val = 4, 4, 4, 16
        args.eval_every = args.gen_eval_every = args.probe_batches = 2
        args.batch, args.gen_batch, args.pretrain_batch, args.gen_len, args.gen_targets = 8, 8, 8, 64, 8
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    if args.quick and args.variants == parse_args([]).variants:
        variants = ["full", "middle", "front+middle+back", "front+back"]
    start = time.perf_counter()
    pairs_kept = fitting_pairs_dir(args.pair_len)
    log(f"translation_match pairs that fit {args.pair_len} tokens: {pairs_kept}")
    base = pre.small_config(args.d_model, args.layers, init_std=args.init_std)
    backbone, backbone_info = backbone_params(base, args)
    init_rms = embedding_rms(backbone)
    if args.prompt_lr is None:
        args.prompt_lr = round(LESTER_RELATIVE_LR * init_rms, 5)
    log(f"prompt learning rate {args.prompt_lr:g} (embedding RMS {init_rms:.4f}), full fine-tuning {args.full_lr:g}")
    runs, chance, probe = [], {}, None
    for task in tasks:
        data = task_data(task, args)
        chance[task] = data["chance"]
        log(f"{task}: {len(data['train'])} training batches, chance {data['chance']}")
        if task == PAIR_TASK and args.probe_batches:
            probe = frozen_probe(backbone, base, data, args)
        for variant in (v for v in variants if v in ("full",) + (PLACEMENTS if task == PAIR_TASK else GEN_PLACEMENTS)):
            config = base.replace(dropout_rate=args.dropout if task == PAIR_TASK else args.gen_dropout)
            runs.append(tune(backbone, config, task, variant, data, args))
    name = args.name or ("prompt_tuning_quick" if args.quick else "prompt_tuning")  # a quick run is no result
    plot_path = RESULTS_DIR / f"{name}.png"
    plot(runs, chance, plot_path)
    keys = ("learning_rate", "initial_metric", "best_metric", "final_metric", "initial_loss", "best_loss",
            "beats_chance", "steps_to_converge",
            "trained_parameters", "seconds_per_step")
    table = {task: {r["variant"]: {k: r[k] for k in keys} for r in runs if r["task"] == task} for task in tasks}
    report = {"benchmark": "prompt_tuning", "quick": args.quick,
              "what": "full fine-tuning vs prompt tuning at each placement from one backbone pre-trained here; "
                      "pair task: rank-classification accuracy; generation task: ROUGE-L F1 (%) of greedy outputs; "
                      f"steps_to_converge: first evaluation within {100 - 100 * CONVERGED_FRACTION:g}% of the arm's best",
              "settings": vars(args), "backbone": backbone_info, "prompt_init_rms": round(init_rms, 4),
              "pairs_kept": pairs_kept, "chance": chance, "frozen_encoder_probe": probe, "table": table}
    pair = table.get(PAIR_TASK, {})
    if all(v in pair for v in ("front", "middle", "back")):
        report["pair_task"] = pair_summary(pair, chance[PAIR_TASK]["standard_error"])
    report.update(paper_lcqmc={"front": 88.38, "back": 88.50, "middle": 89.20, "front+middle+back": 90.65},
                  plot=str(plot_path), runs=runs, seconds=round(time.perf_counter() - start, 1),
                  machine=machine_info())
    return write_report(report, RESULTS_DIR / f"{name}.json")


if __name__ == "__main__":
    main()
