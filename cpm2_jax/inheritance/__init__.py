"""Knowledge inheritance (CPM2_FACTS "Knowledge inheritance"): a new model learns from an
existing one, by distillation inside the train step (`schedule`, `teacher`, `vocab_map`,
`topk` for precomputed teacher outputs) and by parameter reuse between CPM-2's stages
(`cpm2_jax.convert.extend_vocab`, `cpm2_jax.moe.upcycle`)."""
