"""Exported checkpoints: one step directory holding params only, for `cpm2 convert` and any
tool that hands a model on (same layout and reader as a training step)."""
from __future__ import annotations

import os
import pathlib
from typing import Mapping, Optional

import numpy as np

from cpm2_jax.checkpoints import items, layout
from cpm2_jax.config import ModelConfig


def save_params(params, config: ModelConfig, path: os.PathLike | str, *, overwrite: bool = False,
                vocabulary: Optional[layout.VocabularySpec] = None, extra: Optional[Mapping] = None) -> pathlib.Path:
    """Writes `params` (gathered to host), `config` and the vocabulary file (if any) as a step
    directory at `path`, all-or-nothing; an existing non-empty `path` only with `overwrite`."""
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    from cpm2_jax.convert.atomic import atomic_directory

    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nn.unbox(params))
    args = dict(items.save_args({"params": host}, layout.config_record(config, extra=extra),
                                vocabulary=vocabulary).items())
    # The same layout as StandardSave, written without a second copy of the model: orbax's
    # numpy handler deep-copies every array first (for asynchronous saves; this one is
    # synchronous and `host` is unchanged until it returns), and the compressor holds an
    # encoded copy of each array in flight (float weights barely compress), so neither is used.
    args[layout.STATE] = ocp.args.PyTreeSave(args[layout.STATE].item)
    in_place = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    handlers = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=in_place, use_compression=False)
                if name == layout.STATE else
                items.VocabularyHandler() if name == layout.VOCABULARY else ocp.handlers.JsonCheckpointHandler()
                for name in args}
    handler = ocp.CompositeCheckpointHandler(**handlers)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        checkpointer = ocp.Checkpointer(handler)
        try:
            checkpointer.save(tmp, args=ocp.args.Composite(**args), force=True)
        finally:
            checkpointer.close()
    return pathlib.Path(path)
