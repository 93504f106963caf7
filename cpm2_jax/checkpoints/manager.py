"""Training checkpoints: `<model_dir>/checkpoints/<step>/` saved every N steps, the latest K kept.

Orbax writes each step into a `<step>.orbax-checkpoint-tmp-*` folder and renames it when
complete, so a process killed mid-write leaves the previous steps untouched (the partial
folder is removed at the next start). Restores go straight into the target shardings, so a
checkpoint written on one mesh loads onto another. A step that cannot be read back (damaged
files, a changed array) is reported by step and file and skipped on resume, never deleted.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from cpm2_jax import param_paths
from cpm2_jax.checkpoints import integrity, items, layout
from cpm2_jax.checkpoints.restore import describe_mismatch
from cpm2_jax.errors import CheckpointError
from cpm2_jax.train_state import TrainState

_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)


class Checkpoints:
    """A CheckpointManager over `<directory>`: save every N steps, keep K, restore the latest
    readable step. `vocabulary` is copied into every step."""

    def __init__(self, directory: str | pathlib.Path, *, keep: Optional[int] = 3, async_save: bool = True,
                 vocabulary: Optional[layout.VocabularySpec] = None):
        self.directory = pathlib.Path(directory).absolute()
        self.vocabulary = vocabulary
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=layout.ITEMS)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, state: TrainState, *, data_state: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
        """Saves at `state.step` (asynchronously when configured); False if that step exists."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        args = items.save_args(state.as_dict(), config, data=data_state, vocabulary=self.vocabulary)
        return bool(self._manager.save(step, args=args, force=True))

    def check_compatible(self, step: int, abstract_state: TrainState, config: Optional[Mapping] = None) -> None:
        """Raises CheckpointError naming every mismatched parameter (and differing config fields)."""
        found = layout.param_shapes(self.step_dir(step))
        expected = {k: tuple(v.shape) for k, v in param_paths.flatten(abstract_state.params).items()}
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
            " Use the same gin model files as the run that wrote it, another --gin.MODEL_DIR, or start a new run "
            "from it with CheckpointConfig.restore_from (which converts scan_layers and fills new parameters).")

    def read_json(self, step: int, item: str) -> dict:
        """A JSON item ('data' or 'config') of a finished step, read without touching arrays."""
        return layout.read_json_item(self.step_dir(step), item)

    def read_config(self, step: int) -> dict:
        return self.read_json(step, layout.CONFIG)

    def restore(self, step: Optional[int], abstract_state: TrainState, *, model_config: Optional[Mapping] = None
                ) -> tuple[TrainState, dict, dict]:
        """(state placed in the shardings of `abstract_state`, data position, saved config).
        A damaged step raises CheckpointError naming the step and the file."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        step_dir = self.step_dir(step)
        self.check_compatible(step, abstract_state, model_config)
        integrity.quiet_closed_loop_callbacks()
        args = ocp.args.Composite(**{layout.STATE: ocp.args.StandardRestore(_with_shardings(abstract_state.as_dict()))})
        try:
            restored = self._manager.restore(step, args=args)
        except _READ_ERRORS as err:
            raise CheckpointError(integrity.describe_read_error(err, str(step_dir))) from None
        # Orbax returns the optimiser state's containers as plain tuples; put the original
        # pytree structure (optax NamedTuples) back.
        treedef = jax.tree_util.tree_structure(abstract_state.as_dict())
        tree = jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(restored[layout.STATE]))
        record = self.read_config(step)
        integrity.verify(param_paths.flatten(tree), record.get("fingerprints") or {}, str(step_dir))
        return TrainState.from_dict(tree), self.read_json(step, layout.DATA), record

    def restore_latest(self, abstract_state: TrainState, *, model_config: Optional[Mapping] = None,
                       log: Callable[[str], None] = print) -> Optional[tuple[TrainState, dict, dict, int]]:
        """(state, data position, config, step) of the newest step that reads back intact; an
        unreadable newer step is logged with its reason and left on disk. None: no step at all.
        A step that does not fit the model (another config) is an error, not skipped."""
        steps = self.all_steps()
        failures = []
        for step in reversed(steps):
            try:
                state, data, config = self.restore(step, abstract_state, model_config=model_config)
            except CheckpointError as err:
                if "does not match the model" in str(err):
                    raise
                failures.append(str(err))
                log(f"{err}; step {step} is left on disk untouched, trying an earlier step")
                continue
            if failures:
                log(f"resumed from step {step}, the newest readable checkpoint in {self.directory}")
            return state, data, config, step
        if failures:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: {failures[0]}")
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _with_shardings(abstract):
    """Every leaf with a target sharding (one local device where the caller gave none), so
    orbax never falls back to the sharding file of the topology that wrote the checkpoint."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda x: x if getattr(x, "sharding", None) is not None else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                         sharding=device), abstract)
