"""The training state: step, parameters and optimiser state, one pytree.

The state is what a checkpoint holds (besides the data position and the config). The
optimiser state covers the trainable parameters only (see `optim.trainable_subtree`), so
prompt tuning keeps moments for the prompt alone.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from cpm2_jax import optim


class TrainState(flax.struct.PyTreeNode):
    """`step` counts optimiser updates (int32 scalar); `params` are the float32 master weights."""

    step: jax.Array
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, mask) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=tx.init(optim.trainable_subtree(params, mask)))

    def as_dict(self) -> dict:
        """The plain nested dict saved in checkpoints (orbax trees keyed by name)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    @classmethod
    def from_dict(cls, tree: dict) -> "TrainState":
        return cls(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
