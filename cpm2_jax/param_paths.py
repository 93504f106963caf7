"""Parameter path names: one spelling, 'encoder/layers_0/mlp/wi_0/kernel', for every module.

Checkpoints, partition rules, trainable masks, converters and error messages all name a
parameter by the keys from the tree's root to its leaf joined with '/'. Flax boxes
(`nn.Partitioned`) are unboxed first, so a boxed and a plain tree flatten alike.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

import jax

SEP = "/"


def key_name(key) -> str:
    """One tree key (DictKey, GetAttrKey, SequenceKey or a plain value) as text."""
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def path_name(path) -> str:
    """A jax tree path as 'encoder/layers_0/mlp/wi_0/kernel'."""
    return SEP.join(key_name(k) for k in path)


def _leaves(tree):
    import flax.linen as nn

    return jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]


def flatten(tree) -> dict[str, Any]:
    """{'a/b/c': leaf} of a (boxed or plain) tree."""
    return {path_name(p): leaf for p, leaf in _leaves(tree)}


def flatten_tuples(tree) -> dict[tuple[str, ...], Any]:
    """{('a', 'b', 'c'): leaf} of a (boxed or plain) tree."""
    return {tuple(key_name(k) for k in p): leaf for p, leaf in _leaves(tree)}


def nest(flat: Mapping[Union[str, tuple], Any]) -> dict:
    """The nested dict of a {name or key tuple: leaf} map (inverse of `flatten`)."""
    out: dict = {}
    for path, value in flat.items():
        parts = path.split(SEP) if isinstance(path, str) else list(path)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
