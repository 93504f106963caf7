"""The inference binary: `python -m cpm2_jax.infer` / `cpm2 infer`, t5x-style.

    cpm2 infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH="'/tmp/cpm2_run'" \\
        --gin.INPUT_FILE="'inputs.txt'" --gin.OUTPUT_FILE="'predictions.jsonl'" \\
        --gin.VOCABULARY="'vocab.txt'" --gin.infer.method="'beam'"

Inputs: one example a line, plain text or JSON Lines with an `inputs` field (text, or a list
of token ids used as given); a plain line of integers is read as ids too. `-` is stdin/stdout.
Text is tokenised with the vocabulary and gets EOS appended (as seqio does for inputs).
Output: JSON Lines with the inputs, `output_ids` (up to EOS), `output` text (with a
vocabulary) and `score`; other fields of a JSON input line are copied through. The output
file is written to a temp file and renamed, and never replaces an existing file unless
`overwrite`. Checkpoints: any reference `cpm2_jax.checkpoints` reads (a `cpm2 train` run, its
latest step; a step folder; a `cpm2 convert` directory), with the model config and the
vocabulary saved in it (flags override them).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Optional, Sequence, Union

import numpy as np

from cpm2_jax import gin_utils
from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import CheckpointError, ConfigError, DataError

MODES = ("predict", "score")
DEFAULT_GIN_FILE = "runs/infer.gin"


# ------------------------------------------------------------------------------ checkpoints

def load_checkpoint(path: Union[str, os.PathLike], model_config: Optional[ModelConfig] = None
                    ) -> tuple[dict, ModelConfig]:
    """(params as host arrays, config) of any checkpoint reference: a `cpm2 train` run
    (latest step), a step folder or a `cpm2 convert` directory.

    The config recorded in the checkpoint is used; `model_config` is needed only for a
    checkpoint that does not record one.
    """
    from cpm2_jax import checkpoints

    step_dir = checkpoints.resolve(path)
    return checkpoints.load_params(step_dir, checkpoints.saved_model_config(step_dir) or model_config)


def check_params(params, config: ModelConfig, source: str) -> None:
    """Raises CheckpointError naming every parameter whose shape differs from `config`'s model."""
    from cpm2_jax import param_paths
    from cpm2_jax.checkpoints import abstract_params, describe_mismatch

    def shapes(tree):
        return {k: tuple(v.shape) for k, v in param_paths.flatten(tree).items()}

    problems = describe_mismatch(shapes(abstract_params(config)), shapes(params))
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match its model config: " + "; ".join(problems))


# ------------------------------------------------------------------------------ inputs

def decode_utf8_lines(data: bytes, name: str) -> list[str]:
    """The lines of UTF-8 `data`; undecodable bytes are a DataError naming the input, the
    line and the byte offset (in the input and in the line)."""
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1)
        raise DataError(f"{name} line {line}: invalid UTF-8 byte 0x{data[err.start]:02x} at byte offset {err.start} "
                        f"(byte {column} of the line); the input must be UTF-8 text") from None


def _read_lines(path: str) -> tuple[str, list[str]]:
    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream without bytes underneath (already decoded)
            return "<stdin>", sys.stdin.read().splitlines()
        return "<stdin>", decode_utf8_lines(stream.read(), "<stdin>")
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"input file {str(p)!r} does not exist (--gin.INPUT_FILE)")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise DataError(f"input file {str(p)!r} cannot be read: {err.strerror or err} (--gin.INPUT_FILE)") from None
    return str(p), decode_utf8_lines(data, str(p))


def _as_ids(value: Any, where: str, field: str, vocabulary, vocab_size: int) -> list[int]:
    """Token ids of a text (tokenised, EOS appended) or of a list of ints (as given)."""
    if isinstance(value, str):
        if vocabulary is None:
            raise DataError(f"{where}: {field} is text but no vocabulary is set; pass --gin.VOCABULARY=\"'path'\" "
                            "(a vocab.txt or sentencepiece .model) or give token ids")
        ids = list(vocabulary.encode(value)) + [1]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        ids = list(value)
    else:
        raise DataError(f"{where}: {field} must be a string or a non-empty list of token ids, got {value!r:.60}")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise DataError(f"{where}: {field} has token id {bad[0]} outside the model vocabulary [0, {vocab_size})")
    if not any(t > 0 for t in ids):
        raise DataError(f"{where}: {field} is empty (only padding)")
    return ids


