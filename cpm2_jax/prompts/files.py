"""A tuned prompt saved on its own: one small file per task, apart from the backbone.

Format: a NumPy `.npz` (read with `allow_pickle=False`, nothing is unpickled) holding
`vectors` [N, d_model] float32 (with a decoder prompt also `decoder_vectors` [M, d_model]) and
`meta`, UTF-8 JSON bytes: the format tag, the task's placement and mask, the prompt's
`PromptConfig` fields, and the backbone it was tuned on (its architecture fields and a
fingerprint, a SHA-256 over every backbone parameter's path, shape and bfloat16 bytes, so a float32 checkpoint and its bfloat16 copy agree). Loading a
prompt onto another backbone is a CheckpointError naming the file and what differs.
A 100 x 4096 prompt is 1.6 MB; a `base`-sized one 300 KB.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from cpm2_jax.errors import CheckpointError, ConfigError
from cpm2_jax.prompts.config import PromptConfig

FORMAT = "cpm2-prompt/1"
PROMPT_PREFIX = "prompt"  # the prompt's subtree in the model's parameters
# ModelConfig fields that say what the backbone computes (numerics and compilation switches
# such as dtype, scan_layers, remat_policy and dropout do not change which backbone it is).
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim", "num_encoder_layers",
                       "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance",
                       "ffn_activation", "tie_word_embeddings", "num_experts", "moe_router")


@dataclasses.dataclass(frozen=True)
class PromptFile:
    """One task's prompt: vectors [N, d_model] (and decoder_vectors [M, d_model] or None), its
    placement/mask, and its backbone."""

    vectors: np.ndarray
    placement: str
    mask: str
    prompt_config: dict
    backbone_config: dict
    fingerprint: str
    source: str = ""
    decoder_vectors: Optional[np.ndarray] = None


def _flat(params) -> dict[str, Any]:
    import jax

    from cpm2_jax.optim import path_name

    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def backbone_fingerprint(params) -> str:
    """SHA-256 over the backbone (every parameter outside `prompt/`): path, shape, and values
    rounded to bfloat16 (so a float32 backbone and its bfloat16 storage copy agree)."""
    import jax
    import ml_dtypes

    digest = hashlib.sha256()
    for name, leaf in sorted(_flat(params).items()):
        if name == PROMPT_PREFIX or name.startswith(PROMPT_PREFIX + "/"):
            continue
        value = np.asarray(jax.device_get(getattr(leaf, "value", leaf)))
        digest.update(f"{name}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value.astype(ml_dtypes.bfloat16)).tobytes())
    return digest.hexdigest()


def backbone_description(model_config) -> dict:
    return {k: getattr(model_config, k) for k in ARCHITECTURE_FIELDS}


def save_prompt(path, vectors, *, prompt_config: PromptConfig, task: int, model_config, fingerprint: str,
                overwrite: bool = False, decoder_vectors=None) -> pathlib.Path:
    """Writes task `task`'s prompt (vectors [N, d_model], decoder_vectors [M, d_model] with a
    decoder prompt) to `path` (.npz) atomically (a temp file renamed); an existing file is
    kept unless `overwrite`."""
    target = pathlib.Path(path).expanduser().absolute()
    if target.exists() and not overwrite:
        raise ConfigError(f"prompt file {str(target)!r} exists; pass overwrite=True to replace it")
    vectors = np.asarray(vectors, np.float32)
    if vectors.shape != (prompt_config.length, model_config.d_model):
        raise ConfigError(f"prompt vectors have shape {vectors.shape}, expected "
                          f"({prompt_config.length}, {model_config.d_model})")
    arrays = {"vectors": vectors}
    if prompt_config.decoder_length or decoder_vectors is not None:
        expected = (prompt_config.decoder_length, model_config.d_model)
        shape = None if decoder_vectors is None else np.shape(decoder_vectors)
        if shape != expected:
            raise ConfigError(f"decoder prompt vectors have shape {shape}, expected {expected} "
                              f"(PromptConfig.decoder_length {prompt_config.decoder_length})")
        arrays["decoder_vectors"] = np.asarray(decoder_vectors, np.float32)
    meta = {"format": FORMAT, "placement": prompt_config.placements()[task], "mask": prompt_config.mask,
            "prompt_config": prompt_config.to_dict(), "task": task,
            "backbone": {"config": backbone_description(model_config), "fingerprint": fingerprint}}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_prompt(path) -> PromptFile:
    """Reads a prompt file; a missing, truncated or foreign file is a CheckpointError naming it."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"prompt file {str(p)!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as data:
            vectors = np.asarray(data["vectors"], np.float32)
            decoder = np.asarray(data["decoder_vectors"], np.float32) if "decoder_vectors" in data.files else None
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
    except (OSError, ValueError, KeyError, UnicodeDecodeError, EOFError) as err:
        raise CheckpointError(f"{str(p)!r} is not a readable prompt file: {err}") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a prompt file (format {found!r}, expected {FORMAT!r})")
    try:
        backbone = meta["backbone"]
        return PromptFile(vectors=vectors, placement=meta["placement"], mask=meta["mask"],
                          prompt_config=dict(meta["prompt_config"]), backbone_config=dict(backbone["config"]),
                          fingerprint=str(backbone["fingerprint"]), source=str(p), decoder_vectors=decoder)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{str(p)!r}: prompt file metadata lacks {err}") from None


def check_backbone(prompt: PromptFile, model_config, fingerprint: Optional[str]) -> None:
    """The prompt was tuned on this backbone: same architecture fields and (when given) the
    same parameter fingerprint; else one CheckpointError naming the file and the difference."""
    mine = backbone_description(model_config)
    differing = [f"{k}={prompt.backbone_config.get(k)!r} (this backbone: {v!r})" for k, v in mine.items()
                 if k in prompt.backbone_config and prompt.backbone_config[k] != v]
    if differing:
        raise CheckpointError(f"prompt file {prompt.source!r} was tuned on another backbone: "
                              f"{', '.join(differing)}")
    for name, vectors in (("vectors", prompt.vectors), ("decoder vectors", prompt.decoder_vectors)):
        if vectors is not None and (vectors.ndim != 2 or vectors.shape[1] != model_config.d_model):
            raise CheckpointError(f"prompt file {prompt.source!r} holds {name} of shape {vectors.shape}, "
                                  f"this backbone needs [N, {model_config.d_model}]")
    if fingerprint is not None and prompt.fingerprint != fingerprint:
        raise CheckpointError(f"prompt file {prompt.source!r} was tuned on another backbone: its parameter "
                              f"fingerprint {prompt.fingerprint[:12]} differs from this checkpoint's {fingerprint[:12]}")


def prompt_config_for(files: Sequence[PromptFile], base: Optional[PromptConfig] = None) -> PromptConfig:
    """The PromptConfig serving `files` as tasks 0..T-1 (each its own placement); they must
    share length, decoder prompt length and mask (one table each, one encoder mask variant)."""
    if not files:
        raise ConfigError("no prompt files given")
    lengths = {(f.vectors.shape[0], _decoder_length(f)) for f in files}
    masks = {f.mask for f in files}
    if len(lengths) > 1 or len(masks) > 1:
        raise ConfigError(f"prompt files {[f.source for f in files]} differ in (length, decoder length) "
                          f"{sorted(lengths)} or mask {sorted(masks)}; one batch serves prompts of one length and mask")
    fields = dict(base.to_dict()) if base is not None else dict(files[0].prompt_config)
    length, decoder_length = lengths.pop()
    fields.update(length=length, decoder_length=decoder_length, num_tasks=len(files),
                  placement=[f.placement for f in files], mask=masks.pop(), init="normal", init_file="")
    return PromptConfig.from_dict(fields)


def _decoder_length(f: PromptFile) -> int:
    return 0 if f.decoder_vectors is None else f.decoder_vectors.shape[0]


def table_of(files: Sequence[PromptFile]) -> np.ndarray:
    return np.stack([f.vectors for f in files]).astype(np.float32)


def decoder_table_of(files: Sequence[PromptFile]) -> Optional[np.ndarray]:
    """The files' decoder prompts as one [tasks, M, d_model] table (None without)."""
    if any(f.decoder_vectors is None for f in files):
        return None
    return np.stack([f.decoder_vectors for f in files]).astype(np.float32)


def with_table(params: Mapping, table, decoder_table=None) -> dict:
    """params with `prompt/table` (and `prompt/decoder_table`) set (a new dict; the backbone
    leaves are shared)."""
    out = dict(params)
    out[PROMPT_PREFIX] = {"table": table} if decoder_table is None else {"table": table, "decoder_table": decoder_table}
    return out


def save_tuned_prompts(params, model_config, directory, *, task_names: Optional[Sequence[str]] = None,
                       fingerprint: Optional[str] = None, overwrite: bool = False) -> list[pathlib.Path]:
    """Every task's prompt of a trained model as `<directory>/<task name>.prompt.npz`."""
    import jax

    config = model_config.prompt
    if config is None:
        raise ConfigError("the model has no prompt (ModelConfig.prompt is None)")
    table = np.asarray(jax.device_get(params[PROMPT_PREFIX]["table"]), np.float32)
    decoder = params[PROMPT_PREFIX].get("decoder_table") if config.decoder_length else None
    decoder = None if decoder is None else np.asarray(jax.device_get(decoder), np.float32)
    names = list(task_names) if task_names else [f"task{t}" for t in range(config.num_tasks)]
    if len(names) != config.num_tasks:
        raise ConfigError(f"{len(names)} task names for {config.num_tasks} prompt tasks")
    fingerprint = backbone_fingerprint(params) if fingerprint is None else fingerprint
    return [save_prompt(pathlib.Path(directory) / f"{name}.prompt.npz", table[t], prompt_config=config, task=t,
                        model_config=model_config, fingerprint=fingerprint, overwrite=overwrite,
                        decoder_vectors=None if decoder is None else decoder[t])
            for t, name in enumerate(names)]


def run_task_names(mixture_or_task_name: Optional[str], num_tasks: int) -> list[str]:
    """File names for a run's prompt rows: row k serves the mixture's k-th task (seqio's
    order, as training and `cpm2 eval` assign rows), one task names its single row, and a
    row no task of the run uses is `task<k>`."""
    names: list[str] = []
    if mixture_or_task_name:
        import seqio

        from cpm2_jax.tasks.pipeline import get_provider

        try:
            provider = get_provider(mixture_or_task_name)
        except (ConfigError, ValueError):  # a run's task no longer registered: rows keep their numbers
            provider = None
        if isinstance(provider, seqio.Mixture):
            names = [task.name for task in provider.tasks]
        elif provider is not None:
            names = [provider.name]
    names = names[:num_tasks]
    return names + [f"task{k}" for k in range(len(names), num_tasks)]


def save_run_prompts(params, model_config, directory, mixture_or_task_name: Optional[str], *,
                     names: Optional[Sequence[str]] = None, overwrite: bool = True) -> list[pathlib.Path]:
    """A prompt-tuned run's prompts as `<directory>/<task>.prompt.npz` (by default replacing the
    run's own earlier files; `names` default to `run_task_names`), ready for `cpm2 infer
    --prompt`. A file-system error is one line."""
    names = names or run_task_names(mixture_or_task_name, model_config.prompt.num_tasks)
    try:
        return save_tuned_prompts(params, model_config, directory, task_names=names, overwrite=overwrite)
    except OSError as err:
        raise CheckpointError(f"cannot write prompt files to {str(directory)!r}: {err.strerror or err}") from None

