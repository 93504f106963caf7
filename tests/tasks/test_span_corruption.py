"""Span corruption: exhaustive structure checks on small lengths, statistics over many examples."""
import numpy as np
import pytest
import tensorflow as tf

from cpm2_jax.tasks import span_corruption as S

VOCAB = 1000


def _spans(mask):
    """(is_noise, length) runs of a boolean mask."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((bool(mask[start]), i - start))
            start = i
    return runs


def _reconstruct(inputs, targets):
    """Undo the corruption: replace each input sentinel by the tokens after it in targets."""
    pieces, current = {}, None
    for token in targets:
        if token >= VOCAB - 100:
            current = VOCAB - 1 - token
            pieces[current] = []
        else:
            pieces[current].append(token)
    out = []
    for token in inputs:
        out += pieces[VOCAB - 1 - token] if token >= VOCAB - 100 else [token]
    return out


@pytest.mark.parametrize("length", range(2, 80))
def test_mask_structure_every_small_length(length):
    noise, spans = S.span_counts(length)
    for seed in range(25):
        mask = S.random_spans_noise_mask(length, np.random.default_rng(seed))
        runs = _spans(mask)
        assert mask.shape == (length,) and mask.sum() == noise
        assert runs[0][0] is False and runs[-1][0] is True  # starts kept, ends with noise
        assert sum(1 for is_noise, _ in runs if is_noise) == spans
        tokens = np.arange(length, dtype=np.int32)
        inputs, targets = S.corrupt(tokens, mask, VOCAB)
        assert _reconstruct(inputs.tolist(), targets.tolist()) == tokens.tolist()
        assert (len(inputs) + 1, len(targets) + 1) == S.corrupted_lengths(length)


def test_sentinels_count_down_from_end_of_vocabulary():
    tokens = np.arange(10, 18, dtype=np.int32)  # a b c d e f g h
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 0], bool)
    inputs, targets = S.corrupt(tokens, mask, VOCAB)
    assert inputs.tolist() == [10, 11, VOCAB - 1, 14, 15, VOCAB - 2, 17]
    assert targets.tolist() == [VOCAB - 1, 12, 13, VOCAB - 2, 16, VOCAB - 3]


def test_noise_density_and_mean_span_length_statistics():
    rng = np.random.default_rng(0)
    noise = spans = total = 0
    span_lengths = []
    for _ in range(2000):
        length = int(rng.integers(100, 600))
        mask = S.random_spans_noise_mask(length, rng)
        runs = [n for is_noise, n in _spans(mask) if is_noise]
        noise += mask.sum()
        total += length
        spans += len(runs)
        span_lengths += runs
    assert abs(noise / total - 0.15) < 0.002
    assert abs(noise / spans - 3.0) < 0.05
    # Span lengths vary (random partition), not all equal to the mean.
    assert min(span_lengths) == 1 and max(span_lengths) > 6


def test_cpm2_lengths():
    # Inputs 512 (EOS included) take 568 raw tokens; targets need 114 of the 256 slots.
    assert S.chunk_length_for(512) == (568, 114)
    assert S.corrupted_lengths(568)[0] <= 512 < S.corrupted_lengths(569)[0]


def test_random_partition_is_uniform_over_compositions():
    counts = {}
    rng = np.random.default_rng(1)
    for _ in range(6000):
        key = tuple(S.random_partition(5, 3, rng))
        counts[key] = counts.get(key, 0) + 1
    # C(4, 2) = 6 compositions of 5 into 3 positive parts, each ~1000 times.
    assert len(counts) == 6 and all(800 < c < 1200 for c in counts.values())
    with pytest.raises(ValueError):
        S.random_partition(2, 3, rng)


def test_same_seed_same_corruption():
    tokens = np.arange(300)
    a = S.span_corrupt_example(tokens, np.array([3, 4]), VOCAB)
    b = S.span_corrupt_example(tokens, np.array([3, 4]), VOCAB)
    c = S.span_corrupt_example(tokens, np.array([3, 5]), VOCAB)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_join_and_split_concatenates_documents_with_eos():
    ds = tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant([list(range(2, 9)), [9]])})
    ds = ds.map(lambda ex: {"targets": ex["targets"]})
    chunks = [x["targets"].tolist() for x in S.join_and_split(ds, 3, eos_id=1).as_numpy_iterator()]
    assert chunks == [[2, 3, 4], [5, 6, 7], [8, 1, 9], [1]]


def test_feature_lengths_match_t5_random_spans_helper():
    """t5's `random_spans_helper` (inputs 512, 0.15, 3, one sentinel per span each side) gives
    tokens_length 568 and targets_length 114; this is its loop, written out."""

    def t5_lengths(tokens_length):
        noise = int(round(tokens_length * 0.15))
        spans = int(round(noise / 3.0))
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = 512
    while t5_lengths(tokens_length + 1)[0] <= 512:
        tokens_length += 1
    assert (tokens_length, t5_lengths(tokens_length)[1]) == (568, 114)
    assert S.feature_lengths_for(512) == {"inputs": 512, "targets": 114}
    assert S.feature_lengths_for(1024)["targets"] == S.chunk_length_for(1024)[1]
