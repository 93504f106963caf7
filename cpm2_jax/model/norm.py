"""Pre-norm RMSNorm (T5 LayerNorm): no bias, no mean subtraction, eps 1e-6, float32 statistics."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import dtype_of


def _rms_norm(x: jax.Array, scale: jax.Array, epsilon: float, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(variance + epsilon)
    return (y * scale.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm_slim(x, scale, epsilon, dtype):
    return _rms_norm(x, scale, epsilon, dtype)


def _rms_norm_fwd(x, scale, epsilon, dtype):
    return _rms_norm(x, scale, epsilon, dtype), (x, scale)


def _rms_norm_bwd(epsilon, dtype, res, dy):
    # The forward's float32 copies of x are recomputed from x (in its own dtype) instead of
    # kept: the same operations as autodiff, so the same gradients, at a quarter of the
    # residual bytes for a bfloat16 x.
    x, scale = res
    return jax.vjp(lambda a, b: _rms_norm(a, b, epsilon, dtype), x, scale)[1](dy)


_rms_norm_slim.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float = 1e-6, dtype=None) -> jax.Array:
    """y = scale * x / sqrt(mean(x^2) + eps), statistics in float32 whatever x's dtype.

    A pure function so that expert blocks (MoE) and the router can call it with weights
    passed in. For the backward pass it keeps x alone (float32 statistics recomputed).
    """
    return _rms_norm_slim(x, scale, float(epsilon), jnp.dtype(dtype or x.dtype))


class RMSNorm(nn.Module):
    """RMSNorm with a learned `scale` on the `embed` axis."""

    epsilon: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), dtype_of(self.param_dtype))
        return rms_norm(x, scale, self.epsilon, dtype_of(self.dtype))
