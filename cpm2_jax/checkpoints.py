"""Checkpoints with orbax: the train state, the data position and the config, per step.

Layout: `<model_dir>/checkpoints/<step>/{state,data,config}`. Orbax writes each step into a
`<step>.orbax-checkpoint-tmp-*` folder and renames it when complete, so a process killed
mid-write leaves the previous steps untouched (the partial folder is removed at the next
start). Restores go straight into the target shardings, so a checkpoint written on one
mesh loads onto another. `restore_partial` loads chosen parameters from any checkpoint
through t5x-style regex assignment maps and initialises the rest fresh.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from cpm2_jax.errors import CheckpointError, closest
from cpm2_jax.optim import path_name
from cpm2_jax.train_state import TrainState

ITEMS = ("state", "data", "config")


@gin.configurable(module="cpm2_jax.checkpoints")
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to start from.

    `period`: save every N steps (0: only at the end). `keep`: how many recent steps stay on
    disk (None: all). `restore_from`: a checkpoint (a step folder or a checkpoints folder, latest
    step) to start from when the model dir has none yet; `assignment_map`: [(regex, replacement
    or None)] applied to each target parameter path to name its source (None: initialise fresh;
    unmatched paths load from the same path); `fallback_to_scratch`: parameters absent from the
    source are initialised fresh instead of failing.
    """

    period: int = 1000
    keep: Optional[int] = 3
    async_save: bool = True
    restore_from: Optional[str] = None
    assignment_map: Optional[Sequence[tuple[str, Optional[str]]]] = None
    fallback_to_scratch: bool = True


def _flat(tree) -> dict[str, Any]:
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


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


def checkpoint_param_shapes(state_dir: str | pathlib.Path) -> dict[str, tuple]:
    """{param path: shape} of a saved `state` item, read from its metadata (no array loaded)."""
    state_dir = pathlib.Path(state_dir)
    if not state_dir.is_dir():
        raise CheckpointError(f"no saved state at {state_dir}")
    metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir)
    tree = getattr(metadata, "tree", metadata)
    if "params" not in tree:
        raise CheckpointError(f"{state_dir} holds no 'params' (keys: {sorted(tree)})")
    return {k: tuple(v.shape) for k, v in _flat(tree["params"]).items()}


