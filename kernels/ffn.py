"""The fused gated-GELU expert block on rows sorted by expert (CPM2_FACTS: every expert is the
dense block's gated-GELU FFN), one custom_vjp over the whole block:

    h = gelu(x W0_g) * (x W1_g)    one kernel: the gated gmm (kernels.grouped `up=`), each x tile
                                   read once for both products, the activation in float32 before
                                   the store; a = x W0 and b = x W1 never reach memory
    y = h Wo_g                     gmm

Backward, with a and b recomputed by two gmms (the forward keeps only its inputs, no [m, d_ff]
activation):
    dh = dy Wo^T                   dWo = h^T dy            (gmm with rhs^T read in place; tgmm)
    da = dh * b * gelu'(a)         db = dh * gelu(a)
    dx = da W0^T + db W1^T         dW0 = x^T da, dW1 = x^T db

Rows in no (local) group come out as zeros, as from gmm: a = b = 0 there, so h = gelu(0) * 0 = 0.
gelu is the tanh approximation (model.feedforward.gelu, mT5's gelu_new).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from cpm2_jax.kernels.grouped import KernelConfig, _offset, gmm_forward, kernel_config, tgmm

ACTIVATION = functools.partial(jax.nn.gelu, approximate=True)
_F32 = jnp.float32


def _hidden(x, w0, w1, group_sizes, group_offset, config):
    return gmm_forward(x, w0, group_sizes, group_offset, config, up=w1, activation=ACTIVATION)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gated_ffn(x, w0, w1, wo, group_sizes, group_offset, config):
    return gmm_forward(_hidden(x, w0, w1, group_sizes, group_offset, config), wo, group_sizes, group_offset, config)


def _gated_ffn_fwd(x, w0, w1, wo, group_sizes, group_offset, config):
    out = _gated_ffn(x, w0, w1, wo, group_sizes, group_offset, config)
    return out, (x, w0, w1, wo, group_sizes, group_offset)


def _gated_ffn_bwd(config, res, dy):
    x, w0, w1, wo, sizes, offset = res
    num_groups = wo.shape[0]
    dy = dy.astype(x.dtype)
    a = gmm_forward(x, w0, sizes, offset, config).astype(_F32)
    b = gmm_forward(x, w1, sizes, offset, config).astype(_F32)
    g, gelu_vjp = jax.vjp(ACTIVATION, a)
    h = (g * b).astype(x.dtype)
    dh = gmm_forward(dy, wo, sizes, offset, config, transpose_rhs=True).astype(_F32)
    da = gelu_vjp(dh * b)[0].astype(x.dtype)
    db = (dh * g).astype(x.dtype)
    dx = (gmm_forward(da, w0, sizes, offset, config, transpose_rhs=True).astype(_F32)
          + gmm_forward(db, w1, sizes, offset, config, transpose_rhs=True).astype(_F32))

    def weight_grad(lhs, grad, like):
        return tgmm(lhs, grad, sizes, num_groups=num_groups, group_offset=offset, config=config,
                    out_dtype=like.dtype)

    return (dx.astype(x.dtype), weight_grad(x, da, w0), weight_grad(x, db, w1), weight_grad(h, dy, wo),
            None, None)


_gated_ffn.defvjp(_gated_ffn_fwd, _gated_ffn_bwd)


def gated_ffn(x: jax.Array, w0: jax.Array, w1: jax.Array, wo: jax.Array, group_sizes: jax.Array, *,
              group_offset=None, config: Optional[KernelConfig] = None) -> jax.Array:
    """x [m, d] (rows sorted by group), w0/w1 [G, d, f], wo [G, f, d] -> [m, d]:
    (gelu(x W0_g) * (x W1_g)) Wo_g per row, differentiable in x and the three weights (module
    docstring); with `group_offset` the weights hold only groups offset .. offset + G - 1."""
    if x.ndim != 2 or w0.ndim != 3 or w0.shape != w1.shape or wo.shape != (w0.shape[0], w0.shape[2], x.shape[1]) \
            or w0.shape[1] != x.shape[1]:
        raise ValueError(f"gated_ffn needs x [m, d], w0 and w1 [G, d, f], wo [G, f, d], got {x.shape}, "
                         f"{w0.shape}, {w1.shape}, {wo.shape}")
    w0, w1, wo = (w.astype(x.dtype) for w in (w0, w1, wo))
    return _gated_ffn(x, w0, w1, wo, group_sizes.astype(jnp.int32), _offset(group_offset), config or kernel_config())
