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
from cpm2_jax.model.dense import (DECODE_WEIGHTS, is_symbolic_zero, stacked_projections, use_cpu_weight_grads,
                                  weight_grad)


def gelu(x: jax.Array) -> jax.Array:
    """tanh-approximated GELU (mT5's `gelu_new`, the CPM-2 code's gelu)."""
    return jax.nn.gelu(x, approximate=True)


def gated_gelu(x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, *,
               dropout=None, dtype=None, cpu_weight_grads: str = "auto") -> jax.Array:
    """h = gelu(x wi_0) * (x wi_1); y = h wo.   x: [..., embed]; wi_*: [embed, mlp]; wo: [mlp, embed].

    `dropout`, if given, is applied to h (as mT5 does between the gate and wo). Without dropout,
    `cpu_weight_grads` (ModelConfig.cpu_weight_grads) selects the hand-written VJP
    (`gated_gelu_grads`, for XLA:CPU) or plain autodiff; both give the same gradients.
    """
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    wi_0, wi_1, wo = (w.astype(dtype) for w in (wi_0, wi_1, wo))
    if (dropout is None and wi_0.ndim == 2 and wi_1.ndim == 2 and wo.ndim == 2
            and use_cpu_weight_grads(cpu_weight_grads)):
        return _gated_gelu_2d(x, wi_0, wi_1, wo)
    h = gelu_gate(x @ wi_0, x @ wi_1)
    if dropout is not None:
        h = dropout(h)
    return h @ wo


@jax.custom_vjp
def _gated_gelu_2d(x, wi_0, wi_1, wo):
    return (gelu(x @ wi_0) * (x @ wi_1)) @ wo


def _gated_gelu_fwd(x, wi_0, wi_1, wo):
    # Frozen weights (prompt tuning) need no weight gradients: then neither x nor h is kept,
    # and g is recomputed from a (dx needs a, b and the weights alone).
    frozen = not (wi_0.perturbed or wi_1.perturbed or wo.perturbed)
    x, wi_0, wi_1, wo = x.value, wi_0.value, wi_1.value, wo.value
    a, b = x @ wi_0, x @ wi_1
    g = gelu(a)
    h = g * b
    if frozen:
        return h @ wo, (None, wi_0, wi_1, wo, a, b, None, None)
    return h @ wo, (x, wi_0, wi_1, wo, a, b, g, h)


def gated_gelu_grads(x, wi_0, wi_1, wo, a, b, dy, g=None, h=None):
    """(dx, dwi_0, dwi_1, dwo) of y = (gelu(a) * b) wo, a = x wi_0, b = x wi_1, for 2-D x, from
    the saved pre-activations a, b (g = gelu(a) and h = g b recomputed unless given). Shared by
    the dense block and the per-expert loop of the MoE layer (moe.expert_loop)."""
    if g is None:
        g = gelu(a)
    if h is None:
        h = g * b
    dh = dy @ wo.T
    da = jax.vjp(gelu, a)[1](dh * b)[0]
    db = dh * g
    dx = da @ wi_0.T + db @ wi_1.T
    return dx, weight_grad(x, da), weight_grad(x, db), weight_grad(h, dy)


def gated_gelu_input_grad(wi_0, wi_1, wo, a, b, dy):
    """dx of `gated_gelu_grads` alone (frozen weights), by the same operations."""
    dh = dy @ wo.T
    g, gelu_vjp = jax.vjp(gelu, a)
    return gelu_vjp(dh * b)[0] @ wi_0.T + (dh * g) @ wi_1.T


def _gated_gelu_bwd(res, dy):
    x, wi_0, wi_1, wo, a, b, g, h = res
    if is_symbolic_zero(dy):
        return None, None, None, None
    if x is None:  # frozen weights: dx alone
        return gated_gelu_input_grad(wi_0, wi_1, wo, a, b, dy), None, None, None
    return gated_gelu_grads(x, wi_0, wi_1, wo, a, b, dy, g, h)


