"""The task index through the data pipeline: a mixture tags each example with its task, and
unpacked batches carry it as the `task_index` model feature (prompt row k for task k)."""
import numpy as np

from cpm2_jax.tasks import packing, streams
from cpm2_jax.trainer import MODEL_FEATURES

LENGTHS = {"inputs": 6, "targets": 3}


class _Fixed(streams.ExampleStream):
    """Endless examples whose first input token names the task (10 + k)."""

    def __init__(self, name, first):
        super().__init__(name, LENGTHS, streams.WARN_ONCE)
        self.first = first

    def next_example(self):
        self.examples += 1
        return {"inputs": np.asarray([self.first, 5, 1], np.int32), "targets": np.asarray([7, 1], np.int32)}


def test_mixture_rows_carry_their_task_index():
    mixture = streams.MixtureStream("two_prompts", [_Fixed("a", 10), _Fixed("b", 11)], [1.0, 1.0], seed=0,
                                    lengths=LENGTHS, warn=streams.WARN_ONCE)
    packer = packing.Packer(mixture, LENGTHS, pack=False)
    batch = packing.to_features([packer.next_row() for _ in range(16)], LENGTHS, pack=False)
    assert "task_index" in MODEL_FEATURES
    assert np.array_equal(batch["task_index"], batch["encoder_input_tokens"][:, 0] - 10)
    assert set(batch["task_index"].tolist()) == {0, 1}  # both tasks drawn
    packed = packing.to_features([packing.Packer(mixture, LENGTHS, pack=True).next_row()], LENGTHS, pack=True)
    assert "task_index" not in packed  # a packed row holds several examples: no single prompt
