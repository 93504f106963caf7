"""Per-expert loops for the batched ([E, M, d]) expert computation on XLA:CPU.

Same arithmetic as the batched dot of `grouped_matmul`, organised for a CPU's caches: one
expert's rows (a [M, d] tile) go through its whole block while they are in cache, instead of
each product and elementwise step sweeping all E experts' [E, M, d_ff] buffers. Measured on
the 2-core CPU for 32 experts x [256, 512] x [512, 1024] (benchmarks/moe_dispatch.py and the
commit log): the loop of 2-D products ran the forward and input-gradient products ~25% faster
than the batched dot, and looping the whole gated-GELU block (its RMSNorm scale included)
another ~3% faster than looping each product. Used only where the experts are not split over
devices (a loop would slice the sharded `expert` axis); see `grouped_matmul.use_expert_loop`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cpm2_jax.model.feedforward import gated_gelu_grads, gelu


# ---------------------------------------------------------------------------------------------
# One product: y_e = x_e W_e
# ---------------------------------------------------------------------------------------------

@jax.custom_vjp
def looped_matmul(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """[E, M, K] x [E, K, N] -> [E, M, N], one 2-D product per expert."""
    return jax.lax.map(lambda pair: pair[0] @ pair[1], (lhs, rhs))


def _looped_matmul_fwd(lhs, rhs):
    return looped_matmul(lhs, rhs), (lhs, rhs)


def _looped_matmul_bwd(res, dy):
    lhs, rhs = res
    dlhs = jax.lax.map(lambda pair: pair[0] @ pair[1].T, (dy, rhs))
    # dW_e = x_e^T dy_e for all experts: one batched dot contracting the rows (as fast as a loop).
    drhs = jax.lax.dot_general(lhs, dy, (((1,), (1,)), ((0,), (0,))))
    return dlhs, drhs


looped_matmul.defvjp(_looped_matmul_fwd, _looped_matmul_bwd)


# ---------------------------------------------------------------------------------------------
# The whole expert block: y_e = (gelu((x_e s_e) W0_e) * ((x_e s_e) W1_e)) Wo_e
# ---------------------------------------------------------------------------------------------

def _scaled(rows, scale, dtype):
    """x s, in float32 (RMSNorm arithmetic), then in the matmuls' dtype."""
    return (rows.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def _expert_forward(rows, scale, wi_0, wi_1, wo):
    xs = _scaled(rows, scale, wi_0.dtype)
    a, b = xs @ wi_0, xs @ wi_1
    return (gelu(a) * b) @ wo, a, b


@jax.custom_vjp
def looped_gated_gelu(rows: jax.Array, scale: jax.Array, wi_0: jax.Array, wi_1: jax.Array,
                      wo: jax.Array) -> jax.Array:
    """rows [E, M, d] through expert e's scaled gated-GELU block: scale [E, d] (the expert's
    RMSNorm scale), wi_* [E, d, f], wo [E, f, d]. Saves only the pre-activations a, b."""
    return jax.lax.map(lambda p: _expert_forward(*p)[0], (rows, scale, wi_0, wi_1, wo))


def _looped_gated_gelu_fwd(rows, scale, wi_0, wi_1, wo):
    out, a, b = jax.lax.map(lambda p: _expert_forward(*p), (rows, scale, wi_0, wi_1, wo))
    return out, (rows, scale, wi_0, wi_1, wo, a, b)


def _expert_backward(p):
    rows, scale, wi_0, wi_1, wo, a, b, dy = p
    xs = _scaled(rows, scale, wi_0.dtype)
    dxs, dwi_0, dwi_1, dwo = gated_gelu_grads(xs, wi_0, wi_1, wo, a, b, dy.astype(wo.dtype))
    dxs = dxs.astype(jnp.float32)
    d_rows = (dxs * scale.astype(jnp.float32)).astype(rows.dtype)
    d_scale = jnp.sum(dxs * rows.astype(jnp.float32), axis=0).astype(scale.dtype)
    return d_rows, d_scale, dwi_0, dwi_1, dwo


def _looped_gated_gelu_bwd(res, dy):
    return jax.lax.map(_expert_backward, res + (dy,))


looped_gated_gelu.defvjp(_looped_gated_gelu_fwd, _looped_gated_gelu_bwd)