def read_examples(path: str, *, vocabulary, vocab_size: int, need_targets: bool) -> list[dict]:
    """Parsed examples: {"record", "input_ids", "target_ids"?}; blank lines are skipped."""
    name, lines = _read_lines(path)
    examples = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        where = f"{name} line {number}"
        if text.startswith("{"):
            try:
                record = json.loads(text)
            except ValueError as err:
                raise DataError(f"{where}: invalid JSON: {err}") from None
            if not isinstance(record, dict) or "inputs" not in record:
                raise DataError(f"{where}: a JSON line must be an object with an \"inputs\" field")
        elif all(tok.lstrip("-").isdigit() for tok in text.split()) and vocabulary is None:
            record = {"inputs": [int(tok) for tok in text.split()]}
        else:
            record = {"inputs": line}
        example = {"record": record, "where": where,
                   "input_ids": _as_ids(record["inputs"], where, "inputs", vocabulary, vocab_size)}
        if need_targets:
            if "targets" not in record:
                raise DataError(f"{where}: mode 'score' needs a JSON line with a \"targets\" field")
            example["target_ids"] = _as_ids(record["targets"], where, "targets", vocabulary, vocab_size)
        examples.append(example)
    if not examples:
        raise DataError(f"{name}: no inputs (every line is blank)")
    return examples


def _bucket(n: int, cap: int) -> int:
    """Padded length: the next power of two (at least 8), at most `cap` (fewer recompilations)."""
    size = 8
    while size < n:
        size *= 2
    return min(size, cap)


def _pad(rows: Sequence[Sequence[int]], batch: int, length: int) -> np.ndarray:
    out = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row[:length]
    return out


# ------------------------------------------------------------------------------ output

class _AtomicWriter:
    """Lines to `path` via a temp file renamed on success (stdout for '-')."""

    def __init__(self, path: str, overwrite: bool):
        self.path = path
        if path == "-":
            self._file, self._tmp = sys.stdout, None
            return
        target = pathlib.Path(path).expanduser().absolute()
        if target.is_dir():
            raise DataError(f"output path {str(target)!r} is a directory (--gin.OUTPUT_FILE)")
        if target.exists() and not overwrite:
            raise DataError(f"output file {str(target)!r} exists; pass --overwrite (or --gin.infer.overwrite=True) "
                            "to replace it")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        except OSError as err:  # a file in the way, a read-only folder
            raise DataError(f"output file {str(target)!r} cannot be written: {err.strerror or err} "
                            f"(--gin.OUTPUT_FILE)") from None
        self._target, self._tmp = target, pathlib.Path(tmp)
        self._file = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        if self._tmp is None:
            self._file.flush()
            return
        self._file.close()
        os.replace(self._tmp, self._target)

    def abort(self) -> None:
        if self._tmp is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def _place(params, config: ModelConfig, mesh_shape: Optional[dict], batch_size: int):
    """(params, a context to decode in, a function placing a [batch, length] array): with a
    mesh, the model's ModelSharding (params split by the partition rules, batches over the
    batch axes: what train and eval use); without, one device."""
    import contextlib

    import jax

    if not mesh_shape:
        return jax.device_put(params), contextlib.nullcontext, lambda array: array
    from cpm2_jax.partitioning import ModelSharding

    sharding = ModelSharding.for_shape(config, mesh_shape)
    if batch_size % sharding.data_parallel_size:
        raise ConfigError(f"infer: batch_size {batch_size} must be a multiple of the mesh's batch axes "
                          f"{'x'.join(sharding.batch_axes)} = {sharding.data_parallel_size} (--gin.infer.batch_size)")
    return (sharding.place_params(params), sharding.mesh_and_rules,
            lambda array: jax.device_put(array, sharding.batch_sharding))


# ------------------------------------------------------------------------------ the entry point