_gated_gelu_2d.defvjp(_gated_gelu_fwd, _gated_gelu_bwd, symbolic_zeros=True)


@jax.custom_vjp
def gelu_gate(a: jax.Array, b: jax.Array) -> jax.Array:
    """h = gelu(a) * b, keeping only a and b for the backward pass (gelu(a) and its tanh
    intermediates are recomputed there, by the same operations autodiff would save them
    from: the same gradients, without five more [tokens, d_ff] arrays per layer)."""
    return gelu(a) * b


def _gelu_gate_fwd(a, b):
    return gelu(a) * b, (a, b)


def _gelu_gate_bwd(res, dh):
    a, b = res
    g, gelu_vjp = jax.vjp(gelu, a)
    return gelu_vjp(dh * b)[0], dh * g


gelu_gate.defvjp(_gelu_gate_fwd, _gelu_gate_bwd)


def relu_ffn(x: jax.Array, wi: jax.Array, wo: jax.Array, *, dropout=None, dtype=None,
             cpu_weight_grads: str = "auto") -> jax.Array:
    """y = relu(x wi) wo (Switch Transformers' DenseActDense); `dropout` on the hidden units
    (plain autodiff: `cpu_weight_grads` is accepted for a signature shared with `gated_gelu`)."""
    del cpu_weight_grads
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    h = jax.nn.relu(x @ wi.astype(dtype))
    if dropout is not None:
        h = dropout(h)
    return h @ wo.astype(dtype)


def feed_forward(x: jax.Array, weights: dict, activation: str = "gated_gelu", *, dropout=None,
                 dtype=None, cpu_weight_grads: str = "auto") -> jax.Array:
    """The FFN named by `activation`, its weights by name (config.FFN_WEIGHTS)."""
    fn = gated_gelu if activation == "gated_gelu" else relu_ffn
    return fn(x, *(weights[name] for name in FFN_WEIGHTS[activation]), dropout=dropout, dtype=dtype,
              cpu_weight_grads=cpu_weight_grads)


class MlpBlock(nn.Module):
    """The dense feed-forward block: bias-free matrices around a gated GELU (or a ReLU)."""

    d_ff: int
    activation: str = "gated_gelu"
    dropout_rate: float = 0.0
    init_std: float = 0.001
    dtype: str = "float32"
    param_dtype: str = "float32"
    deterministic: bool = True
    cpu_weight_grads: str = "auto"  # ModelConfig.cpu_weight_grads

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("embed", "mlp"))
        pdtype = dtype_of(self.param_dtype)
        weights = {name: self.param(name, init, (d_model, self.d_ff), pdtype)
                   for name in FFN_WEIGHTS[self.activation][:-1]}
        weights["wo"] = self.param("wo", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                      ("mlp", "embed")), (self.d_ff, d_model), pdtype)
        if self.activation == "gated_gelu" and self.has_variable(DECODE_WEIGHTS, "wi"):
            # A decoding step: wi_0 and wi_1 as one stacked [embed, 2, mlp] kernel, one matmul,
            # and wo as wo^T [embed, mlp] (decoding.decode_weights); the same
            # h = gelu(x wi_0) * (x wi_1), y = h wo.
            dtype = dtype_of(self.dtype)
            a, b = stacked_projections(x, self.get_variable(DECODE_WEIGHTS, "wi"), dtype)
            wo_t = self.get_variable(DECODE_WEIGHTS, "wo_t").astype(dtype)
            return jnp.einsum("...m,em->...e", gelu(a) * b, wo_t)
        drop = nn.Dropout(self.dropout_rate)
        dropout = None
        if self.dropout_rate > 0.0 and not self.deterministic:
            dropout = lambda h: nn.with_logical_constraint(  # noqa: E731
                drop(h, deterministic=False), ("batch", "length", "mlp"))
        elif self.activation != "gated_gelu":
            dropout = lambda h: nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # noqa: E731
        return feed_forward(x, weights, self.activation, dtype=dtype_of(self.dtype), dropout=dropout,
                            cpu_weight_grads=self.cpu_weight_grads)
