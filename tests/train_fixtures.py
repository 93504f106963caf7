"""A small real-text batch source for trainer tests: ../shared/data's en->zh pairs as UTF-8
bytes (ids = byte + 3, so they fit the tiny model's 512-entry vocabulary).

It follows the trainer's data interface (cpm2_jax.datasets): `byte_pairs_dataset(config,
shard_index=, num_shards=, start_step=)` -> an iterator of this process's rows with
`state()`. Global batch n is a pure function of (split, seed, n); process i takes rows
[i*local, (i+1)*local), so any number of processes sees the same global batch.

For the kill tests, `$CPM2_TEST_PAUSE_AT_STEP` makes the iterator write
`$CPM2_TEST_PAUSE_FILE` and hang before producing that batch (the parent then SIGKILLs).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import time

import gin
import numpy as np

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
EOS, OFFSET = 1, 3


@functools.lru_cache(maxsize=4)
def _pairs(split: str) -> tuple[tuple[bytes, bytes], ...]:
    path = SHARED_DATA / f"en_zh_{split}.jsonl"
    out = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            out.append((record["en"].encode("utf-8"), record["zh"].encode("utf-8")))
    return tuple(out)


def _encode(data: bytes, length: int) -> np.ndarray:
    ids = np.zeros(length, np.int32)
    body = np.frombuffer(data[: length - 1], np.uint8).astype(np.int32) + OFFSET
    ids[: len(body)] = body
    ids[len(body)] = EOS
    return ids


class BytePairs:
    def __init__(self, config, shard_index: int = 0, num_shards: int = 1, start_step: int = 0):
        self.config = config
        self.pairs = _pairs(config.split)
        self.lengths = dict(config.task_feature_lengths)
        self.local = config.batch_size // num_shards
        self.shard_index = shard_index
        self.step = start_step
        self.order = np.random.RandomState(config.seed).permutation(len(self.pairs)) if config.shuffle \
            else np.arange(len(self.pairs))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        pause = os.environ.get("CPM2_TEST_PAUSE_AT_STEP")
        if pause is not None and self.step == int(pause):
            pathlib.Path(os.environ["CPM2_TEST_PAUSE_FILE"]).write_text(str(self.step))
            while True:
                time.sleep(1)
        first = self.step * self.config.batch_size + self.shard_index * self.local
        rows = [self.pairs[self.order[(first + r) % len(self.pairs)]] for r in range(self.local)]
        enc = np.stack([_encode(en, self.lengths["inputs"]) for en, _ in rows])
        tgt = np.stack([_encode(zh, self.lengths["targets"]) for _, zh in rows])
        dec_in = np.concatenate([np.zeros((self.local, 1), np.int32), tgt[:, :-1]], axis=1)
        self.step += 1
        return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
                "decoder_loss_weights": (tgt > 0).astype(np.float32)}

    def state(self) -> dict:
        return {"step": self.step, "split": self.config.split}


@gin.configurable(module="tests.train_fixtures")
def byte_pairs_dataset(config, *, shard_index: int = 0, num_shards: int = 1, start_step: int = 0) -> BytePairs:
    return BytePairs(config, shard_index, num_shards, start_step)
