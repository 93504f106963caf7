"""Rows -> model features equal seqio's EncDecFeatureConverter; packing keeps whole examples."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from cpm2_jax.tasks import packing

LENGTHS = {"inputs": 12, "targets": 6}


class _Examples:
    """A stream of fixed examples (inputs/targets with EOS), as streams.ExampleStream yields."""

    def __init__(self, examples):
        self._examples, self.examples = [dict(e) for e in examples], 0

    def next_example(self):
        if self.examples == len(self._examples):
            raise StopIteration
        self.examples += 1
        return self._examples[self.examples - 1]


def _example(n_in, n_tgt, start):
    return {"inputs": np.asarray(list(range(start, start + n_in - 1)) + [1], np.int32),
            "targets": np.asarray(list(range(start + 50, start + 50 + n_tgt - 1)) + [1], np.int32)}


EXAMPLES = [_example(5, 3, 10), _example(6, 2, 20), _example(12, 6, 30), _example(3, 4, 40), _example(2, 2, 60)]


def _seqio_features(examples, pack):
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})
    converter = seqio.EncDecFeatureConverter(pack=pack)
    return list(converter(dataset, LENGTHS).as_numpy_iterator())


@pytest.mark.parametrize("pack", [False, True])
def test_features_equal_seqio_converter(pack):
    packer = packing.Packer(_Examples(EXAMPLES), LENGTHS, pack)
    rows = []
    while True:
        try:
            rows.append(packer.next_row())
        except StopIteration:
            break
    ours = packing.to_features(rows, LENGTHS, pack)
    theirs = _seqio_features(EXAMPLES, pack)
    assert len(theirs) == len(rows) == (3 if pack else 5)
    for r, row in enumerate(theirs):
        assert sorted(row) == sorted(ours)
        for key, value in row.items():
            assert np.array_equal(ours[key][r], value), (key, r, ours[key][r], value)


def test_pending_example_survives_state_and_restore():
    packer = packing.Packer(_Examples(EXAMPLES), LENGTHS, pack=True)
    first = packer.next_row()
    assert [len(e["inputs"]) for e in first] == [5, 6]  # the 12-token example waits for the next row
    state = packer.state()
    assert state["pending"]["inputs"] == EXAMPLES[2]["inputs"].tolist()
    again = packing.Packer(_Examples(EXAMPLES[3:]), LENGTHS, pack=True)
    again.restore(state)
    straight = [packer.next_row(), packer.next_row()]
    resumed = [again.next_row(), again.next_row()]
    assert all(np.array_equal(a[k], b[k]) for x, y in zip(straight, resumed) for a, b in zip(x, y) for k in a)
