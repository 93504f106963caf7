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



def test_pair_summary_compares_middle_with_front_and_back():
    arm = lambda best, good: {"best_metric": best, "beats_chance": good}  # noqa: E731
    pair = {"full": arm(0.9, True), "front": arm(0.52, False), "middle": arm(0.6, True), "back": arm(0.55, True),
            "front+middle+back": arm(0.58, True)}
    out = pt.pair_summary(pair, 0.01)
    assert out["best_placement"] == "middle" and out["middle_beats_front_and_back"]
    assert out["middle_margin_over_front_and_back"] == 0.05 and out["any_prompt_beats_chance"]
    assert out["difference_standard_error"] == round(2 ** 0.5 * 0.01, 4)
    at_chance = {v: arm(0.5, False) for v in pair}
    assert pt.pair_summary(at_chance, 0.01)["best_placement"] is None  # ties at chance rank nothing


def test_logistic_probe_reads_a_linear_signal_and_nothing_from_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 6))
    y = (x[:, 2] - 0.5 * x[:, 4] > 0).astype(int)  # a linear rule
    assert pt.logistic_accuracy(x[:600], y[:600], x[600:], y[600:]) >= 0.95
    noise = rng.integers(0, 2, size=800)  # labels independent of the features
    assert abs(pt.logistic_accuracy(x[:600], noise[:600], x[600:], noise[600:]) - 0.5) < 0.1
