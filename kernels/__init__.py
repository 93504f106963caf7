"""Pallas kernels (installed as cpm2_jax.kernels)."""
