"""SeqIO data for CPM-2 (installed as `cpm2_jax.tasks`): vocabularies, span corruption, tasks, metrics.

Importing this package is cheap; `cpm2_jax.tasks.registry` registers every task and
mixture with seqio (it is imported by `cpm2_jax.tasks.pipeline`). The trainer's entry
point is `cpm2_jax.tasks.pipeline.get_batch_iterator`; where data and vocabulary come
from is set in `cpm2_jax.tasks.settings` (gin, or $CPM2_DATA_DIR / $CPM2_VOCAB).
"""
