"""Stage-wise inheritance, Chinese -> bilingual (CPM2_FACTS "Knowledge inheritance"): a
checkpoint for a larger vocabulary that computes what the old one computed on old tokens.

    new row j of the embedding and of the output matrix =
        old row i            if new piece j is old piece i (sentinel k -> sentinel k, at the new end)
        old row of prefix    the longest proper prefix of piece j that the old vocabulary has
        a random old row     when no prefix is known (and for padding rows past the vocabulary)

Old pieces are matched by string: the released bilingual vocabulary holds every Chinese
piece at another id, so this is an id map, not an append.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import ConfigError
from cpm2_jax.inheritance.vocab_map import SPECIAL_IDS as FIRST_PIECE  # never a prefix or a random source
from cpm2_jax.inheritance.vocab_map import IdMap, map_pieces

KEPT, PREFIX, RANDOM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ExtensionPlan:
    """source[j]: the old row new row j starts from; how[j]: KEPT, PREFIX or RANDOM."""

    source: np.ndarray
    how: np.ndarray
    id_map: IdMap

    def counts(self) -> dict[str, int]:
        return {name: int(np.sum(self.how == code)) for name, code in (("kept", KEPT), ("prefix", PREFIX),
                                                                        ("random", RANDOM))}


def longest_prefix(piece: str, index: dict[str, int]) -> int:
    """Old id of the longest proper prefix of `piece` in `index`, or -1."""
    for end in range(len(piece) - 1, 0, -1):
        found = index.get(piece[:end])
        if found is not None:
            return found
    return -1


def plan_extension(old_pieces: Sequence[str], new_pieces: Sequence[str], old_extra: int, new_extra: int, *,
                   new_rows: int, seed: int = 0) -> ExtensionPlan:
    """Where every row of the new [new_rows, ...] embedding comes from (see the module doc)."""
    if new_rows < len(new_pieces):
        raise ConfigError(f"--vocab_size {new_rows} is smaller than the new vocabulary ({len(new_pieces)} ids)")
    id_map = map_pieces(old_pieces, new_pieces, old_extra, new_extra, old_name="the checkpoint's vocabulary",
                        new_name="the new vocabulary")
    old_base = len(old_pieces) - old_extra
    index = {piece: i for i, piece in enumerate(old_pieces[FIRST_PIECE:old_base], FIRST_PIECE)}
    if not index:
        raise ConfigError("the checkpoint's vocabulary has no ordinary pieces to initialise new rows from")
    rng = np.random.default_rng(seed)
    source = np.full(new_rows, -1, np.int64)
    how = np.full(new_rows, RANDOM, np.int8)
    keep = id_map.old_to_new >= 0
    source[id_map.old_to_new[keep]] = np.nonzero(keep)[0]
    how[id_map.old_to_new[keep]] = KEPT
    for j in np.nonzero(source < 0)[0]:
        prefix = longest_prefix(new_pieces[j], index) if j < len(new_pieces) else -1
        if prefix >= 0:
            source[j], how[j] = prefix, PREFIX
        else:
            source[j] = rng.integers(FIRST_PIECE, old_base)
    return ExtensionPlan(source=source, how=how, id_map=id_map)


def _vocab_axis(path: tuple[str, ...]):
    """The vocabulary axis of a parameter, or None: the shared embedding's rows, the output matrix's columns."""
    if path[-2:] == ("token_embedder", "embedding"):
        return 0
    if path[-2:] == ("logits_dense", "kernel"):
        return -1
    return None


def extend_params(params, config: ModelConfig, plan: ExtensionPlan) -> tuple[dict, ModelConfig]:
    """Params and config for `len(plan.source)` vocabulary rows; every other parameter as it was."""
    from cpm2_jax.convert.native import flatten_params, nest_params

    flat = flatten_params(params)
    out, touched = {}, 0
    for path, value in flat.items():
        axis = _vocab_axis(path)
        value = np.asarray(value)
        if axis is not None:
            if value.shape[axis] != config.vocab_size:
                raise ConfigError(f"parameter {'/'.join(path)} has {value.shape[axis]} vocabulary rows, the config "
                                  f"says {config.vocab_size}")
            if plan.source.max(initial=0) >= value.shape[axis]:
                raise ConfigError(f"the checkpoint's vocabulary has more ids than its model's vocab_size "
                                  f"{config.vocab_size}")
            value = np.take(value, plan.source, axis=axis)
            touched += 1
        out[path] = value
    if not touched:
        raise ConfigError("the checkpoint has no token_embedder/embedding parameter to extend")
    return nest_params(out), config.replace(vocab_size=int(len(plan.source)))
