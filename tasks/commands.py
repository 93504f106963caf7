"""`cpm2 data ...` and `cpm2 vocab ...`: look at what the model sees; build a vocabulary.

    cpm2 data list
    cpm2 data show TASK [--split validation] [-n 3] [--inputs-length 512 --targets-length 256]
    cpm2 data demo-corpus [--dir DIR]
    cpm2 vocab train --input FILE [FILE ...] --output PREFIX [--vocab-size 8000] [--field text]

Heavy imports (TensorFlow, seqio) happen inside the commands, so `cpm2 --help` stays fast.
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib

from cpm2_jax.errors import ConfigError, DataError


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect SeqIO tasks and prepare data")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True

    show = data_sub.add_parser("show", help="print decoded examples of a task after preprocessing")
    show.add_argument("task", help="task or mixture name (see `cpm2 data list`)")
    show.add_argument("--split", default="validation")
    show.add_argument("-n", type=int, default=3, help="number of examples")
    show.add_argument("--inputs-length", type=int, default=512)
    show.add_argument("--targets-length", type=int, default=256)
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(func=show_command)

    listing = data_sub.add_parser("list", help="list registered tasks and mixtures")
    listing.set_defaults(func=list_command)

    demo = data_sub.add_parser("demo-corpus", help="build the demo corpus from local gettext catalogs")
    demo.add_argument("--dir", default=None, help="output directory (default: the user cache)")
    demo.set_defaults(func=demo_corpus_command)

    vocab = subparsers.add_parser("vocab", help="build CPM-2 vocabularies")
    vocab_sub = vocab.add_subparsers(dest="vocab_command", metavar="ACTION")
    vocab_sub.required = True
    train = vocab_sub.add_parser("train", help="train a jieba + sentencepiece vocabulary")
    train.add_argument("--input", nargs="+", required=True, help="JSON Lines (see --field) or text files")
    train.add_argument("--output", required=True, help="model prefix; writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece pieces (sentinels extra)")
    train.add_argument("--field", default="text", help="JSON Lines field holding the text")
    train.add_argument("--max-chars", type=int, default=50_000_000, help="stop reading after this many chars")
    train.add_argument("--character-coverage", type=float, default=0.9995)
    train.set_defaults(func=vocab_train_command)


def show_command(args: argparse.Namespace) -> int:
    import tensorflow as tf

    from cpm2_jax.tasks import pipeline, settings

    if args.n < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n}")
    provider = pipeline.get_provider(args.task)
    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    vocabulary = settings.default_vocabulary()
    dataset = pipeline.task_dataset(provider, args.split, lengths, seed=args.seed, shuffle=False, num_epochs=1)
    try:
        for index, example in enumerate(itertools.islice(dataset.as_numpy_iterator(), args.n)):
            print(f"--- {args.task} [{args.split}] example {index}")
            for key in ("inputs", "targets"):
                ids = example[key]
                flag = " (truncated)" if example.get(f"{key}_truncated", 0) else ""
                print(f"{key} ({len(ids)} tokens{flag}): {vocabulary.decode(ids.tolist())}")
    except tf.errors.OpError as err:
        raise pipeline.data_error_from(err) from None
    return 0


def list_command(args: argparse.Namespace) -> int:
    from cpm2_jax.tasks import registry

    del args
    for name in registry.task_names():
        print(name)
    return 0


def demo_corpus_command(args: argparse.Namespace) -> int:
    from cpm2_jax.tasks import demo_corpus

    directory = demo_corpus.prepare(args.dir)
    print(directory)
    return 0


def _texts(paths: list[str], field: str, max_chars: int):
    budget = max_chars
    for name in paths:
        path = pathlib.Path(name)
        if not path.is_file():
            raise DataError(f"vocab train: input file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if path.suffix in (".jsonl", ".json"):
                    try:
                        text = json.loads(line)[field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"vocab train: {path}:{number}: no JSON field {field!r}") from None
                else:
                    text = line.rstrip("\n")
                yield text
                budget -= len(text)
                if budget <= 0:
                    return


def vocab_train_command(args: argparse.Namespace) -> int:
    from cpm2_jax.tasks import vocabulary

    if args.vocab_size < 300:
        raise ConfigError(f"--vocab-size must be at least 300 (byte pieces alone take 256), got {args.vocab_size}")
    model = vocabulary.train_sentencepiece(_texts(args.input, args.field, args.max_chars), args.output,
                                           vocab_size=args.vocab_size, character_coverage=args.character_coverage)
    vocab = vocabulary.SentencePieceVocabulary(model)
    print(f"{model}: {vocab.vocab_size} ids ({vocab.vocab_size - vocab.extra_ids} pieces + "
          f"{vocab.extra_ids} sentinels); use it with CPM2_VOCAB={model}")
    return 0
