"""`cpm2 eval`: the evaluation binary (same flags as `python -m cpm2_jax.eval`)."""
from __future__ import annotations


def register(subparsers) -> None:
    from cpm2_jax import eval as eval_bin

    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on every task of a SeqIO mixture (seqio metrics)",
        description="Runs the seqio evaluator of each task in MIXTURE_OR_TASK_NAME against CHECKPOINT_PATH "
                    "(gin/runs/eval.gin) and writes per-task metrics JSON and TensorBoard logs to EVAL_OUTPUT_DIR.")
    eval_bin.add_flags(p)
    p.set_defaults(func=lambda args: eval_bin.run(args))
