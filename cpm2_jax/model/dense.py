"""Bias-free projections and the shared token embedding, each parameter with logical axis names."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpm2_jax.config import dtype_of


def weight_grad(inputs: jax.Array, grads: jax.Array) -> jax.Array:
    """inputs^T . grads summed over all leading (token) axes: the kernel gradient of `x @ w`.

    Computed as (grads^T . inputs)^T: the same products and sums as autodiff's transpose of
    the matmul, but XLA:CPU then transposes the small [out, in] result instead of the large
    [tokens, out] gradient (which it otherwise copies, with any elementwise backward fused
    into a slow strided loop, before every weight-gradient matmul).
    """
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    return jax.lax.dot_general(flat(grads), flat(inputs), (((0,), (0,)), ((), ()))).T


def is_symbolic_zero(t) -> bool:
    """A cotangent JAX passes as a symbolic zero (custom VJPs defined with symbolic_zeros=True)."""
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x [tokens, in], w [in, out], with the kernel gradient of `weight_grad`.

    A frozen w (not differentiated: prompt tuning's backbone) needs only dx = dy w^T, so x is
    then not kept for the backward pass (JAX tells the forward which inputs are perturbed).
    """
    return x @ w


def _linear_fwd(x, w):
    return x.value @ w.value, (x.value if w.perturbed else None, w.value)


def _linear_bwd(res, dy):
    x, w = res
    if is_symbolic_zero(dy):
        return None, None
    return dy @ w.T, (None if x is None else weight_grad(x, dy))


linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


def use_cpu_weight_grads(setting: str) -> bool:
    """Whether `ModelConfig.cpu_weight_grads` ("auto" | "on" | "off") selects the hand-written
    weight-gradient VJPs: "auto" = when JAX's default backend is CPU. XLA:CPU needs them (see
    `weight_grad`); on GPU/TPU plain autodiff lets fusion and remat policies see every matmul."""
    if setting == "auto":
        return jax.default_backend() == "cpu"
    if setting not in ("on", "off"):
        raise ValueError(f"cpu_weight_grads must be 'auto', 'on' or 'off', got {setting!r}")
    return setting == "on"


def matmul(x: jax.Array, w: jax.Array, cpu_weight_grads: str = "auto") -> jax.Array:
    """x @ w for x [tokens, in], w [in, out]: `linear` (hand-written kernel gradient) or plain
    autodiff, as `use_cpu_weight_grads(cpu_weight_grads)` chooses. Same values and gradients."""
    return linear(x, w) if use_cpu_weight_grads(cpu_weight_grads) else x @ w


# The variable collection of a decoding step's stacked projection kernels (built once per
# decoding call by `decoding.decode_weights`; attention and the FFN read it when present).
DECODE_WEIGHTS = "decode_weights"


def stacked_projections(x: jax.Array, kernel: jax.Array, dtype) -> tuple[jax.Array, ...]:
    """x [..., in] times each of the n kernels stacked in `kernel` [in, n, *features], as ONE
    matmul x [tokens, in] . [in, n * prod(features)]: the n outputs [..., *features]. Each
    output is the same sum over `in` as its own projection; at batch 1 (a decoding step) one
    pass over a contiguous matrix replaces n small matrix-vector products."""
    in_size, n, features = kernel.shape[0], kernel.shape[1], kernel.shape[2:]
    lead = x.shape[:-1]
    y = x.astype(dtype).reshape(-1, in_size) @ kernel.astype(dtype).reshape(in_size, -1)
    y = y.reshape((-1, n) + features)
    return tuple(y[:, i].reshape(lead + features) for i in range(n))


def normal_init(std: float):
    """normal(0, std): the original CPM-2 code initialises every matrix with std 0.001."""
    return nn.initializers.normal(stddev=std)


class Projection(nn.Module):
    """y = x . W over the trailing `len(in_shape)` axes of x; no bias (CPM-2 has none).

    `kernel_axes` names every kernel axis (inputs first, then outputs) for partitioning;
    `cpu_weight_grads` picks the kernel-gradient VJP (`matmul`, ModelConfig.cpu_weight_grads).
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    num_input_axes: int = 1
    init_std: float = 0.001
    dtype: str = "float32"
    param_dtype: str = "float32"
    cpu_weight_grads: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        in_shape = x.shape[x.ndim - self.num_input_axes:]
        shape = tuple(in_shape) + features
        if len(self.kernel_axes) != len(shape):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not name all {len(shape)} axes of {shape}")
        kernel = self.param("kernel", nn.with_logical_partitioning(normal_init(self.init_std), tuple(self.kernel_axes)),
                            shape, dtype_of(self.param_dtype))
        dtype = dtype_of(self.dtype)
        in_size, out_size = math.prod(in_shape), math.prod(features)
        lead = x.shape[:x.ndim - self.num_input_axes]
        y = matmul(x.astype(dtype).reshape(-1, in_size), kernel.astype(dtype).reshape(in_size, out_size),
                   self.cpu_weight_grads)
        return y.reshape(lead + features)


class Embed(nn.Module):
    """The token embedding [vocab, embed], shared by encoder and decoder inputs."""

    num_embeddings: int
    features: int
    init_std: float = 0.001
    dtype: str = "float32"
    param_dtype: str = "float32"

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(normal_init(self.init_std), ("vocab", "embed")),
                                    (self.num_embeddings, self.features), dtype_of(self.param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(dtype_of(self.dtype))

    def attend(self, x: jax.Array) -> jax.Array:
        """x . embedding^T: the tied output head (`ModelConfig.tie_word_embeddings`)."""
        dtype = dtype_of(self.dtype)
        return x.astype(dtype) @ self.embedding.astype(dtype).T
