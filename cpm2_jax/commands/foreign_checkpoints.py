"""`cpm2 convert from-cpm2 / to-cpm2 / from-t5x`: the original CPM-2 release and t5x checkpoints.

    cpm2 convert from-cpm2 RELEASE_DIR VOCAB_TXT OUT_DIR [--dtype float32|bfloat16]
    cpm2 convert to-cpm2 CKPT OUT_DIR [--vocab VOCAB_TXT] [--mp 4] [--iteration 0]
    cpm2 convert from-t5x T5X_CHECKPOINT_DIR OUT_DIR [--vocabulary spm.model] [--dtype ...]

RELEASE_DIR holds `mp_rank_XX_model_states.pt` (dense) or `mp_rank_XX_YY_model_states.pt`
(MoE) files, or their parent with `latest_checkpointed_iteration.txt`
(cpm2_jax.convert.cpm2_release). OUT_DIR is a checkpoint of this project, recording the
vocabulary. torch is needed for the CPM-2 release only.
"""
from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    from cpm2_jax.commands.convert import add_output_args

    p = subparsers.add_parser("from-cpm2", help="original CPM-2 release (PyTorch model-parallel shards) -> checkpoint",
                              description="Reads the release's fp16 model-parallel shards (dense or MoE) with "
                                          "torch.load(weights_only=True) and an allow-list, shard by shard, and "
                                          "its vocab.txt (embedding rows permuted to the project's sentinel layout).")
    p.add_argument("release_dir", help="directory of mp_rank_*_model_states.pt files (or its parent with "
                                       "latest_checkpointed_iteration.txt)")
    p.add_argument("vocab", help="the release's vocab.txt (bpe_cn/vocab.txt or bpe_cn_en/vocab.txt)")
    add_output_args(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter storage dtype (the release is fp16; both hold it exactly); default float32")
    p.set_defaults(func=run_from_cpm2)

    p = subparsers.add_parser("to-cpm2", help="checkpoint -> original CPM-2 release layout (fp16 shards)",
                              description="Writes the release's model-parallel fp16 shards, the tracker file "
                                          "and vocab.txt, loadable by the release's code.")
    p.add_argument("ckpt", help="a checkpoint (a run, step folder or converted directory)")
    add_output_args(p)
    p.add_argument("--vocab", default=None, help="vocab.txt (default: the one saved in the checkpoint)")
    p.add_argument("--mp", type=int, default=4, help="model-parallel ranks to split into (the release: 4)")
    p.add_argument("--iteration", type=int, default=0, help="iteration number of the written directory")
    p.set_defaults(func=run_to_cpm2)

    p = subparsers.add_parser("from-t5x", help="t5x checkpoint directory (T5 1.1 / mT5) -> checkpoint",
                              description="Reads the msgpack `checkpoint` file and its TensorStore (zarr) arrays, "
                                          "one at a time; the config is inferred from the shapes.")
    p.add_argument("t5x_dir", help="a t5x checkpoint_N directory (with its `checkpoint` file)")
    add_output_args(p)
    p.add_argument("--vocabulary", default=None, help="vocabulary file (sentencepiece .model) saved with the checkpoint")
    p.add_argument("--extra_ids", type=int, default=100, help="sentinels on top of --vocabulary's pieces")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter storage dtype")
    p.set_defaults(func=run_from_t5x)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_from_cpm2(args) -> int:
    from cpm2_jax.train_state import param_count
    import pathlib

    from cpm2_jax.checkpoints import VocabularySpec, save_params
    from cpm2_jax.convert.atomic import check_writable
    from cpm2_jax.convert.cpm2_release import read_release
    from cpm2_jax.errors import ConfigError

    check_writable(args.out_dir, args.overwrite)
    vocab = pathlib.Path(args.vocab).expanduser().absolute()
    if not vocab.is_file():
        raise ConfigError(f"vocab.txt {str(vocab)!r} does not exist")
    params, config = read_release(args.release_dir, vocab, param_dtype=args.dtype, progress=_progress)
    spec = VocabularySpec(vocab, 0)
    save_params(params, config, args.out_dir, overwrite=args.overwrite, vocabulary=spec)
    print(json.dumps({"conversion": "from-cpm2", "source": str(args.release_dir), "output": str(args.out_dir),
                      "vocab_size": config.vocab_size, "num_experts": config.num_experts,
                      "parameters": param_count(params), "param_dtype": config.param_dtype}))
    return 0


def run_to_cpm2(args) -> int:
    from cpm2_jax.train_state import param_count
    import pathlib

    from cpm2_jax.checkpoints import layout, load_params
    from cpm2_jax.convert.atomic import check_writable
    from cpm2_jax.convert.cpm2_release import check_release_config, write_release
    from cpm2_jax.errors import ConfigError

    check_writable(args.out_dir, args.overwrite)
    step = layout.resolve(args.ckpt)
    config = layout.saved_model_config(step)
    if config is None:
        raise ConfigError(f"checkpoint {args.ckpt!r} records no model config")
    check_release_config(config)
    if args.vocab:
        vocab = pathlib.Path(args.vocab).expanduser()
    else:
        spec = layout.saved_vocabulary(step)
        if spec is None or spec.path.suffix == ".model":
            raise ConfigError(f"checkpoint {args.ckpt!r} records no vocab.txt; name the release's with --vocab")
        vocab = spec.path
    if not vocab.is_file():
        raise ConfigError(f"--vocab {str(vocab)!r} does not exist")
    params, config = load_params(step, config.replace(scan_layers=False))
    write_release(params, config, vocab, args.out_dir, mp=args.mp, iteration=args.iteration,
                  overwrite=args.overwrite, progress=_progress)
    print(json.dumps({"conversion": "to-cpm2", "source": str(args.ckpt), "output": str(args.out_dir), "mp": args.mp,
                      "num_experts": config.num_experts, "parameters": param_count(params)}))
    return 0


def run_from_t5x(args) -> int:
    from cpm2_jax.train_state import param_count
    from cpm2_jax.checkpoints import save_params
    from cpm2_jax.commands.convert import vocabulary_arg
    from cpm2_jax.convert.atomic import check_writable
    from cpm2_jax.convert.t5x import describe, load_t5x_checkpoint
    from cpm2_jax.errors import ConfigError

    check_writable(args.out_dir, args.overwrite)
    vocabulary = vocabulary_arg(args.vocabulary, args.extra_ids)
    params, config = load_t5x_checkpoint(args.t5x_dir, param_dtype=args.dtype)
    if vocabulary is not None and vocabulary.load().vocab_size > config.vocab_size:
        raise ConfigError(f"--vocabulary has {vocabulary.load().vocab_size} ids, more than the model's "
                          f"vocab_size {config.vocab_size}")
    save_params(params, config, args.out_dir, overwrite=args.overwrite, vocabulary=vocabulary)
    print(json.dumps({"conversion": "from-t5x", "output": str(args.out_dir), "parameters": param_count(params),
                      **describe(config, str(args.t5x_dir))}))
    return 0
