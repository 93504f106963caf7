"""Precomputed teacher outputs, for a teacher too large to run beside the student.

`cpm2 teacher-topk` runs the teacher over the training batches once and writes, for every
target position of every example, its k largest logits, their ids and log Z_T =
logsumexp(z / T) over its whole vocabulary (so the rest of the mass is known: one "other"
bucket, `losses.topk_distillation_kl`). Examples are keyed by content (sha256 of the row's
model inputs), so training finds them whatever the order, resume point or process count;
`attach` adds them to each batch as `TOPK_FEATURES`.

    DIR/meta.json     k, temperature, vocab_size, target length, examples, teacher
    DIR/outputs.npz   keys [N] (hex), ids [N, L, k] int32, logits [N, L, k] float32, log_z [N, L] float32
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Iterator, Mapping, Optional

import numpy as np

from cpm2_jax.errors import ConfigError, DataError

TOPK_FEATURES = ("teacher_topk_ids", "teacher_topk_logits", "teacher_log_z")
_KEYED_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "encoder_segment_ids",
                   "decoder_segment_ids")
META, ARRAYS = "meta.json", "outputs.npz"


def example_keys(batch: Mapping[str, np.ndarray]) -> list[str]:
    """One key per row: sha256 of the row's token features (int32 bytes, in a fixed order)."""
    rows = len(batch["decoder_target_tokens"])
    keys = []
    for r in range(rows):
        digest = hashlib.sha256()
        for name in _KEYED_FEATURES:
            if name in batch:
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(np.asarray(batch[name][r], np.int32)).tobytes())
        keys.append(digest.hexdigest())
    return keys


class TeacherOutputs:
    """A loaded directory of top-k outputs: `lookup(batch)` -> the three features for its rows."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory).expanduser().absolute()
        meta_file, arrays_file = self.directory / META, self.directory / ARRAYS
        if not meta_file.is_file() or not arrays_file.is_file():
            raise DataError(f"teacher outputs {str(self.directory)!r} not found: expected {META} and {ARRAYS} "
                            "(written by `cpm2 teacher-topk`; InheritanceConfig.teacher_outputs)")
        try:
            self.meta = json.loads(meta_file.read_text())
            with np.load(arrays_file, allow_pickle=False) as data:
                keys, self.ids, self.logits, self.log_z = (data["keys"], data["ids"], data["logits"], data["log_z"])
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"teacher outputs {str(self.directory)!r} are unreadable: {err}") from None
        self.row_of = {str(key): i for i, key in enumerate(keys)}

    def check(self, temperature: float, vocab_size: int) -> "TeacherOutputs":
        if abs(float(self.meta["temperature"]) - temperature) > 1e-9:
            raise ConfigError(f"teacher outputs {str(self.directory)!r} were written at temperature "
                              f"{self.meta['temperature']}, training uses {temperature} "
                              "(InheritanceConfig.temperature); rewrite them with --temperature")
        if int(self.meta["vocab_size"]) != vocab_size:
            raise ConfigError(f"teacher outputs {str(self.directory)!r} are over {self.meta['vocab_size']} ids, the "
                              f"student has {vocab_size}: precomputed outputs need one shared vocabulary")
        return self

    def lookup(self, batch: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        keys = example_keys(batch)
        missing = [i for i, key in enumerate(keys) if key not in self.row_of]
        if missing:
            raise DataError(f"{where}: {len(missing)} example(s) have no precomputed teacher output in "
                            f"{str(self.directory)!r} (row {missing[0]}); write them with `cpm2 teacher-topk` over the "
                            "same data, feature lengths, batch size and seed")
        rows = np.asarray([self.row_of[k] for k in keys])
        length = batch["decoder_target_tokens"].shape[1]
        if self.ids.shape[1] != length:
            raise DataError(f"teacher outputs have {self.ids.shape[1]} target positions, batches {length}")
        return {"teacher_topk_ids": self.ids[rows], "teacher_topk_logits": self.logits[rows],
                "teacher_log_z": self.log_z[rows]}


class _WithTeacherOutputs:
    """A batch source whose batches carry the precomputed teacher outputs (same `state()`)."""

    def __init__(self, source, outputs: TeacherOutputs):
        self.source, self.outputs = source, outputs

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        step = self.state().get("step", "?")
        batch = dict(next(self.source))
        batch.update(self.outputs.lookup(batch, f"training batch {step}"))
        return batch

    def state(self) -> dict:
        return self.source.state()

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if callable(close):
            close()


def attach(source, outputs: TeacherOutputs):
    return _WithTeacherOutputs(source, outputs)


def teacher_topk(logits, k: int, temperature: float):
    """(ids [..., k], logits [..., k], log Z_T [...]) of one batch of teacher logits."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    values, ids = jax.lax.top_k(logits, k)
    return ids.astype(jnp.int32), values, jax.nn.logsumexp(logits / temperature, axis=-1)


def write_teacher_outputs(*, teacher_checkpoint: str, output_dir: str, dataset_cfg, steps: int, k: int = 64,
                          temperature: float = 2.0, overwrite: bool = False, get_dataset_fn=None) -> dict:
    """Runs the teacher over `steps` batches of `dataset_cfg` and writes their top-k outputs."""
    import jax

    from cpm2_jax import datasets
    from cpm2_jax.convert.atomic import atomic_directory, check_writable
    from cpm2_jax.infer import check_params, load_checkpoint
    from cpm2_jax.inheritance.teacher import Teacher
    from cpm2_jax.partitioning import make_mesh, rules_for_mesh

    if steps <= 0:
        raise ConfigError(f"teacher-topk: steps must be > 0, got {steps}")
    if not temperature > 0:
        raise ConfigError(f"teacher-topk: temperature (T) must be > 0, got {temperature}")
    check_writable(output_dir, overwrite)
    params, config = load_checkpoint(teacher_checkpoint)
    check_params(params, config, f"{teacher_checkpoint!r} (teacher)")
    if not 1 <= k <= config.vocab_size:
        raise ConfigError(f"teacher-topk: k must be in [1, {config.vocab_size}], got {k}")
    mesh = make_mesh({"data": 1})
    teacher = Teacher(params, config, mesh, rules_for_mesh(mesh.axis_names), student_vocab_size=config.vocab_size)
    step_fn = jax.jit(lambda p, b: teacher_topk(teacher.logits(p, b), k, temperature))
    source = (get_dataset_fn or datasets.get_dataset)(dataset_cfg, start_step=0)
    keys, ids, logits, log_z = [], [], [], []
    try:
        for _ in range(steps):
            batch = next(source)
            out = jax.device_get(step_fn(teacher.params, {n: batch[n] for n in _KEYED_FEATURES if n in batch}))
            keys += example_keys(batch)
            for store, value in zip((ids, logits, log_z), out):
                store.append(np.asarray(value))
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()
    meta = {"k": k, "temperature": temperature, "vocab_size": config.vocab_size, "examples": len(keys),
            "target_length": int(ids[0].shape[1]), "teacher": str(teacher_checkpoint), "steps": steps}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        np.savez(tmp / ARRAYS, keys=np.asarray(keys), ids=np.concatenate(ids), logits=np.concatenate(logits),
                 log_z=np.concatenate(log_z))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return {"output": str(output_dir), **meta}