class Checkpoints:
    """A CheckpointManager over `<directory>`: save every N steps, keep K, restore the latest."""

    def __init__(self, directory: str | pathlib.Path, *, keep: Optional[int] = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, *, data_state: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
        """Saves at `state.step` (asynchronously when configured); False if that step exists."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state.as_dict()),
                                  data=ocp.args.JsonSave(dict(data_state)),
                                  config=ocp.args.JsonSave(dict(config)))
        return bool(self._manager.save(step, args=args, force=True))

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def check_compatible(self, step: int, abstract_state: TrainState, config: Optional[Mapping] = None) -> None:
        """Raises CheckpointError naming every mismatched parameter (and differing config fields)."""
        found = checkpoint_param_shapes(self.step_dir(step) / "state")
        expected = {k: tuple(v.shape) for k, v in _flat(abstract_state.params).items()}
        lines = describe_mismatch(expected, found)
        if not lines:
            return
        hint = ""
        if config is not None:
            saved = self.read_config(step).get("model_config", {})
            differing = [f"{k}={saved[k]!r} (now {config[k]!r})" for k in config
                         if k in saved and saved[k] != config[k]]
            if differing:
                hint = f" The checkpoint was written with a different model config: {', '.join(differing)}."
        raise CheckpointError(
            f"checkpoint {self.step_dir(step)} does not match the model: " + "; ".join(lines) + "." + hint +
            " Use the same gin model files as the run that wrote it, or another --gin.MODEL_DIR.")

    def read_json(self, step: int, item: str) -> dict:
        """A JSON item ('data' or 'config') of a finished step, read without touching arrays."""
        restored = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(restored[item] or {})

    def read_config(self, step: int) -> dict:
        return self.read_json(step, "config")

    def restore(self, step: Optional[int], abstract_state: TrainState, *, model_config: Optional[Mapping] = None
                ) -> tuple[TrainState, dict, dict]:
        """(state placed in the shardings of `abstract_state`, data position, saved config)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        self.check_compatible(step, abstract_state, model_config)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state.as_dict()),
                                  data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        tree = restored["state"]
        # Orbax returns the optimiser state's containers as plain tuples; put the original
        # pytree structure (optax NamedTuples) back.
        treedef = jax.tree_util.tree_structure(abstract_state.as_dict())
        tree = jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(tree))
        return TrainState.from_dict(tree), dict(restored["data"] or {}), dict(restored["config"] or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def resolve_state_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A checkpoint reference -> its `state` folder: `.../<step>/state`, `.../<step>`, or a
    checkpoints folder (its latest finished step)."""
    p = pathlib.Path(path).expanduser().absolute()
    if (p / "_CHECKPOINT_METADATA").exists() and p.name != "state" and (p / "state").is_dir():
        return p / "state"
    if p.name == "state" and p.is_dir():
        return p
    for base in (p, p / "checkpoints"):
        steps = sorted(int(c.name) for c in base.iterdir() if c.name.isdigit() and (c / "state").is_dir()) \
            if base.is_dir() else []
        if steps:
            return base / str(steps[-1]) / "state"
    raise CheckpointError(f"no checkpoint found at {p} (expected a step folder with a 'state' item, "
                          f"or a folder of such steps)")


def plan_assignment(target_paths: Sequence[str], source_paths: Sequence[str],
                    assignment_map: Optional[Sequence[tuple[str, Optional[str]]]]) -> dict[str, Optional[str]]:
    """{target path: source path or None (init fresh)}: the first regex that fully matches a
    target path rewrites it (`\\1` groups allowed); None as replacement means fresh."""
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


def restore_partial(source: str | pathlib.Path, abstract_params, init_params: Callable[[], Any], *,
                    assignment_map: Optional[Sequence[tuple[str, Optional[str]]]] = None,
                    fallback_to_scratch: bool = True) -> tuple[Any, dict[str, Optional[str]]]:
    """Params: each target leaf loaded from the source checkpoint (after the assignment map)
    or taken from `init_params()` (fresh). Returns (params, {target: source or None})."""
    state_dir = resolve_state_dir(source)
    found = checkpoint_param_shapes(state_dir)
    targets = _flat(abstract_params)
    plan = plan_assignment(list(targets), list(found), assignment_map)
    absent = {t: s[1:] for t, s in plan.items() if s is not None and s.startswith("!")}
    if absent and not fallback_to_scratch:
        t, s = next(iter(absent.items()))
        raise CheckpointError(f"parameter {t} maps to {s!r}, which {state_dir} does not hold"
                              f"{closest(s, found)} ({len(absent)} such parameters); set fallback_to_scratch "
                              f"or extend the assignment map")
    plan = {t: (None if s is None or s.startswith("!") else s) for t, s in plan.items()}
    wrong = [f"{t} <- {s}: checkpoint shape {found[s]}, model shape {tuple(targets[t].shape)}"
             for t, s in plan.items() if s is not None and tuple(found[s]) != tuple(targets[t].shape)]
    if wrong:
        raise CheckpointError(f"assignment from {state_dir} gives mismatched shapes: " + "; ".join(wrong[:6]))
    wanted = sorted({s for s in plan.values() if s is not None})
    loaded: dict[str, Any] = {}
    if wanted:
        # Every wanted source leaf is restored straight into the sharding of (one of) its targets.
        sharding_of = {}
        for t, s in plan.items():
            if s is not None and s not in sharding_of:
                sharding_of[s] = targets[t]
        item = _nest({s: sharding_of[s] for s in wanted})
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(item={"params": item}, restore_args={"params": restore_args},
                                                   partial_restore=True))
        loaded = _flat(restored["params"])
    fresh = init_params() if any(s is None for s in plan.values()) else None
    fresh_flat = _flat(fresh) if fresh is not None else {}
    leaves = []
    for target, spec in targets.items():
        s = plan[target]
        value = loaded[s] if s is not None else fresh_flat[target]
        if getattr(value, "sharding", None) != getattr(spec, "sharding", None) and getattr(spec, "sharding", None):
            value = jax.device_put(value, spec.sharding)
        leaves.append(value)
    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_params), leaves)
    return params, plan


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def config_record(model_config, gin_config: str = "", extra: Optional[Mapping] = None) -> dict:
    """The JSON saved beside each step: the model config's fields and the gin config text."""
    record = {"model_config": dataclasses.asdict(model_config), "gin": gin_config}
    record.update(dict(extra or {}))
    return record


def params_to_numpy(params) -> dict[str, np.ndarray]:
    """Flat {path: host array} (tests and comparisons)."""
    return {k: np.asarray(jax.device_get(v)) for k, v in _flat(params).items()}
