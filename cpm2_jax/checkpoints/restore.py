"""Reading parameters out of a step: whole (`load_params`) or in part (`restore_partial`).

Every read goes through `restore_params`: it names, for each target parameter, the arrays of
the step that make it (converting between per-layer and stacked layers when the target's
`scan_layers` differs from the file's), restores exactly those arrays straight into their
target shardings (or as host numpy arrays when the target has none), checks their
fingerprints and assembles the targets.
"""
from __future__ import annotations

import pathlib
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from cpm2_jax import param_paths
from cpm2_jax.checkpoints import integrity, layers, layout
from cpm2_jax.config import ModelConfig
from cpm2_jax.errors import CheckpointError, ConfigError, closest

AssignmentMap = Optional[Sequence[tuple[str, Optional[str]]]]
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)


def describe_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], *, limit: int = 4) -> list[str]:
    """Human-readable differences between two {path: shape} maps (missing, unexpected, reshaped)."""
    lines = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and tuple(expected[k]) != tuple(found[k])]
    for k in reshaped[:limit]:
        lines.append(f"{k}: checkpoint has shape {tuple(found[k])}, model expects {tuple(expected[k])}")
    for k in missing[:limit]:
        lines.append(f"{k}: missing from the checkpoint{closest(k, unexpected)}")
    for k in unexpected[:limit]:
        lines.append(f"{k}: in the checkpoint but not in the model")
    hidden = len(reshaped) + len(missing) + len(unexpected) - len(lines)
    if hidden > 0:
        lines.append(f"... and {hidden} more")
    return lines


def abstract_params(config: ModelConfig):
    """ShapeDtypeStructs of `config`'s parameters (no sharding: restored as host arrays)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from cpm2_jax.model import EncoderDecoder

    ones = jnp.ones((1, 2), jnp.int32)
    return nn.unbox(jax.eval_shape(lambda: EncoderDecoder(config).init(jax.random.PRNGKey(0), ones, ones)))["params"]


def _restore_args(target):
    import orbax.checkpoint as ocp

    sharding = getattr(target, "sharding", None)
    if sharding is not None:
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(target.shape), dtype=target.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=target.dtype)


def read_arrays(step_dir: pathlib.Path, targets: Mapping[str, Any], *, prefix: str = "params",
                saved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{name: array} of the named arrays under `state/<prefix>/`, each restored into its
    target (a ShapeDtypeStruct: its sharding, or host numpy without one), fingerprints checked.
    `saved`: the step's {name: metadata} under `prefix` when the caller has read it already."""
    import orbax.checkpoint as ocp

    if not targets:
        return {}
    integrity.quiet_closed_loop_callbacks()
    item = {prefix: param_paths.nest(dict(targets))}
    restore_args = {prefix: param_paths.nest({k: _restore_args(v) for k, v in targets.items()})}
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restored = checkpointer.restore(step_dir / layout.STATE, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    except _READ_ERRORS as err:
        raise CheckpointError(integrity.describe_read_error(err, str(step_dir))) from None
    finally:
        checkpointer.close()
    arrays = param_paths.flatten(restored[prefix])
    expected = layout.read_record(step_dir).get("fingerprints") or {}
    # A fingerprint is of the saved bytes: an array restored into another dtype (a float32
    # checkpoint read as a bfloat16 backbone) cannot be checked against it after the cast, so
    # only arrays read in their saved dtype are verified (read errors still surface for all).
    if saved is None:
        saved = param_paths.flatten(layout.state_tree_metadata(step_dir).get(prefix, {}))
    same_dtype = {k: v for k, v in arrays.items()
                  if k in saved and np.dtype(saved[k].dtype) == np.dtype(v.dtype)}
    integrity.verify({f"{prefix}/{k}": v for k, v in same_dtype.items()},
                     {k: v for k, v in expected.items() if k.startswith(prefix + "/")}, str(step_dir))
    return arrays


def restore_params(step_dir: pathlib.Path, targets: Mapping[str, Any], plan: Mapping[str, str]) -> dict[str, Any]:
    """{target name: array} for every target in `plan` ({target: source name in the target's
    layout}), read from the step in whatever layout it was saved."""
    metadata = layout.param_metadata(step_dir)
    found = {k: tuple(v.shape) for k, v in metadata.items()}
    scanned_source = layers.is_scanned(found)
    counts = layers.layer_counts(found)
    recipes, wanted = {}, {}
    for target, source in plan.items():
        how, parts = layers.sources(source, scanned_source, counts)
        recipes[target] = (how, parts)
        for name, index in parts:
            if name in wanted:
                continue
            leaf = targets[target]
            wanted[name] = (leaf if how == "same" else
                            layers.source_target(leaf, index, counts.get(name.split("/")[0], 0)) if how == "index"
                            else layers.source_target(leaf, None, 0))
    arrays = read_arrays(step_dir, wanted, saved=metadata)
    out = {}
    for target, (how, parts) in recipes.items():
        value = layers.assemble(how, [(arrays[name], index) for name, index in parts], _stack)
        sharding = getattr(targets[target], "sharding", None)
        if how != "same" and sharding is not None:
            value = jax.device_put(value, sharding)
        out[target] = value
    return out


def _stack(values):
    if all(isinstance(v, np.ndarray) for v in values):
        return np.stack(values)
    import jax.numpy as jnp

    return jnp.stack(values)


def plan_assignment(target_paths: Sequence[str], source_paths: Sequence[str],
                    assignment_map: AssignmentMap) -> dict[str, Optional[str]]:
    """{target path: source path or None (init fresh)}: the first regex that fully matches a
    target path rewrites it (`\\1` groups allowed); None as replacement means fresh. A source
    the checkpoint lacks is returned as '!name'."""
    rules = [(re.compile(pattern), replacement) for pattern, replacement in (assignment_map or [])]
    available = set(source_paths)
    plan = {}
    for target in target_paths:
        source: Optional[str] = target
        for pattern, replacement in rules:
            if pattern.fullmatch(target):
                source = None if replacement is None else pattern.sub(replacement, target)
                break
        plan[target] = source if source in available else (None if source is None else f"!{source}")
    return plan


def restore_partial(source, abstract_params, init_missing: Callable[[Sequence[str]], Mapping[str, Any]], *,
                    assignment_map: AssignmentMap = None,
                    fallback_to_scratch: bool = True) -> tuple[Any, dict[str, Optional[str]]]:
    """Params: each target leaf loaded from the source checkpoint (after the assignment map)
    or, for the leaves it does not provide, from `init_missing(names) -> {name: array}`
    (called once, with only those names, so a fresh init never builds the whole model).
    Returns (params, {target: source or None})."""
    step_dir = layout.resolve(source)
    targets = param_paths.flatten(abstract_params)
    found = layers.relayout_shapes(layout.param_shapes(step_dir), bool(layers.is_scanned(targets)))
    plan = plan_assignment(list(targets), list(found), assignment_map)
    absent = {t: s[1:] for t, s in plan.items() if s is not None and s.startswith("!")}
    if absent and not fallback_to_scratch:
        t, s = next(iter(absent.items()))
        raise CheckpointError(f"parameter {t} maps to {s!r}, which {step_dir} does not hold"
                              f"{closest(s, found)} ({len(absent)} such parameters); set fallback_to_scratch "
                              f"or extend the assignment map")
    plan = {t: (None if s is None or s.startswith("!") else s) for t, s in plan.items()}
    wrong = [f"{t} <- {s}: checkpoint shape {found[s]}, model shape {tuple(targets[t].shape)}"
             for t, s in plan.items() if s is not None and tuple(found[s]) != tuple(targets[t].shape)]
    if wrong:
        raise CheckpointError(f"assignment from {step_dir} gives mismatched shapes: " + "; ".join(wrong[:6]))
    loaded = restore_params(step_dir, targets, {t: s for t, s in plan.items() if s is not None})
    missing = [t for t, s in plan.items() if s is None]
    if missing:
        fresh = dict(init_missing(missing))
        lacking = [t for t in missing if t not in fresh]
        if lacking:
            raise CheckpointError(f"parameter {lacking[0]} is not in {step_dir} and nothing initialises it")
        loaded.update({t: fresh[t] for t in missing})
    leaves = [loaded[t] for t in targets]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_params), leaves), plan


