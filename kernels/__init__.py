"""Pallas kernels for the MoE hot path (installed as cpm2_jax.kernels): the grouped matmul
(gmm, tgmm, a custom_vjp joining them; Mosaic TPU and Triton GPU lowerings, interpret mode on
CPU) and the token permutation around it."""
from cpm2_jax.kernels.grouped import DEFAULT_BLOCKS, LOWERINGS, Blocks, KernelConfig, gmm, kernel_config, tgmm

__all__ = ["DEFAULT_BLOCKS", "LOWERINGS", "Blocks", "KernelConfig", "gmm", "kernel_config", "tgmm"]
