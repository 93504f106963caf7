"""The orbax items of a step, in one place: what `Checkpoints.save` and `save_params` write.

The vocabulary item is a copy of the vocabulary file, written by orbax with the other items
(so it lands in the step folder atomically, before the folder is renamed into place).
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Any, Mapping, Optional

import orbax.checkpoint as ocp

from cpm2_jax.checkpoints import integrity
from cpm2_jax.checkpoints.layout import CONFIG, DATA, STATE, VOCABULARY, VocabularySpec


class VocabularyHandler(ocp.handlers.JsonCheckpointHandler):
    """Copies one file into the item folder (on the primary process); restores its path."""

    async def _save_fn(self, x, directory):
        import jax

        if jax.process_index() == 0:
            source = pathlib.Path(x)
            shutil.copyfile(source, pathlib.Path(str(directory)) / source.name)

    def restore(self, directory, item=None, args=None):
        del item, args
        files = sorted(p for p in pathlib.Path(str(directory)).iterdir() if p.is_file() and p.name != "metadata")
        return str(files[0]) if files else None


@ocp.args.register_with_handler(VocabularyHandler, for_save=True)
@dataclasses.dataclass
class VocabularySave(ocp.args.CheckpointArgs):
    item: str


@ocp.args.register_with_handler(VocabularyHandler, for_restore=True)
@dataclasses.dataclass
class VocabularyRestore(ocp.args.CheckpointArgs):
    pass


def save_args(state: Mapping[str, Any], record: Mapping[str, Any], *, data: Optional[Mapping] = None,
              vocabulary: Optional[VocabularySpec] = None) -> ocp.args.Composite:
    """The Composite of one step: the state tree, the config record (+ the vocabulary's
    sha256 and every array's fingerprint), the data position, the vocabulary file."""
    record = dict(record)
    record["fingerprints"] = integrity.fingerprints(state)
    items = {STATE: ocp.args.StandardSave(dict(state))}
    if vocabulary is not None:
        record["vocabulary"] = vocabulary.record()
        items[VOCABULARY] = VocabularySave(str(vocabulary.path))
    items[CONFIG] = ocp.args.JsonSave(record)
    if data is not None:
        items[DATA] = ocp.args.JsonSave(dict(data))
    return ocp.args.Composite(**items)