def infer(*, checkpoint_path: str, input_path: str = "-", output_path: str = "-", vocabulary_path: Optional[str] = None,
          model_config: Optional[ModelConfig] = None, mode: str = "predict", method: str = "greedy",
          max_new_tokens: int = 64, min_new_tokens: int = 0, num_beams: int = 4, length_penalty: float = 1.0,
          length_penalty_kind: str = "hf", early_stopping: Union[bool, str] = False, temperature: float = 1.0,
          top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8, max_input_length: int = 512,
          dtype: Optional[str] = None, scan_layers: Optional[bool] = None, mesh_shape: Optional[dict] = None,
          overwrite: bool = False, prompt_files: Sequence[str] = (), log=None) -> dict:
    """Decodes (mode 'predict') or scores given targets (mode 'score') every input line and
    writes JSON Lines; returns a summary (examples, generated tokens, seconds).

    The model config and the vocabulary are the checkpoint's; `vocabulary_path`, `dtype` and
    `scan_layers` override them (`model_config` only serves a checkpoint that records none).

    `mesh_shape` (e.g. {'data': 2, 'model': 4}): parameters split by the partition rules and
    batches by the `batch` rule over that mesh, for models that do not fit one device.

    `prompt_files` (`--prompt FILE`, repeatable): tuned prompts served by this backbone as
    tasks 0, 1, ... (each tuned on it: a prompt for another backbone is refused); a JSON input's
    `task` field (an index or the file's name, `lcqmc` for `lcqmc.prompt.npz`) picks each
    example's prompt and placement, task 0 when absent. A checkpoint trained with a prompt
    serves its own prompt table the same way.
    """
    import jax

    from cpm2_jax import decoding

    log = log or (lambda msg: print(msg, file=sys.stderr))
    for value, macro in ((checkpoint_path, "CHECKPOINT_PATH"), (input_path, "INPUT_FILE"),
                         (output_path, "OUTPUT_FILE")):
        if value is None or gin_utils.is_required(value):
            raise ConfigError(f"infer: {macro} is not set; pass --gin.{macro}=\"'...'\"")
    if mode not in MODES:
        raise ConfigError(f"infer: unknown mode {mode!r}; known: {', '.join(MODES)}")
    if method not in decoding.METHODS:
        raise ConfigError(f"infer: unknown method {method!r}; known: {', '.join(decoding.METHODS)}")
    if batch_size < 1 or max_new_tokens < 1 or max_input_length < 1:
        raise ConfigError("infer: batch_size, max_new_tokens and max_input_length must be >= 1")
    writer = _AtomicWriter(output_path, overwrite)  # refuse an existing output before any work
    try:
        from cpm2_jax import checkpoints

        step_dir = checkpoints.resolve(checkpoint_path)
        config = checkpoints.saved_model_config(step_dir) or model_config
        overrides = {k: v for k, v in (("dtype", dtype), ("scan_layers", scan_layers)) if v is not None}
        params, config = checkpoints.load_params(step_dir, config.replace(**overrides) if config else None)
        task_names = None
        if prompt_files:  # tuned prompts become the prompt table (each checked against this backbone)
            from cpm2_jax.prompts.serving import attach_prompts

            params, config, task_names = attach_prompts(params, config, list(prompt_files))
        vocabulary = None
        if vocabulary_path:
            from cpm2_jax.tasks.vocabulary import load_vocabulary

            vocabulary = load_vocabulary(vocabulary_path)
        else:
            saved = checkpoints.saved_vocabulary(step_dir)
            vocabulary = saved.load() if saved is not None else None
            if saved is not None:
                log(f"infer: vocabulary {saved.path} (saved with the checkpoint)")
        if vocabulary is not None and vocabulary.vocab_size > config.vocab_size:
            raise ConfigError(f"vocabulary {vocabulary_path or 'of the checkpoint'!r} has {vocabulary.vocab_size} "
                              f"ids, more than the model's {config.vocab_size}")
        examples = read_examples(input_path, vocabulary=vocabulary, vocab_size=config.vocab_size,
                                 need_targets=mode == "score")
        from cpm2_jax.prompts.serving import resolve_tasks

        tasks = resolve_tasks(examples, config.prompt, task_names)  # None without a prompt table
        params, on_mesh, place_batch = _place(params, config, mesh_shape, batch_size)
        weights = None
        if mode != "score":
            with on_mesh():  # the steps' weight layouts, once for every batch
                weights = decoding.prepare_decode_weights(params, config=config)
        start, generated, truncated = time.perf_counter(), 0, 0
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            longest = max(len(e["input_ids"]) for e in chunk)
            truncated += sum(len(e["input_ids"]) > max_input_length for e in chunk)
            enc = place_batch(_pad([e["input_ids"] for e in chunk], batch_size, _bucket(longest, max_input_length)))
            task_index = None if tasks is None else place_batch(_pad([tasks[first:first + batch_size]], 1, batch_size)[0])
            if mode == "score":
                targets = _pad([e["target_ids"] for e in chunk], batch_size,
                               _bucket(max(len(e["target_ids"]) for e in chunk), 1 << 30))
                with on_mesh():
                    token_scores, totals = jax.device_get(decoding.score(params, enc, targets, config=config,
                                                                         task_index=task_index))
                for i, e in enumerate(chunk):
                    n = len(e["target_ids"])
                    writer.write({**e["record"], "input_ids": e["input_ids"], "target_ids": e["target_ids"],
                                  "score": float(totals[i]), "token_scores": [float(s) for s in token_scores[i, :n]]})
                continue
            with on_mesh():
                out = decoding.decode(params, enc, config=config, method=method, max_new_tokens=max_new_tokens,
                                      min_new_tokens=min_new_tokens, num_beams=num_beams,
                                      length_penalty=length_penalty, length_penalty_kind=length_penalty_kind,
                                      early_stopping=early_stopping, temperature=temperature, top_k=top_k,
                                      top_p=top_p, rng=jax.random.fold_in(jax.random.PRNGKey(seed), first),
                                      task_index=task_index, weights=weights)
                tokens, scores, lengths = jax.device_get((out.tokens, out.scores, out.lengths))
            for i, e in enumerate(chunk):
                ids = decoding.strip_after_eos(tokens[i])
                generated += int(lengths[i])
                record = {**e["record"], "input_ids": e["input_ids"], "output_ids": ids, "score": float(scores[i])}
                if vocabulary is not None:
                    record["output"] = vocabulary.decode(ids)
                writer.write(record)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - start
    if truncated:
        log(f"infer: {truncated} input(s) longer than max_input_length={max_input_length} were truncated")
    summary = {"examples": len(examples), "mode": mode, "method": method, "generated_tokens": generated,
               "seconds": round(seconds, 3), "output": output_path}
    log("infer: " + json.dumps(summary))
    return summary


