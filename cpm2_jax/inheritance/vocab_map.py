"""Ids of one vocabulary in another, matched by piece: for a teacher whose vocabulary is a
subset of the student's (Chinese -> bilingual), and for extending a checkpoint to a larger
vocabulary. Sentinel k maps to sentinel k (each counted down from its vocabulary's end).

The released CPM-2 vocabularies keep every Chinese piece in the bilingual one but at other
ids (../shared/data/README.md), so the map is by piece, not a prefix of ids; a vocabulary
built with `extended()` gives the same map as its `VocabularyExtension.old_to_new`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cpm2_jax.errors import ConfigError

UNK_ID = 2
SPECIAL_IDS = 4  # pad, eos, unk, <sep>: ids 0-3 in every vocabulary of this project


@dataclasses.dataclass(frozen=True)
class IdMap:
    """old_to_new[i]: id in the new (student) vocabulary of old (teacher) id i, -1 where a
    sentinel has no counterpart (the new vocabulary has fewer). `new_size`: ids of the new one."""

    old_to_new: np.ndarray
    new_size: int

    @property
    def is_identity(self) -> bool:
        return len(self.old_to_new) == self.new_size and bool(np.all(self.old_to_new == np.arange(self.new_size)))

    def shared_mask(self, rows: int) -> np.ndarray:
        """[rows] bool: new ids some old id maps to."""
        mask = np.zeros(rows, bool)
        mask[self.old_to_new[self.old_to_new >= 0]] = True
        return mask

    def new_to_old(self, rows: int, missing: int = UNK_ID) -> np.ndarray:
        """[rows] int32: the old id of each new id, `missing` (unk) where the old vocabulary lacks it."""
        back = np.full(rows, missing, np.int32)
        keep = self.old_to_new >= 0
        back[self.old_to_new[keep]] = np.nonzero(keep)[0]
        return back


def map_pieces(old_pieces: Sequence[str], new_pieces: Sequence[str], old_extra: int, new_extra: int, *,
               old_name: str = "old vocabulary", new_name: str = "new vocabulary") -> IdMap:
    """Map every old piece to its id among `new_pieces`; the last `*_extra` pieces of each
    are sentinels (sentinel k at size - 1 - k). A non-sentinel piece missing from the new
    vocabulary is an error naming it."""
    old_base, new_base = len(old_pieces) - old_extra, len(new_pieces) - new_extra
    # Ids 0-3 (pad, eos, unk, <sep>) are conventions of both, whatever their piece strings; a
    # released vocab.txt may also hold e.g. '</s>' as an ordinary piece further on.
    fixed = min(SPECIAL_IDS, old_base, new_base)
    index: dict[str, int] = {}
    for j, piece in enumerate(new_pieces[fixed:new_base], fixed):
        index.setdefault(piece, j)
    old_to_new = np.full(len(old_pieces), -1, np.int64)
    old_to_new[:fixed] = np.arange(fixed)
    missing = []
    for i, piece in enumerate(old_pieces[fixed:old_base], fixed):
        j = index.get(piece)
        if j is None:
            missing.append(piece)
        else:
            old_to_new[i] = j
    if missing:
        raise ConfigError(f"{old_name} is not a subset of {new_name}: {len(missing)} of its pieces are missing "
                          f"from it, e.g. {missing[:3]!r}")
    k = np.arange(min(old_extra, new_extra))
    old_to_new[len(old_pieces) - 1 - k] = len(new_pieces) - 1 - k
    return IdMap(old_to_new=old_to_new, new_size=len(new_pieces))


def map_vocabularies(old_path: str, new_path: str) -> IdMap:
    """`map_pieces` of two vocabulary files (a CPM-2 vocab.txt or a sentencepiece .model)."""
    from cpm2_jax.tasks.vocabulary import load_vocabulary

    old, new = load_vocabulary(old_path), load_vocabulary(new_path)
    return map_pieces(old.pieces(), new.pieces(), old.extra_ids, new.extra_ids, old_name=f"vocabulary {old_path!r}",
                      new_name=f"vocabulary {new_path!r}")
