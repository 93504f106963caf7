"""The one checkpoint layout, and finding and reading its parts without loading arrays.

A checkpoint is a *step directory*, written by orbax with these items:

    <step>/state/        orbax PyTree: {"params": ...} (+ "step", "opt_state" in training)
    <step>/config/metadata   JSON: {"model_config": {...}, "gin": "...", "vocabulary": {...},
                             "fingerprints": {...}, ...}
    <step>/vocabulary/<file> the vocabulary the model was trained with (sentencepiece .model
                             or vocab.txt), pinned by its sha256 in the config item
    <step>/data/metadata     JSON: the data position (training only)

`cpm2 train` writes `<model_dir>/checkpoints/<step>/`; `cpm2 convert` writes one step
directory (params only) at the path it is given. A checkpoint *reference* is a step
directory, its `state` folder, a checkpoints folder or a run directory (their latest step).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Optional

from cpm2_jax import param_paths
from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import CheckpointError, ConfigError

STATE, CONFIG, DATA, VOCABULARY = "state", "config", "data", "vocabulary"
ITEMS = (STATE, DATA, CONFIG, VOCABULARY)
_JSON_FILE = "metadata"  # orbax's JsonCheckpointHandler file name
_STEP_MARKER = "_CHECKPOINT_METADATA"
# The layout `cpm2 convert` wrote before there was one format.
_OLD_CONVERTED = ("model_config.json", "params")


def is_step_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / STATE).is_dir() and ((path / _STEP_MARKER).is_file() or (path / CONFIG).is_dir())


def finished_steps(directory: pathlib.Path) -> list[int]:
    """Step numbers of the finished step folders in `directory` (orbax's temporary ones excluded)."""
    if not directory.is_dir():
        return []
    return sorted(int(c.name) for c in directory.iterdir() if c.name.isdigit() and (c / STATE).is_dir())


def resolve(path) -> pathlib.Path:
    """A checkpoint reference -> its step directory (the latest step of a run or checkpoints folder)."""
    p = pathlib.Path(path).expanduser().absolute()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if p.name == STATE and is_step_dir(p.parent):
        return p.parent
    if is_step_dir(p):
        return p
    for base in (p, p / "checkpoints"):
        steps = finished_steps(base)
        if steps:
            return base / str(steps[-1])
    if all((p / name).exists() for name in _OLD_CONVERTED):
        raise CheckpointError(f"{str(p)!r} is in the old `cpm2 convert` layout (model_config.json + params/); "
                              f"convert the source again to get a step directory")
    raise CheckpointError(f"no checkpoint found at {str(p)!r} (expected a step folder with a 'state' item, a "
                          f"checkpoints folder or a run directory holding one)")


def step_number(step_dir: pathlib.Path) -> int:
    """The step of a training step folder; 0 for an exported one (whose name is not a number)."""
    return int(step_dir.name) if step_dir.name.isdigit() else 0


def read_json_item(step_dir: pathlib.Path, item: str) -> dict:
    """A JSON item ('config' or 'data') of a step, {} when the step has none."""
    file = step_dir / item / _JSON_FILE
    if not file.exists():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(file)!r} is unreadable: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{str(file)!r} does not hold a JSON object")
    return value


def read_record(step_dir: pathlib.Path) -> dict:
    """The step's config record (model config, gin text, vocabulary, fingerprints)."""
    return read_json_item(step_dir, CONFIG)


def config_from_fields(fields: Any, source: str) -> ModelConfig:
    """A ModelConfig from its recorded fields; an unknown field names itself and `source`."""
    if not isinstance(fields, dict):
        raise CheckpointError(f"{source}: model_config must be a JSON object of ModelConfig fields")
    try:
        return ModelConfig().replace(**fields)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def saved_model_config(step_dir: pathlib.Path) -> Optional[ModelConfig]:
    """The model config recorded with the step (None when it records none)."""
    fields = read_record(step_dir).get("model_config")
    return None if not fields else config_from_fields(fields, str(step_dir / CONFIG / _JSON_FILE))


def config_record(model_config, gin_config: str = "", extra=None) -> dict:
    """The JSON saved beside each step: the model config's fields and the gin config text."""
    record = {"model_config": dataclasses.asdict(model_config), "gin": gin_config}
    record.update(dict(extra or {}))
    return record


def state_tree_metadata(step_dir: pathlib.Path) -> dict:
    """The step's `state` tree of array metadata (shape, dtype), read without loading arrays."""
    import orbax.checkpoint as ocp

    state_dir = step_dir / STATE
    if not (state_dir / "_METADATA").is_file():
        raise CheckpointError(f"checkpoint {str(step_dir)!r} is unreadable: {str(state_dir / '_METADATA')!r} "
                              f"is missing")
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {str(step_dir)!r} is unreadable: {str(state_dir / '_METADATA')!r}: "
                              f"{_first_line(err)}") from None
    tree = getattr(metadata, "tree", metadata)
    return dict(tree)


def param_metadata(step_dir: pathlib.Path) -> dict[str, Any]:
    """{param name: array metadata (.shape, .dtype)} of a step."""
    tree = state_tree_metadata(step_dir)
    if "params" not in tree:
        raise CheckpointError(f"{str(step_dir / STATE)!r} holds no 'params' (keys: {sorted(tree)})")
    return param_paths.flatten(tree["params"])


def param_shapes(step_dir: pathlib.Path) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in param_metadata(step_dir).items()}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:400]


# ------------------------------------------------------------------------------ vocabulary

def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class VocabularySpec:
    """A vocabulary file and how it is read (`extra_ids` sentinels on top of its pieces)."""

    path: pathlib.Path
    extra_ids: int = 100

    def record(self) -> dict:
        return {"file": self.path.name, "sha256": sha256_of(self.path), "extra_ids": int(self.extra_ids)}

    def load(self):
        from cpm2_jax.tasks.vocabulary import load_vocabulary

        return load_vocabulary(self.path, extra_ids=self.extra_ids)


def saved_vocabulary(step_dir: pathlib.Path) -> Optional[VocabularySpec]:
    """The vocabulary saved with a step (its content checked against the recorded sha256), or None."""
    entry = read_record(step_dir).get("vocabulary")
    if not entry:
        return None
    file = step_dir / VOCABULARY / str(entry.get("file", ""))
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(step_dir)!r} records vocabulary {entry.get('file')!r} but "
                              f"{str(file)!r} is missing")
    if entry.get("sha256") and sha256_of(file) != entry["sha256"]:
        raise CheckpointError(f"vocabulary {str(file)!r} does not match the sha256 recorded in the checkpoint "
                              f"(the file was changed after the checkpoint was written)")
    return VocabularySpec(file, int(entry.get("extra_ids", 100)))


def task_vocabulary(mixture_or_task_name: str) -> Optional[VocabularySpec]:
    """The vocabulary file a registered task (or mixture) encodes with, to save with each
    step; None when its vocabulary is not a file this project can reload."""
    import seqio

    from cpm2_jax.tasks import settings

    try:
        task = seqio.get_mixture_or_task(mixture_or_task_name)
        vocabulary = task.output_features["targets"].vocabulary
    except (ValueError, KeyError, AttributeError):
        return None
    if isinstance(vocabulary, settings.ConfiguredVocabulary):
        return VocabularySpec(pathlib.Path(settings.vocabulary_path()).absolute(), int(vocabulary.extra_ids))
    model_file = getattr(vocabulary, "model_file", None)
    if model_file and pathlib.Path(model_file).is_file():
        return VocabularySpec(pathlib.Path(model_file).absolute(), int(vocabulary.extra_ids))
    return None