# ------------------------------------------------------------------------------ the edge

def configurable_infer():
    """`infer` registered with gin (once) as `cpm2_jax.infer.infer`: runs/infer.gin binds it."""
    return gin_utils.register_once(infer, "infer", "cpm2_jax.infer")


def add_flags(parser: argparse.ArgumentParser) -> None:
    gin_utils.add_gin_flags(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--prompt", action="append", default=[], metavar="FILE",
                        help="a tuned prompt file (repeatable: tasks 0, 1, ...; a JSON input's `task` picks one)")


def run(args) -> int:
    """Parses gin (runs/infer.gin when no --gin_file is given) and runs `infer`."""
    from cpm2_jax import checkpoints  # noqa: F401 - registers its gin configurables before gin locks

    entry = configurable_infer()
    files = list(args.gin_file) or [DEFAULT_GIN_FILE]
    try:
        gin_utils.parse_gin(files, args.gin_bindings, args.gin_search_paths)
        gin_utils.check_required_macros("infer")
        flags = {"overwrite": True} if args.overwrite else {}
        if getattr(args, "prompt", None):
            flags["prompt_files"] = list(args.prompt)
        gin_utils.call_configured(entry, **flags)
    finally:
        import gin

        gin.clear_config()  # unlocks gin, so later imports in this process may register configurables
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return gin_utils.binary_main("python -m cpm2_jax.infer", __doc__, add_flags, run, argv)


if __name__ == "__main__":
    from cpm2_jax.tf_import import default_jax_platforms, quiet_tensorflow_import

    default_jax_platforms()
    quiet_tensorflow_import()
    sys.exit(main())
