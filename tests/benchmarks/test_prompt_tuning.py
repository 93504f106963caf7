"""benchmarks/prompt_tuning.py's bookkeeping: when an arm counts as converged, the
majority-class baseline beside the pair task's accuracy."""
import numpy as np

from benchmarks import prompt_tuning as pt


def test_converged_at_is_the_first_evaluation_within_one_percent_of_the_best():
    curve = [{"step": 10, "metric": 0.50}, {"step": 20, "metric": 0.695}, {"step": 30, "metric": 0.70},
             {"step": 40, "metric": 0.60}]
    assert pt.converged_at(curve, good=True) == 20  # 0.695 >= 0.99 * 0.70
    assert pt.converged_at(curve, good=False) is None  # an arm at chance has no convergence step


def test_majority_counts_label_rows_only():
    batch = {"decoder_target_tokens": np.array([[299, 1], [2856, 1], [299, 1], [0, 0]])}
    assert pt.majority([batch]) == (2 / 3, 3)  # the padding row is no example

