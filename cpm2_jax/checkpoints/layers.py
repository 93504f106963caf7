"""Layer stacking is a property of the config, not of the file: per-layer <-> stacked names.

An unscanned model names layer i of a stack `encoder/layers_i/<rest>`; a scanned one holds
all layers in one array `encoder/layers/<rest>` with a leading `layers` axis. These helpers
map names, shapes, restore targets and arrays between the two, so any checkpoint loads into
either config of the same model.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

_PER_LAYER = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.+)$")
_STACKED = re.compile(r"^(encoder|decoder)/layers/(.+)$")


def is_scanned(names) -> Optional[bool]:
    """True for stacked names, False for per-layer ones, None when the tree has no layers."""
    for name in names:
        if _STACKED.match(name):
            return True
        if _PER_LAYER.match(name):
            return False
    return None


def sources(name: str, scanned_source: Optional[bool], layer_counts: Mapping[str, int]
            ) -> tuple[str, list[tuple[str, Optional[int]]]]:
    """(how, [(source name, index into its leading axis or None)]) that make up the target leaf
    `name`; how: 'same' (the source as it is), 'index' (one layer of a stacked source) or
    'stack' (per-layer sources stacked)."""
    per_layer, stacked = _PER_LAYER.match(name), _STACKED.match(name)
    if scanned_source and per_layer:
        stack, index, rest = per_layer.groups()
        return "index", [(f"{stack}/layers/{rest}", int(index))]
    if scanned_source is False and stacked:
        stack, rest = stacked.groups()
        return "stack", [(f"{stack}/layers_{i}/{rest}", None) for i in range(layer_counts.get(stack, 0))]
    return "same", [(name, None)]


def layer_counts(names_and_shapes: Mapping[str, tuple]) -> dict[str, int]:
    """Layers per stack, from per-layer names or from the leading axis of stacked arrays."""
    counts: dict[str, int] = {}
    for name, shape in names_and_shapes.items():
        per_layer, stacked = _PER_LAYER.match(name), _STACKED.match(name)
        if per_layer:
            counts[per_layer.group(1)] = max(counts.get(per_layer.group(1), 0), int(per_layer.group(2)) + 1)
        elif stacked and shape:
            counts[stacked.group(1)] = int(shape[0])
    return counts


def relayout_shapes(shapes: Mapping[str, tuple], scanned_target: bool) -> dict[str, tuple]:
    """{name: shape} of a checkpoint as the target layout would name and shape them."""
    scanned_source = is_scanned(shapes)
    if scanned_source is None or scanned_source == scanned_target:
        return dict(shapes)
    counts = layer_counts(shapes)
    out: dict[str, tuple] = {}
    for name, shape in shapes.items():
        per_layer, stacked = _PER_LAYER.match(name), _STACKED.match(name)
        if stacked:  # scanned source -> per-layer target
            stack, rest = stacked.groups()
            for i in range(shape[0]):
                out[f"{stack}/layers_{i}/{rest}"] = tuple(shape[1:])
        elif per_layer:  # per-layer source -> scanned target
            stack, _, rest = per_layer.groups()
            out[f"{stack}/layers/{rest}"] = (counts[stack],) + tuple(shape)
        else:
            out[name] = tuple(shape)
    return out


def source_target(target_leaf, index: Optional[int], stacked_from: int):
    """The restore target of a source leaf made from `target_leaf` (a ShapeDtypeStruct, maybe
    sharded): with a leading layers axis of `stacked_from` added (index given: the source is
    the stack) or removed (`stacked_from` == 0: the source is one layer of a stacked target)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = getattr(target_leaf, "sharding", None)
    shape = tuple(target_leaf.shape)
    if index is not None:
        shape = (stacked_from,) + shape
        spec = (None,) + tuple(sharding.spec) if isinstance(sharding, NamedSharding) else None
    else:
        shape = shape[1:]
        spec = tuple(sharding.spec)[1:] if isinstance(sharding, NamedSharding) else None
    new_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec)) if spec is not None else None
    return jax.ShapeDtypeStruct(shape, target_leaf.dtype, sharding=new_sharding)


def assemble(how: str, parts: list, stack: Callable[[list], Any]):
    """The target leaf from its source arrays, as `sources` described them."""
    if how == "index":
        value, index = parts[0]
        return value[index]
    if how == "stack":
        return stack([value for value, _ in parts])
    return parts[0][0]
