"""Gated-GELU feed-forward: wo(gelu(wi_0 x) * wi_1 x) (CPM2_FACTS "Dense model"); also the
non-gated ReLU block wo(relu(wi x)) of Switch / T5 v1.0 (`ModelConfig.ffn_activation`).

`gated_gelu` is a pure function of the activations and the three weight matrices, so an
expert (MoE) is the same computation with its own weights passed in: the InfMoE runner can
stream those weights from host memory and call it, and upcycling copies dense weights into
experts knowing the arithmetic is identical.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import FFN_WEIGHTS, dtype_of
from cpm2_jax.model.dense import Projection


def gelu(x: jax.Array) -> jax.Array:
    """tanh-approximated GELU (mT5's `gelu_new`, the CPM-2 code's gelu)."""
    return jax.nn.gelu(x, approximate=True)


def gated_gelu(x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, *,
               dropout=None, dtype=None) -> jax.Array:
    """h = gelu(x wi_0) * (x wi_1); y = h wo.   x: [..., embed]; wi_*: [embed, mlp]; wo: [mlp, embed].

    `dropout`, if given, is applied to h (as mT5 does between the gate and wo).
    """
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    h = gelu(x @ wi_0.astype(dtype)) * (x @ wi_1.astype(dtype))
    if dropout is not None:
        h = dropout(h)
    return h @ wo.astype(dtype)


def relu_ffn(x: jax.Array, wi: jax.Array, wo: jax.Array, *, dropout=None, dtype=None) -> jax.Array:
    """y = relu(x wi) wo (Switch Transformers' DenseActDense); `dropout` on the hidden units."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    h = jax.nn.relu(x @ wi.astype(dtype))
    if dropout is not None:
        h = dropout(h)
    return h @ wo.astype(dtype)


def feed_forward(x: jax.Array, weights: dict, activation: str = "gated_gelu", *, dropout=None,
                 dtype=None) -> jax.Array:
    """The FFN named by `activation`, its weights by name (config.FFN_WEIGHTS)."""
    fn = gated_gelu if activation == "gated_gelu" else relu_ffn
    return fn(x, *(weights[name] for name in FFN_WEIGHTS[activation]), dropout=dropout, dtype=dtype)


class MlpBlock(nn.Module):
    """The dense feed-forward block: bias-free matrices around a gated GELU (or a ReLU)."""

    d_ff: int
    activation: str = "gated_gelu"
    dropout_rate: float = 0.0
    init_std: float = 0.001
    dtype: str = "float32"
    param_dtype: str = "float32"
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("embed", "mlp"))
        pdtype = dtype_of(self.param_dtype)
        weights = {name: self.param(name, init, (d_model, self.d_ff), pdtype)
                   for name in FFN_WEIGHTS[self.activation][:-1]}
        weights["wo"] = self.param("wo", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                      ("mlp", "embed")), (self.d_ff, d_model), pdtype)
        drop = nn.Dropout(self.dropout_rate)
        return feed_forward(x, weights, self.activation, dtype=dtype_of(self.dtype),
                            dropout=lambda h: nn.with_logical_constraint(
                                drop(h, deterministic=self.deterministic), ("batch", "length", "mlp")))
