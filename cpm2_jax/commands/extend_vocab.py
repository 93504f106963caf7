"""`cpm2 convert extend-vocab`: a checkpoint for a larger vocabulary (cpm2_jax.convert.extend_vocab).

    cpm2 convert extend-vocab CKPT NEW_VOCAB OUT [--old_vocab OLD_VOCAB] [--vocab_size N] [--seed 0]

OLD_VOCAB defaults to the vocabulary saved in CKPT. OUT records NEW_VOCAB as its vocabulary.
"""
from __future__ import annotations

import json


def register(subparsers) -> None:
    from cpm2_jax.commands.convert import add_output_args

    p = subparsers.add_parser("extend-vocab", help="checkpoint -> checkpoint for a larger vocabulary (Chinese -> "
                                                   "bilingual)",
                              description="Every existing embedding/output row kept at its piece's new id (sentinels "
                                          "to the new end); new rows start from their longest known prefix, else "
                                          "a random existing row.")
    p.add_argument("ckpt", help="checkpoint to extend (any checkpoint of this project)")
    p.add_argument("new_vocab", help="the larger vocabulary (CPM-2 vocab.txt or sentencepiece .model)")
    add_output_args(p)
    p.add_argument("--old_vocab", default=None, help="the checkpoint's vocabulary (default: the one saved in it)")
    p.add_argument("--extra_ids", type=int, default=100,
                   help="sentinels on top of a sentencepiece .model (a vocab.txt names its own); default 100")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="rows of the new embedding (default: the new vocabulary's size; more pads with random rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rows")
    p.set_defaults(func=run)


def _old_vocabulary(args):
    from cpm2_jax.errors import ConfigError
    from cpm2_jax.tasks.vocabulary import load_vocabulary

    if args.old_vocab:
        return load_vocabulary(args.old_vocab, extra_ids=args.extra_ids)
    from cpm2_jax.checkpoints import layout

    spec = layout.saved_vocabulary(layout.resolve(args.ckpt))
    if spec is None:
        raise ConfigError(f"checkpoint {args.ckpt!r} records no vocabulary; name it with --old_vocab")
    return spec.load()


def run(args) -> int:
    import pathlib

    from cpm2_jax.checkpoints.layout import VocabularySpec
    from cpm2_jax.convert.atomic import check_writable
    from cpm2_jax.convert.extend_vocab import extend_params, plan_extension
    from cpm2_jax.convert.native import save_params
    from cpm2_jax.errors import ConfigError
    from cpm2_jax.infer import load_checkpoint
    from cpm2_jax.tasks.vocabulary import load_vocabulary

    check_writable(args.out_dir, args.overwrite)
    params, config = load_checkpoint(args.ckpt)
    old = _old_vocabulary(args)
    new = load_vocabulary(args.new_vocab, extra_ids=args.extra_ids)
    rows = new.vocab_size if args.vocab_size is None else args.vocab_size
    if rows <= 0:
        raise ConfigError(f"--vocab_size must be positive, got {rows}")
    plan = plan_extension(old.pieces(), new.pieces(), old.extra_ids, new.extra_ids, new_rows=rows, seed=args.seed)
    params, new_config = extend_params(params, config, plan)
    save_params(params, new_config, args.out_dir, overwrite=args.overwrite,
                vocabulary=VocabularySpec(pathlib.Path(args.new_vocab).absolute(), args.extra_ids))
    print(json.dumps({"conversion": "extend-vocab", "source": str(args.ckpt), "output": str(args.out_dir),
                      "old_vocab_size": config.vocab_size, "new_vocab_size": rows, **plan.counts()}))
    return 0