def load_params(path, config: Optional[ModelConfig] = None, *, target=None) -> tuple[Any, ModelConfig]:
    """(params, model config) of a checkpoint reference (run, checkpoints folder, step or
    exported directory). The config is the one the checkpoint records unless `config` is given
    (it may differ in layout, `scan_layers`, and in dtypes); `target`, abstract params with
    shardings, restores onto a mesh, else the params come back as host numpy arrays."""
    step_dir = layout.resolve(path)
    config = config or layout.saved_model_config(step_dir)
    if config is None:
        raise ConfigError(f"checkpoint {str(step_dir)!r} records no model config; give one with a model gin file "
                          f"(--gin_file=models/NAME.gin)")
    abstract = abstract_params(config) if target is None else target
    targets = param_paths.flatten(abstract)
    found = layers.relayout_shapes(layout.param_shapes(step_dir), bool(layers.is_scanned(targets)))
    problems = describe_mismatch({k: tuple(v.shape) for k, v in targets.items()}, found)
    if problems:
        saved = layout.saved_model_config(step_dir)
        hint = ""
        if saved is not None and saved != config:
            differing = [f"{k}={getattr(saved, k)!r} (now {getattr(config, k)!r})" for k in saved.__dataclass_fields__
                         if getattr(saved, k) != getattr(config, k)]
            hint = f" The checkpoint was written with {', '.join(differing[:6])}."
        raise CheckpointError(f"checkpoint {str(step_dir)!r} does not match the model: " + "; ".join(problems)
                              + "." + hint)
    arrays = restore_params(step_dir, targets, {k: k for k in targets})
    leaves = [arrays[k] for k in targets]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves), config
