"""`cpm2 teacher-topk`: write a teacher's top-k outputs over the training batches
(cpm2_jax.inheritance.topk), for knowledge inheritance from a teacher too large to run in
the student's step. Gin flags as `cpm2 train`, plus runs/teacher_topk.gin."""
from __future__ import annotations


def register(subparsers) -> None:
    from cpm2_jax import gin_utils

    p = subparsers.add_parser("teacher-topk", help="precompute a teacher's top-k logits for knowledge inheritance",
                              description="Runs the teacher over TRAIN_STEPS training batches and writes its top-k "
                                          "logits per target position, keyed by example (gin/runs/teacher_topk.gin).")
    gin_utils.add_gin_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    import gin

    from cpm2_jax import checkpoints, datasets, gin_utils  # noqa: F401 - register their configurables
    from cpm2_jax.inheritance import schedule  # noqa: F401
    from cpm2_jax.inheritance.topk import write_teacher_outputs
    from cpm2_jax.train import configurable_train

    configurable_train()  # the run files bind cpm2_jax.train.train too
    entry = gin_utils.register_once(write_teacher_outputs, "write_teacher_outputs", "cpm2_jax.inheritance")
    try:
        gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
        gin_utils.check_required_macros("teacher-topk")
        summary = gin_utils.call_configured(entry)
    finally:
        gin.clear_config()
    print(json.dumps(summary))
    return 0
