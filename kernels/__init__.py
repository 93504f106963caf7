"""Pallas kernels for the MoE hot path (installed as cpm2_jax.kernels): the grouped matmul
(gmm, tgmm, a custom_vjp joining them; Mosaic TPU and Triton GPU lowerings, interpret mode on
CPU), the fused gated-GELU expert block on top of it (ffn.gated_ffn), and the token
permutation around it (permutation.permute / combine)."""
from cpm2_jax.kernels.ffn import gated_ffn
from cpm2_jax.kernels.grouped import DEFAULT_BLOCKS, LOWERINGS, Blocks, KernelConfig, gmm, kernel_config, tgmm

__all__ = ["DEFAULT_BLOCKS", "LOWERINGS", "Blocks", "KernelConfig", "gated_ffn", "gmm", "kernel_config", "tgmm"]
