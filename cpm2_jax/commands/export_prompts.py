"""`cpm2 convert to-prompts`: a prompt-tuned checkpoint's prompts as prompt files.

    cpm2 convert to-prompts CKPT OUT_DIR [--task_names a,b] [--overwrite]

One `<task>.prompt.npz` per row of the prompt table (placement, mask and the backbone's
fingerprint inside), for `cpm2 infer --prompt FILE`. Task names default to the tasks of the
mixture the checkpoint was trained on (its recorded `train_dataset`), in seqio's order, as
training assigned the rows. `cpm2 train` writes the same files to `<MODEL_DIR>/prompts/` at
the end of a one-process run.
"""
from __future__ import annotations

import json


def register(subparsers) -> None:
    from cpm2_jax.commands.convert import add_output_args

    p = subparsers.add_parser("to-prompts", help="prompt-tuned checkpoint -> one prompt file per task",
                              description="Writes <OUT_DIR>/<task>.prompt.npz for each row of the checkpoint's "
                                          "prompt table, read by `cpm2 infer --prompt`.")
    p.add_argument("ckpt", help="a prompt-tuned checkpoint (run, step folder or exported directory)")
    add_output_args(p)
    p.add_argument("--task_names", default=None,
                   help="comma-separated file names, one per prompt row (default: the trained mixture's tasks)")
    p.set_defaults(func=run)


def run(args) -> int:
    from cpm2_jax.checkpoints import layout
    from cpm2_jax.convert.atomic import check_writable
    from cpm2_jax.errors import ConfigError
    from cpm2_jax.infer import load_checkpoint
    from cpm2_jax.prompts.files import save_run_prompts

    check_writable(args.out_dir, args.overwrite)
    step_dir = layout.resolve(args.ckpt)
    params, config = load_checkpoint(args.ckpt)
    if config.prompt is None:
        raise ConfigError(f"checkpoint {args.ckpt!r} has no prompt table (its model config has no prompt)")
    rows = config.prompt.num_tasks
    if args.task_names:
        names = [n.strip() for n in args.task_names.split(",")]
        if len(names) != rows or not all(names):
            raise ConfigError(f"--task_names gives {len(names)} names; the prompt table has {rows} row(s)")
        mixture = None
    else:
        names, mixture = None, (layout.read_record(step_dir).get("train_dataset") or {}).get("mixture_or_task_name")
    paths = save_run_prompts(params, config, args.out_dir, mixture, names=names, overwrite=args.overwrite)
    print(json.dumps({"conversion": "to-prompts", "source": str(step_dir), "output": str(args.out_dir),
                      "files": [str(p) for p in paths], "prompt_length": config.prompt.length}))
    return 0
