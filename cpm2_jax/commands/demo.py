"""`cpm2 demo` (`make demo`): pre-train a small CPM-2 with span corruption on the embedded
default corpus, evaluate it, and decode a few validation inputs from the trained checkpoint.

Everything lands in one directory that the demo prints: checkpoints, TensorBoard logs,
metrics.jsonl, the loss curve (loss_curve.png) and the decoded samples (samples.jsonl).
"""
from __future__ import annotations

import gc
import json
import pathlib
import sys
import tempfile
import time

TASK = "cpm2_pretrain_bilingual"  # span corruption, Chinese:English 2:1 (CPM2_FACTS "Knowledge inheritance")
LENGTHS = {"inputs": 64, "targets": 16}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="pre-train a small CPM-2 on the built-in corpus, then decode",
                              description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default=None, help="where to write the run (default: a new folder under /tmp)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default 1000: about 2 minutes on 2 cores)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="validation inputs to decode at the end")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def demo_model_config(vocab_size: int):
    """The `tiny` layout, wider (d_model 128, 4x32 heads), with room for the vocabulary."""
    from cpm2_jax.config import get_config

    rounded = -(-vocab_size // 128) * 128
    return get_config("tiny").replace(vocab_size=rounded, d_model=128, d_ff=256, num_heads=4, head_dim=32)


def plot_losses(metrics_file: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """loss_curve.png: training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, validation = {}, {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        (train if record["split"] == "train" else validation)[record["step"]] = record["loss"]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss", linewidth=1)
    axis.plot(sorted(validation), [validation[s] for s in sorted(validation)], "o-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy per target token (nats)")
    axis.set_title("CPM-2 demo: span-corruption pre-training")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def _say(text: str = "") -> None:
    print(text, flush=True)


def run(args) -> int:
    import jax
    import numpy as np

    from cpm2_jax import checkpoints as ckpt_lib
    from cpm2_jax import decoding
    from cpm2_jax.checkpoints import CheckpointConfig
    from cpm2_jax.datasets import DatasetConfig, get_dataset
    from cpm2_jax.optim import OptimizerConfig
    from cpm2_jax.tasks import demo_corpus, settings
    from cpm2_jax.train import build_mesh, train
    from cpm2_jax.trainer import Trainer, TrainerConfig
    from cpm2_jax.train_state import param_count

    started = time.time()
    out = pathlib.Path(args.output_dir or tempfile.mkdtemp(prefix="cpm2_demo_")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    corpus_dir = demo_corpus.prepare()
    settings.set_data_dir(corpus_dir)
    vocabulary = settings.resolved_vocabulary()
    config = demo_model_config(vocabulary.vocab_size)
    mesh_shape = {"data": jax.device_count()}
    trainer_cfg = TrainerConfig(optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=50))
    abstract = Trainer(config, trainer_cfg, build_mesh(mesh_shape))
    n_params = param_count(abstract.abstract_params())

    _say(f"cpm2 demo: output directory {out}")
    _say(f"  corpus      {corpus_dir} (gettext English->Chinese catalogs of this machine, in documents of 20 messages; see tasks/demo_corpus.py)")
    _say(f"  vocabulary  {settings.vocabulary_path()} ({vocabulary.vocab_size} ids incl. sentinels)")
    _say(f"  model       CPM-2 layout, {config.num_encoder_layers}+{config.num_decoder_layers} layers, d_model "
         f"{config.d_model}, {n_params:,} parameters")
    _say(f"  task        {TASK}: span corruption (noise 0.15, mean span 3), inputs {LENGTHS['inputs']} / "
         f"targets {LENGTHS['targets']} tokens, batch {args.batch_size}, {args.steps} steps")
    _say(f"  TensorBoard tensorboard --logdir {out}")
    _say()

    train_cfg = DatasetConfig(TASK, LENGTHS, split="train", batch_size=args.batch_size, seed=0)
    eval_cfg = DatasetConfig(TASK, LENGTHS, split="validation", batch_size=args.batch_size, shuffle=False)
    period = max(args.steps // 4, 1)
    summary = train(model_config=config, train_dataset_cfg=train_cfg, eval_dataset_cfg=eval_cfg, model_dir=str(out),
                    train_steps=args.steps, trainer_cfg=trainer_cfg, eval_period=period, eval_steps=8,
                    checkpoint_cfg=CheckpointConfig(period=period, keep=2), mesh_shape=mesh_shape, log_period=10,
                    progress=not args.no_progress)
    curve = plot_losses(out / "metrics.jsonl", out / "loss_curve.png")

    # Decode a few validation inputs with the trained checkpoint (greedy, KV-cached).
    params, _ = ckpt_lib.restore_partial(summary["checkpoint"], abstract.abstract_params(),
                                         lambda: None, fallback_to_scratch=False)
    source = get_dataset(DatasetConfig(TASK, LENGTHS, split="validation", batch_size=args.samples, shuffle=False,
                                       pack=False))
    batch = next(source)
    del source
    gc.collect()  # release the tf.data iterator now, not during interpreter shutdown (it can hang there)
    decoded = decoding.greedy(params, batch["encoder_input_tokens"], config=config, max_new_tokens=LENGTHS["targets"])
    predictions = np.asarray(jax.device_get(decoded.tokens))

    def text(ids) -> str:
        ids = [int(i) for i in ids if int(i) > 0]
        if vocabulary.eos_id in ids:
            ids = ids[:ids.index(vocabulary.eos_id)]
        return vocabulary.decode(ids)

    samples = []
    _say()
    _say("Decoded validation examples (span corruption: the model fills in the masked spans):")
    for row in range(predictions.shape[0]):
        sample = {"input": text(batch["encoder_input_tokens"][row]),
                  "target": text(batch["decoder_target_tokens"][row]),
                  "prediction": text(predictions[row])}
        samples.append(sample)
        shown = {k: v.replace("\n", " ⏎ ") for k, v in sample.items()}
        _say(f"  [{row}] input      {shown['input'][:200]}")
        _say(f"      target     {shown['target']}")
        _say(f"      prediction {shown['prediction']}")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")

    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    validation = summary["validation"]
    _say()
    _say(f"Done in {time.time() - started:.0f} s.")
    _say(f"  train loss       {first['loss']:.3f} at step 1 -> {summary['train']['loss']:.3f} "
         f"at step {summary['step']}")
    _say(f"  validation loss  {validation.get('loss', float('nan')):.3f}, token accuracy "
         f"{validation.get('accuracy', float('nan')):.3f}")
    _say(f"  checkpoint       {summary['checkpoint']}")
    _say(f"  loss curve       {curve}")
    _say(f"  samples          {out / 'samples.jsonl'}")
    _say(f"  metrics          {out / 'metrics.jsonl'} (TensorBoard: {out}/train, {out}/validation)")
    return 0 if validation.get("loss", float("inf")) < first["loss"] else _fail(first, validation)


def _fail(first, validation) -> int:
    print(f"cpm2 demo: validation loss {validation.get('loss')} did not fall below the first training loss "
          f"{first['loss']}", file=sys.stderr)
    return 1
