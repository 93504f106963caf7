"""CPM-2 in JAX/Flax."""
