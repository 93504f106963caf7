"""Timing helpers shared by the side-by-side benchmarks (this project vs PyTorch)."""
from __future__ import annotations

import os
import time


def pin_threads(threads: int) -> int:
    """Restricts the process to `threads` cores (before jax/torch start their pools)."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    threads = min(threads or len(available), len(available))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, available[:threads])
    return threads


def timed_interleaved(fns: dict, warmup: int, reps: int) -> tuple[dict, dict]:
    """Warms each function up, then times them in turn, `reps` rounds, so that both sides
    see the same background load. Returns (first-call seconds, list of timed seconds) by name."""
    first, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
        for _ in range(warmup - 1):
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return first, times


def start_cpu_frameworks(threads: int) -> int:
    """Pins the process to `threads` cores, then starts jax (CPU) and torch with that many
    threads, so both sides of a comparison run on the same cores. Returns the thread count."""
    threads = pin_threads(threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import torch

    torch.set_num_threads(threads)
    return threads


def untied_mt5(config, lm_head_std: float = 0.05):
    """A random transformers MT5ForConditionalGeneration of `config`'s shape with its own output
    matrix, as this project's model has: transformers 5 ties MT5's head to the embedding
    whatever the config says, which would drop vocab x d_model parameters from one side."""
    import torch
    from transformers import MT5Config, MT5ForConditionalGeneration

    from cpm2_jax.convert import config_to_hf

    torch.manual_seed(0)
    model = MT5ForConditionalGeneration(MT5Config(**config_to_hf(config, dtype="float32")))
    model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model) * lm_head_std)
    model.config.tie_word_embeddings = False
    return model
