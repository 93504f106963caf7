"""`cpm2 train`: the training binary (same flags as `python -m cpm2_jax.train`)."""
from __future__ import annotations


def register(subparsers) -> None:
    from cpm2_jax import train

    p = subparsers.add_parser(
        "train", help="pre-train or fine-tune a model with gin files (t5x-style)",
        description="Trains with --gin_file model and run files (gin/runs/pretrain.gin, finetune.gin); "
                    "set the run file's REQUIRED macros with --gin.NAME=value. Restarting with the same "
                    "MODEL_DIR resumes from its latest checkpoint.")
    train.add_flags(p)
    p.set_defaults(func=lambda args: train.run(args))
