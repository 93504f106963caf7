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


def _as_matrices(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [tokens, *in], w [*in, *out] -> x [tokens, in], w [in, out] (row-major views)."""
    in_size = math.prod(x.shape[1:])
    return x.reshape(x.shape[0], in_size), w.reshape(in_size, -1)


def _linear(x: jax.Array, w: jax.Array) -> jax.Array:
    x2, w2 = _as_matrices(x, w)
    return (x2 @ w2).reshape(x.shape[:1] + w.shape[x.ndim - 1:])


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x [tokens, *in], w [*in, *out] -> [tokens, *out], with the kernel gradient of
    `weight_grad`.

    A frozen w (not differentiated: prompt tuning's backbone) needs only dx = dy w^T, so x is
    then not kept for the backward pass (JAX tells the forward which inputs are perturbed).
    w is kept as given, not reshaped: under `nn.scan` a residual that is the layer's own
    weight slice is forwarded, while a reshaped copy would be stacked, a second backbone.
    """
    return _linear(x, w)


def _linear_fwd(x, w):
    return _linear(x.value, w.value), (x.value if w.perturbed else None, w.value)


def _linear_bwd(res, dy):
    x, w = res
    if is_symbolic_zero(dy):
        return None, None
    in_shape = w.shape[:w.ndim - (dy.ndim - 1)]
    w2, dy2 = w.reshape(math.prod(in_shape), -1), dy.reshape(dy.shape[0], -1)
    dx = (dy2 @ w2.T).reshape(dy.shape[:1] + in_shape)
    return dx, (None if x is None else weight_grad(x.reshape(x.shape[0], -1), dy2).reshape(w.shape))


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
    """x @ w for x [tokens, *in], w [*in, *out] -> [tokens, *out]: `linear` (hand-written kernel
    gradient) or plain autodiff of one dot_general over the `in` axes, as
    `use_cpu_weight_grads(cpu_weight_grads)` chooses. Same values and gradients. The kernel is
    contracted in its own shape so a frozen one is its own residual (see `linear`)."""
    if use_cpu_weight_grads(cpu_weight_grads):
        return linear(x, w)
    n = x.ndim - 1
    return jax.lax.dot_general(x, w, ((tuple(range(1, n + 1)), tuple(range(n))), ((), ())))


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
        lead = x.shape[:x.ndim - self.num_input_axes]
        y = matmul(x.astype(dtype).reshape((-1,) + tuple(in_shape)), kernel.astype(dtype), self.cpu_weight_grads)
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
