"""`cpm2 convert`: checkpoint conversions, one nested sub-command each.

    cpm2 convert from-hf HF_DIR OUT_DIR [--scan_layers] [--dtype float32|bfloat16]
    cpm2 convert to-hf CKPT_DIR OUT_DIR [--dtype float32|bfloat16|float16]

OUT_DIR of `from-hf` is a checkpoint in the project's one format (a params-only step
directory: `state/`, `config/` with the model config, `vocabulary/` with `--vocabulary`), read
by `cpm2 train` (restore_from), `eval`, `infer` and the other conversions; `from-hf` picks the
converter from config.json's `model_type` (mt5 / t5 v1.1, switch_transformers); `to-hf` reads
any checkpoint (a run, a step, a converted directory) and writes an MT5 directory, or a
SwitchTransformers one for an MoE checkpoint. Other conversions
(the MoE issue's `dense-to-moe`) add a module to `_CONVERSION_MODULES`, each defining
`register(convert_subparsers)`.
"""
from __future__ import annotations

import importlib
import json

# Modules adding more `cpm2 convert X` sub-commands; each defines `register(subparsers)`.
_CONVERSION_MODULES: list[str] = ["cpm2_jax.commands.dense_to_moe", "cpm2_jax.commands.extend_vocab",
                                   "cpm2_jax.commands.foreign_checkpoints", "cpm2_jax.commands.export_prompts"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints (transformers MT5 / Switch <-> cpm2_jax)",
                                   description="Checkpoint conversions between transformers' "
                                               "MT5ForConditionalGeneration or "
                                               "SwitchTransformersForConditionalGeneration and this project's params.")
    sub = parser.add_subparsers(dest="conversion", metavar="CONVERSION")
    sub.required = True

    p = sub.add_parser("from-hf", help="transformers MT5 / Switch directory -> cpm2_jax checkpoint",
                       description="Reads config.json (its model_type picks the converter) + safetensors "
                                   "(or pytorch_model.bin with weights_only=True) and writes "
                                   "model_config.json + orbax params.")
    p.add_argument("hf_dir", help="transformers directory (config.json and model weights)")
    add_output_args(p)
    p.add_argument("--scan_layers", action="store_true", help="stack layers for nn.scan (scan_layers=True)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter storage dtype (ModelConfig.param_dtype); default float32")
    p.add_argument("--vocabulary", default=None,
                   help="vocabulary file (sentencepiece .model or vocab.txt) saved with the checkpoint")
    p.add_argument("--extra_ids", type=int, default=100, help="sentinels on top of --vocabulary's pieces")
    p.set_defaults(func=run_from_hf)

    p = sub.add_parser("to-hf", help="cpm2_jax checkpoint -> transformers MT5 / Switch directory",
                       description="Writes config.json + model.safetensors loadable by "
                                   "MT5ForConditionalGeneration.from_pretrained (dense) or "
                                   "SwitchTransformersForConditionalGeneration.from_pretrained (MoE).")
    p.add_argument("ckpt_dir", help="a checkpoint: `cpm2 train` run (latest step), step folder or converted directory")
    add_output_args(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written tensors; default: the checkpoint's")
    p.add_argument("--max_shard_bytes", type=int, default=None,
                   help="split model.safetensors into shards of at most this many bytes (with an index)")
    p.set_defaults(func=run_to_hf)

    for name in _CONVERSION_MODULES:
        importlib.import_module(name).register(sub)


def _report(**fields) -> None:
    print(json.dumps(fields))


def add_output_args(p) -> None:
    """OUT_DIR and --overwrite, as every conversion writes its result (all-or-nothing)."""
    p.add_argument("out_dir", help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


def _count(params) -> int:
    from cpm2_jax.train_state import param_count

    return param_count(params)


def vocabulary_arg(path, extra_ids: int):
    """The `--vocabulary` file as a checkpoint VocabularySpec (None without one), checked to load."""
    import pathlib

    from cpm2_jax.checkpoints import VocabularySpec
    from cpm2_jax.errors import ConfigError

    if path is None:
        return None
    spec = VocabularySpec(pathlib.Path(path).expanduser().absolute(), extra_ids)
    if not spec.path.is_file():
        raise ConfigError(f"--vocabulary {str(spec.path)!r} does not exist")
    spec.load()
    return spec


def run_from_hf(args) -> int:
    from cpm2_jax.convert import hf_converter
    from cpm2_jax.convert.atomic import check_writable
    from cpm2_jax.checkpoints import save_params
    from cpm2_jax.convert.hf_checkpoint import read_hf_config
    from cpm2_jax.errors import ConfigError

    check_writable(args.out_dir, args.overwrite)  # fail before the (possibly long) read
    vocabulary = vocabulary_arg(args.vocabulary, args.extra_ids)
    model_type = read_hf_config(args.hf_dir).get("model_type", "mt5")
    converter = hf_converter(model_type)
    params, config = converter.load_hf_checkpoint(args.hf_dir, scan_layers=args.scan_layers, param_dtype=args.dtype)
    if vocabulary is not None and vocabulary.load().vocab_size > config.vocab_size:
        raise ConfigError(f"--vocabulary has {vocabulary.load().vocab_size} ids, more than the model's "
                          f"vocab_size {config.vocab_size}")
    save_params(params, config, args.out_dir, overwrite=args.overwrite, vocabulary=vocabulary)
    _report(conversion="from-hf", source=str(args.hf_dir), output=str(args.out_dir), model_type=model_type,
            parameters=_count(params), param_dtype=config.param_dtype, scan_layers=config.scan_layers)
    return 0


def run_to_hf(args) -> int:
    from cpm2_jax.convert import hf_converter_for
    from cpm2_jax.convert.atomic import check_writable
    from cpm2_jax.checkpoints import load_params
    from cpm2_jax.errors import ConfigError

    if args.max_shard_bytes is not None and args.max_shard_bytes <= 0:
        raise ConfigError(f"--max_shard_bytes must be positive, got {args.max_shard_bytes}")
    check_writable(args.out_dir, args.overwrite)
    params, config = load_params(args.ckpt_dir)
    converter = hf_converter_for(config)
    converter.save_hf_checkpoint(params, config, args.out_dir, overwrite=args.overwrite, dtype=args.dtype,
                                 max_shard_bytes=args.max_shard_bytes)
    _report(conversion="to-hf", model_type=converter.config_to_hf(config)["model_type"], source=str(args.ckpt_dir),
            output=str(args.out_dir), parameters=_count(params),
            dtype=args.dtype or config.param_dtype)
    return 0
