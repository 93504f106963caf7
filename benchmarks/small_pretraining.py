"""Pre-training a small CPM-2 on ../shared/data, shared by the benchmarks that need a trained
model: knowledge_inheritance (the teacher and both students) and prompt_tuning (the backbone).

Span corruption on the bilingual mixture (`cpm2_pretrain_bilingual`, Chinese:English 2:1),
the vocabulary the data tasks use (rounded up to a multiple of 128 for the model), AdamW
(CPM2_FACTS "Pre-training") and one mesh axis `data` of size 1: a CPU run.

Importable both as `benchmarks.small_pretraining` and, from a script in benchmarks/, as
`small_pretraining`; it imports nothing from the benchmarks' report module.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

TASK = "cpm2_pretrain_bilingual"


def model_vocab_size() -> int:
    """The data tasks' vocabulary size rounded up to a multiple of 128 (the model's vocab_size)."""
    from cpm2_jax.tasks.settings import default_vocabulary

    return -(-default_vocabulary().vocab_size // 128) * 128


def small_config(d_model: int, layers: int, *, vocab_size: Optional[int] = None, **overrides):
    """The `tiny` layout at `layers` encoder + `layers` decoder layers of width `d_model`
    (d_ff = 2 d_model, 4 heads of d_model / 4), no dropout, with room for the vocabulary."""
    from cpm2_jax.config import get_config

    fields = dict(vocab_size=vocab_size or model_vocab_size(), d_model=d_model, d_ff=2 * d_model, num_heads=4,
                  head_dim=d_model // 4, num_encoder_layers=layers, num_decoder_layers=layers, dropout_rate=0.0)
    return get_config("tiny").replace(**{**fields, **overrides})


def make_trainer(model_config, *, steps: int, learning_rate: float, warmup_steps: int = 1000,
                 schedule: str = "noam", b2: float = 0.999, weight_decay: float = 0.01,
                 trainable: Optional[Sequence[str]] = None, seed: int = 0):
    """A one-device Trainer with AdamW at `learning_rate` under `schedule` for a run of `steps`."""
    from cpm2_jax.optim import OptimizerConfig
    from cpm2_jax.partitioning import make_mesh
    from cpm2_jax.trainer import Trainer, TrainerConfig

    opt = OptimizerConfig(learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps, b2=b2,
                          weight_decay=weight_decay)
    return Trainer(model_config, TrainerConfig(optimizer=opt, trainable=trainable, seed=seed),
                   make_mesh({"data": 1}), total_steps=steps)


def batches(task: str, split: str, lengths: dict, batch_size: int, *, seed: int = 0, shuffle: Optional[bool] = None,
            pack: bool = True, epochs: Optional[int] = None):
    """The task's batch source (shuffled for training unless `shuffle` says otherwise)."""
    from cpm2_jax import datasets

    cfg = datasets.DatasetConfig(task, lengths, split=split, batch_size=batch_size,
                                 shuffle=split == "train" if shuffle is None else shuffle, seed=seed, pack=pack,
                                 num_epochs=epochs)
    return datasets.get_dataset(cfg)


def close(source) -> None:
    """Stops a batch source's background reader, if it has one."""
    stop = getattr(source, "close", None)
    if callable(stop):
        stop()


def take(source, limit: int) -> list:
    """Up to `limit` batches of `source` (fewer when a one-epoch source ends), then closes it."""
    out = []
    for batch in source:
        out.append(batch)
        if len(out) >= limit:
            break
    close(source)
    return out


def pretrain(trainer, source, steps: int, *, state=None, log: Optional[Callable[[str], None]] = None,
             log_every: int = 0):
    """`steps` train steps of `trainer` on `source` from `state` (a fresh init when None);
    returns (state, the last step's metrics as floats)."""
    import jax

    state = trainer.init_state() if state is None else state
    metrics, start = {}, time.perf_counter()
    for step in range(1, steps + 1):
        state, metrics = trainer.train_step(state, trainer.shard_batch(next(source)))
        if log is not None and log_every and step % log_every == 0:
            log(f"pre-training step {step}/{steps}: loss {float(metrics['loss']):.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}
