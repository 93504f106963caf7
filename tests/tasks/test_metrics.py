"""Metrics on hand-checked cases."""
import fractions
import math

import pytest

from cpm2_jax.tasks import metrics as M


def test_accuracy():
    assert M.accuracy(["一", "二", "三", "四"], ["一", "二 ", "四", "四"]) == {"accuracy": 75.0}
    with pytest.raises(ValueError):
        M.accuracy(["a"], [])


def test_bleu_chinese_tokenisation():
    assert M.bleu(["我爱北京天安门"], ["我爱北京天安门"])["bleu"] == pytest.approx(100.0)
    # Hand check: 'zh' splits Chinese into characters. Reference 我 爱 北 京 (4 chars),
    # hypothesis 我 爱 北 京 天 (5 chars): precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty.
    expected = 100 * math.exp(sum(math.log(p) for p in (4 / 5, 3 / 4, 2 / 3, 1 / 2)) / 4)
    assert M.bleu(["我爱北京"], ["我爱北京天"])["bleu"] == pytest.approx(expected, abs=1e-6)
    assert M.bleu(["我爱北京"], ["你好"])["bleu"] == pytest.approx(0.0)


def test_rouge_l_characters():
    # LCS("我爱北京天安门", "我在北京天安门广场") = 我北京天安门 = 6; P = 6/9, R = 6/7.
    p, r = 6 / 9, 6 / 7
    assert M.rouge_l_f("我爱北京天安门", "我在北京天安门广场") == pytest.approx(2 * p * r / (p + r))
    assert M.rouge_l(["abc", "abc"], ["abc", "xyz"]) == {"rouge_l": pytest.approx(50.0)}
    assert M.rouge_l_f("你好", "") == 0.0
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4


def test_distinct_n():
    # 'aab' 'ab': unigrams a,a,b,a,b -> 2 distinct / 5; bigrams aa,ab,ab -> 2 / 3.
    assert M.distinct_n(["aab", "ab"], 1) == pytest.approx(40.0)
    assert M.distinct_n(["aab", "ab"], 2) == pytest.approx(200 / 3)
    assert M.distinct_n(["a"], 2) == 0.0
    assert set(M.generation_metrics(["好看"], ["好看"])) == {"bleu", "bleu_cpm2", "distinct_1", "distinct_2", "distinct_4"}


def test_mean_reciprocal_rank():
    targets = [{"qid": "q1", "relevant": False}, {"qid": "q1", "relevant": True},
               {"qid": "q2", "relevant": True}, {"qid": "q2", "relevant": False},
               {"qid": "q3", "relevant": False}]
    scores = [-0.1, -0.5, -2.0, -3.0, 0.0]
    # q1: relevant doc ranked 2nd -> 1/2; q2: 1st -> 1; q3 has no relevant doc -> left out.
    assert M.mean_reciprocal_rank(targets, scores) == {"mrr": pytest.approx(75.0)}


@pytest.mark.parametrize("text, value", [
    ("1+2*3", 7), ("(1+2)*3", 9), ("2^3^2", 512), ("-3+5", 2), ("10/4", fractions.Fraction(5, 2)),
    ("20*(1-25%)", 15), ("3(1/2)", fractions.Fraction(7, 2)), ("[2+3]*2", 10), ("2**3", 8),
    ("1.5*4", 6), ("（3+1）×2÷4", 2), ("-(2-5)", 3),
])
def test_expression_parser(text, value):
    assert M.evaluate_expression(text) == value


@pytest.mark.parametrize("text", ["__import__('os')", "1+", "2/0", "(1+2", "1 2", "abs(3)", "", "2^(1/2)"])
def test_expression_parser_rejects(text):
    with pytest.raises((M.ExpressionError, ZeroDivisionError)):
        M.evaluate_expression(text)


def test_math_answer_accuracy():
    targets = [{"equation": "(11-1)*2", "answer": "20"}, {"equation": "1/3", "answer": "(1/3)"},
               {"equation": "5*5", "answer": "25"}, {"equation": "7", "answer": ""}]
    predictions = ["2*(11-1)", "x=1/3", "os.system('x')", "3+4"]
    out = M.math_answer_accuracy(targets, predictions)
    assert out["answer_accuracy"] == pytest.approx(75.0)
    assert out["equation_accuracy"] == pytest.approx(0.0)
    assert M.equation_value("x=6/4") == fractions.Fraction(3, 2)
    assert M.equation_value("not math") is None


PAIRS = [  # (reference, prediction): Chinese, English, placeholders, partial and no overlap
    ("我爱北京天安门", "我在北京天安门广场"),
    ("文件 %s 不存在\n", "文件%s不存在"),
    ("无法打开设备", "无法打开"),
    ("Permission denied", "permission denied!"),
    ("打开", "关闭窗口"),
    ("选项：一", "一"),
]


def test_bleu_cpm2_matches_nltk_corpus_bleu_method3():
    translate = pytest.importorskip("nltk.translate.bleu_score")
    smoothing = translate.SmoothingFunction().method3
    for pairs in (PAIRS, PAIRS[:1], PAIRS[4:5], PAIRS[1:4], [("短", "短句子很长")]):
        refs, preds = [r for r, _ in pairs], [p for _, p in pairs]
        expected = translate.corpus_bleu([[list(r)] for r in refs], [list(p) for p in preds],
                                         smoothing_function=smoothing)
        assert M.bleu_cpm2(refs, preds)["bleu_cpm2"] == pytest.approx(100 * expected, abs=1e-6), pairs
    assert M.bleu_cpm2([], []) == {"bleu_cpm2": 0.0}


def _released_rouge_l(reference, prediction, beta=1.2):
    """The CPM-2 release's `Metric.calc_rouge_l` for one (reference, prediction) pair, as written there."""
    ref, hyp = list(reference), list(prediction)
    lengths = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            lengths[i][j] = lengths[i - 1][j - 1] + 1 if ref[i - 1] == hyp[j - 1] else max(
                lengths[i - 1][j], lengths[i][j - 1])
    lcs = lengths[-1][-1]
    prec, rec = lcs / max(len(hyp), 1e-10), lcs / len(ref)
    return ((1 + beta**2) * prec * rec) / float(rec + beta**2 * prec) if prec != 0 and rec != 0 else 0.0


def test_rouge_l_cpm2_matches_the_released_computation_and_rouge_l_f1_matches_rouge_score():
    refs, preds = [r for r, _ in PAIRS], [p for _, p in PAIRS]
    expected = 100 * sum(_released_rouge_l(r, p) for r, p in PAIRS) / len(PAIRS)
    assert M.rouge_l_cpm2(refs, preds)["rouge_l_cpm2"] == pytest.approx(expected, abs=1e-6)
    scorer = pytest.importorskip("rouge_score.rouge_scorer")
    # rouge-score on space-separated non-space characters is character ROUGE-L F1.
    rouge = scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
    f1 = [rouge.score(r, p)["rougeL"].fmeasure for r, p in PAIRS]
    assert M.rouge_l(refs, preds)["rouge_l"] == pytest.approx(100 * sum(f1) / len(f1), abs=1e-6)
    assert set(M.summary_metrics(refs, preds)) == {"rouge_l", "rouge_l_cpm2"}


class _CharTokenizer:
    def tokenize(self, text):
        return [c for c in text if not c.isspace()]


def test_empty_corpora_score_zero():
    assert M.bleu([], []) == {"bleu": 0.0}
    assert M.translation_metrics([], []) == {"bleu": 0.0, "bleu_cpm2": 0.0}
