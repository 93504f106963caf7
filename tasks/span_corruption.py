"""T5 span corruption (Raffel et al. 2020, sec. 3.1.4), the CPM-2 pre-training objective.

A fraction `noise_density` (0.15) of a chunk's tokens is masked in spans of mean length
`mean_noise_span_length` (3). The input keeps the unmasked tokens with one sentinel per
masked span; the target lists each sentinel followed by the tokens it hides:

    tokens  = a b c d e f g h          (noise: c d, g)
    inputs  = a b <X0> e f <X1> h
    targets = <X0> c d <X1> g <X2>

Sentinel k is `vocab_size - 1 - k` (sentinels count down from the end of the vocabulary).
The functions here are pure numpy (exhaustively testable); `span_corruption` is the
seqio preprocessor that applies them with one deterministic seed per example.
"""
from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
import seqio
import tensorflow as tf

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def span_counts(length: int, noise_density: float = NOISE_DENSITY,
                mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of `length` tokens, as T5 rounds them.

    noise = round(length * density) clipped to [1, length - 1];
    spans = round(noise / mean_span) clipped to [1, min(noise, length - noise)].
    """
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = int(round(noise / mean_noise_span_length))
    return noise, min(max(spans, 1), noise, length - noise)


def corrupted_lengths(length: int, noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """(inputs, targets) lengths after corruption of `length` tokens, EOS included."""
    noise, spans = span_counts(length, noise_density, mean_noise_span_length)
    return length - noise + spans + 1, noise + spans + 1


def chunk_length_for(inputs_length: int, noise_density: float = NOISE_DENSITY,
                     mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """Longest raw chunk whose corrupted inputs fit `inputs_length`; returns (chunk, targets).

    Inputs 512 with density 0.15 and mean span 3 take raw chunks of 568 tokens and give
    targets of 114 tokens, within CPM-2's 256.
    """
    length = 2
    while corrupted_lengths(length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        length += 1
    return length, corrupted_lengths(length, noise_density, mean_noise_span_length)[1]


def feature_lengths_for(inputs_length: int, noise_density: float = NOISE_DENSITY,
                        mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> dict[str, int]:
    """Feature lengths of a span-corruption run (t5's `random_spans_helper`): the target
    length that full `inputs_length` examples need, EOS included.

    512 at 0.15 / 3 -> {'inputs': 512, 'targets': 114}: with CPM-2's 256, 142 of the 256
    decoder positions of every row could only ever be padding.
    """
    return {"inputs": inputs_length,
            "targets": chunk_length_for(inputs_length, noise_density, mean_noise_span_length)[1]}


def random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items cut into `parts` non-empty segments, every cut equally likely."""
    if not 1 <= parts <= total:
        raise ValueError(f"cannot cut {total} items into {parts} non-empty parts")
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    edges = np.concatenate([[0], cuts, [total]]).astype(np.int64)
    return np.diff(edges)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
    """Boolean mask: True on noise. Spans alternate kept/noise, starting with a kept span."""
    noise, spans = span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = random_partition(noise, spans, rng)
    kept_lengths = random_partition(length - noise, spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = np.tile([False, True], spans)
    return np.repeat(is_noise, interleaved)


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of `tokens` under `noise_mask`, without EOS.

    Each noise span becomes one sentinel in the inputs; each kept span becomes one in
    the targets. Span k of either kind is numbered by its order, so `<X_k>` pairs them.
    """
    tokens = np.asarray(tokens)
    mask = np.asarray(noise_mask, dtype=bool)
    return _replace_spans(tokens, mask, vocab_size), _replace_spans(tokens, ~mask, vocab_size)


def _replace_spans(tokens: np.ndarray, replace: np.ndarray, vocab_size: int) -> np.ndarray:
    """Each maximal run of `replace` -> one sentinel; the k-th run gets sentinel k.

    Masks start with a kept span and end with a noise span, so kept run k sits just
    before noise run k and both sides number their runs alike.
    """
    previous = np.concatenate([[False], replace[:-1]])
    starts = replace & ~previous
    order = np.cumsum(starts) - 1
    sentinels = vocab_size - 1 - order
    out = np.where(starts, sentinels, tokens)
    return out[~replace | starts].astype(np.int32)


def span_corrupt_example(tokens: np.ndarray, seed: np.ndarray, vocab_size: int,
                         noise_density: float = NOISE_DENSITY,
                         mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt one chunk with a numpy generator seeded by `seed` (any int array)."""
    tokens = np.asarray(tokens, dtype=np.int32)
    if tokens.size < 2:
        return tokens, np.zeros([0], np.int32)
    rng = np.random.default_rng(np.asarray(seed, dtype=np.int64).astype(np.uint64))
    mask = random_spans_noise_mask(tokens.size, rng, noise_density, mean_noise_span_length)
    return corrupt(tokens, mask, vocab_size)


# ----------------------------------------------------------------------------- seqio preprocessors


def join_and_split(dataset: tf.data.Dataset, max_tokens: int, eos_id: int, feature: str = "targets"
                   ) -> tf.data.Dataset:
    """t5's `reduce_concat_tokens` -> `split_tokens` over the whole stream: each document's
    tokens + EOS, joined across documents and cut into pieces of `max_tokens` (the last
    of the stream may be shorter)."""

    def with_eos(example):
        return {feature: tf.concat([example[feature], tf.constant([eos_id], example[feature].dtype)], axis=0)}

    return dataset.map(with_eos).unbatch().batch(max_tokens)


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature], noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
                    min_tokens: int = 2) -> tf.data.Dataset:
    """seqio preprocessor: tokenized `targets` text -> span-corrupted `inputs`/`targets` (no EOS).

    Documents are joined (EOS between them) and cut into the raw chunk length whose
    corrupted inputs plus EOS fill `sequence_length['inputs']` exactly (568 for 512).
    """
    vocabulary = output_features["inputs"].vocabulary
    vocab_size = vocabulary.vocab_size
    chunk, _ = chunk_length_for(sequence_length["inputs"], noise_density, mean_noise_span_length)
    dataset = join_and_split(dataset, chunk, vocabulary.eos_id)
    dataset = dataset.filter(lambda ex: tf.size(ex["targets"]) >= min_tokens)

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt_one(example, seed):
        inputs, targets = tf.numpy_function(
            functools.partial(_corrupt_numpy, vocab_size=vocab_size, noise_density=noise_density,
                              mean_noise_span_length=mean_noise_span_length),
            [example["targets"], seed], (tf.int32, tf.int32), stateful=False)
        inputs.set_shape([None])
        targets.set_shape([None])
        return {"inputs": inputs, "targets": targets}

    return corrupt_one(dataset)


def _corrupt_numpy(tokens, seed, *, vocab_size, noise_density, mean_noise_span_length):
    return span_corrupt_example(tokens, seed, vocab_size, noise_density, mean_noise_span_length)
