"""SeqIO tasks, vocabularies and metrics for CPM-2 (installed as cpm2_jax.tasks)."""
