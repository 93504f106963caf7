"""Metrics of CPM-2's downstream tasks, in seqio's metric-function form.

`fn(targets, predictions) -> {name: value}` (or `fn(targets, scores)` for ranking),
values in percent like the paper's tables. Generation tasks report two conventions side
by side:

* the standard ones: `bleu` (sacrebleu, its Chinese tokeniser) and `rouge_l` (character
  ROUGE-L F1, whitespace ignored);
* the CPM-2 fine-tuning code's (`generation_metrics.Metric` of the release), so figures can
  be set beside the paper's tables: `bleu_cpm2` (nltk `corpus_bleu` on characters,
  whitespace included, 4-gram, smoothing method 3) and `rouge_l_cpm2` (ROUGE-L with
  beta 1.2 on characters, whitespace included). Both are computed here without nltk.

Math23K answers are computed by a small arithmetic parser, never `eval`.
"""
from __future__ import annotations

import collections
import fractions
import math
import re
from typing import Mapping, Sequence

import numpy as np


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
    """Exact-match accuracy (%), after stripping surrounding whitespace of strings."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets vs {len(predictions)} predictions")
    if not targets:
        return {"accuracy": 0.0}
    norm = lambda x: x.strip() if isinstance(x, str) else x  # noqa: E731
    hits = sum(norm(t) == norm(p) for t, p in zip(targets, predictions))
    return {"accuracy": 100.0 * hits / len(targets)}


def bleu(targets: Sequence[str], predictions: Sequence[str], tokenize: str = "zh") -> dict[str, float]:
    """Corpus BLEU (%) of predictions against one reference each (sacrebleu, `tokenize='zh'`).

    No pair at all scores 0 (sacrebleu itself raises IndexError on empty lists).
    """
    import sacrebleu

    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets vs {len(predictions)} predictions")
    if not targets:
        return {"bleu": 0.0}
    score = sacrebleu.corpus_bleu(list(predictions), [list(targets)], tokenize=tokenize)
    return {"bleu": float(score.score)}


def _ngram_counts(tokens: Sequence, n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu_method3(references: Sequence[Sequence], hypotheses: Sequence[Sequence], max_n: int = 4) -> float:
    """nltk's `corpus_bleu` (one reference each, uniform weights) with `SmoothingFunction().method3`.

    Clipped n-gram matches and counts are summed over the corpus; each sentence adds at
    least 1 to every denominator (nltk's `max(1, count)`). No unigram match scores 0.
    method3 (NIST geometric smoothing) replaces the k-th zero precision by 1 / (2^k d_n):
        BLEU = BP * exp(sum_n log(p_n) / max_n),  BP = 1 if c > r else exp(1 - r / c)  (0 when c = 0)
    """
    matches, totals = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for reference, hypothesis in zip(references, hypotheses):
        hyp_length += len(hypothesis)
        ref_length += len(reference)
        for n in range(1, max_n + 1):
            counts, ref_counts = _ngram_counts(hypothesis, n), _ngram_counts(reference, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in counts.items())
            totals[n - 1] += max(1, sum(counts.values()))
    if not hypotheses or matches[0] == 0:
        return 0.0
    if hyp_length > ref_length:
        penalty = 1.0
    elif hyp_length == 0:
        penalty = 0.0
    else:
        penalty = math.exp(1 - ref_length / hyp_length)
    logs, zeros = [], 0
    for match, total in zip(matches, totals):
        if match == 0:
            zeros += 1
            logs.append(math.log(1 / (2 ** zeros * total)))
        else:
            logs.append(math.log(match / total))
    return penalty * math.exp(math.fsum(w * x for w, x in zip([1 / max_n] * max_n, logs)))


def bleu_cpm2(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """BLEU-4 (%) as the CPM-2 fine-tuning code reports it: characters, smoothing method 3."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets vs {len(predictions)} predictions")
    return {"bleu_cpm2": 100.0 * corpus_bleu_method3([list(t) for t in targets], [list(p) for p in predictions])}


def translation_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """WMT20 en-zh and en_zh: sacrebleu `zh` BLEU beside the CPM-2 convention."""
    return {**bleu(targets, predictions), **bleu_cpm2(targets, predictions)}


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_f(reference: str, prediction: str, beta: float = 1.0) -> float:
    """Character ROUGE-L F (Lin 2004): P = LCS/|pred|, R = LCS/|ref|, F = (1+b^2)PR/(R+b^2 P).

    Whitespace is ignored, so Chinese and English are both compared character by character.
    """
    ref = [c for c in reference if not c.isspace()]
    pred = [c for c in prediction if not c.isspace()]
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean character-level ROUGE-L F1 (%) over examples (whitespace ignored)."""
    if not targets:
        return {"rouge_l": 0.0}
    return {"rouge_l": 100.0 * float(np.mean([rouge_l_f(t, p) for t, p in zip(targets, predictions)]))}


def rouge_l_cpm2_f(reference: str, prediction: str, beta: float = 1.2) -> float:
    """The release's `calc_rouge_l`: characters (whitespace kept), P = LCS/max(|pred|, 1e-10),
    R = LCS/|ref|, F = (1+b^2)PR/(R+b^2 P) with b = 1.2, 0 when P or R is 0 (or |ref| = 0)."""
    if not reference:
        return 0.0
    lcs = lcs_length(list(reference), list(prediction))
    precision, recall = lcs / max(len(prediction), 1e-10), lcs / len(reference)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / float(recall + beta**2 * precision)


def rouge_l_cpm2(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L (%) as the CPM-2 fine-tuning code reports it (beta 1.2, characters)."""
    if not targets:
        return {"rouge_l_cpm2": 0.0}
    return {"rouge_l_cpm2": 100.0 * float(np.mean([rouge_l_cpm2_f(t, p) for t, p in zip(targets, predictions)]))}


def summary_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """LCSTS and man_summary_zh: ROUGE-L F1 beside the CPM-2 convention."""
    return {**rouge_l(targets, predictions), **rouge_l_cpm2(targets, predictions)}


def distinct_n(predictions: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct character n-grams / all n-grams, over the corpus (%)."""
    grams = collections.Counter()
    for text in predictions:
        chars = [c for c in text if not c.isspace()]
        grams.update(tuple(chars[i:i + n]) for i in range(len(chars) - n + 1))
    total = sum(grams.values())
    return 100.0 * len(grams) / total if total else 0.0


def generation_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """AdGen: BLEU (both conventions) plus Distinct-1/2/4 of the predictions."""
    out = translation_metrics(targets, predictions)
    out.update({f"distinct_{n}": distinct_n(predictions, n) for n in (1, 2, 4)})
    return out


def mean_reciprocal_rank(targets: Sequence[Mapping], scores: Sequence[float]) -> dict[str, float]:
    """MRR (%): per query, 1/rank of the best-ranked relevant document by descending score.

    `targets[i]` is `{"qid": ..., "relevant": bool}` for the i-th (query, document) pair;
    queries without a relevant document are left out. Ties rank in input order.
    """
    by_query: dict[str, list[tuple[float, int, bool]]] = collections.defaultdict(list)
    for order, (target, score) in enumerate(zip(targets, scores)):
        by_query[str(target["qid"])].append((-float(score), order, bool(target["relevant"])))
    reciprocal = []
    for rows in by_query.values():
        ranked = sorted(rows)
        ranks = [rank for rank, (_, _, relevant) in enumerate(ranked, start=1) if relevant]
        if ranks:
            reciprocal.append(1.0 / ranks[0])
    return {"mrr": 100.0 * float(np.mean(reciprocal)) if reciprocal else 0.0}


# ----------------------------------------------------------------------------- Math23K


class ExpressionError(ValueError):
    """Text that is not an arithmetic expression of the Math23K kind."""


_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?%?)|(\*\*|[-+*/^()\[\]]))")


def tokenize_expression(text: str) -> list[str]:
    """Numbers (decimals, percentages) and operators; anything else is an error."""
    text = text.replace("×", "*").replace("÷", "/").replace("（", "(").replace("）", ")").strip()
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ExpressionError(f"unexpected {text[position:position + 8]!r} in {text!r}")
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    return tokens


def evaluate_expression(text: str) -> fractions.Fraction:
    """Exact value of an arithmetic expression: + - * / ^ (or **), brackets, unary minus, `n%`.

    Grammar (recursive descent, so no `eval`):
        expr   := term (('+'|'-') term)*
        term   := unary (('*'|'/') unary)*
        unary  := '-' unary | '+' unary | power
        power  := atom (('^'|'**') unary)?          (right-associative)
        atom   := number | '(' expr ')' | '[' expr ']' | number '(' expr ')'  (mixed number: 3(1/2) = 3 + 1/2)
    """
    tokens = tokenize_expression(text)
    if not tokens:
        raise ExpressionError("empty expression")
    position = 0

    def peek():
        return tokens[position] if position < len(tokens) else None

    def take(expected=None):
        nonlocal position
        token = peek()
        if token is None or (expected is not None and token != expected):
            raise ExpressionError(f"expected {expected or 'a token'} at token {position} of {text!r}")
        position += 1
        return token

    def number(token: str) -> fractions.Fraction:
        if token.endswith("%"):
            return fractions.Fraction(token[:-1]) / 100
        return fractions.Fraction(token)

    def atom():
        token = take()
        if token in ("(", "["):
            value = expr()
            take(")" if token == "(" else "]")
            return value
        if token[0].isdigit():
            value = number(token)
            if peek() == "(" and not token.endswith("%"):
                take("(")
                fraction = expr()
                take(")")
                return value + fraction
            return value
        raise ExpressionError(f"unexpected {token!r} in {text!r}")

    def power():
        base = atom()
        if peek() in ("^", "**"):
            take()
            exponent = unary()
            if exponent.denominator != 1 or abs(exponent) > 64:
                raise ExpressionError(f"unsupported exponent {exponent} in {text!r}")
            return base ** int(exponent)
        return base

    def unary():
        if peek() == "-":
            take()
            return -unary()
        if peek() == "+":
            take()
            return unary()
        return power()

    def term():
        value = unary()
        while peek() in ("*", "/"):
            operator = take()
            right = unary()
            if operator == "*":
                value *= right
            elif right == 0:
                raise ExpressionError(f"division by zero in {text!r}")
            else:
                value /= right
        return value

    def expr():
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    result = expr()
    if position != len(tokens):
        raise ExpressionError(f"trailing {tokens[position]!r} in {text!r}")
    return result


def equation_value(text: str) -> fractions.Fraction | None:
    """Value of `x=...` or a bare expression; None when it does not parse."""
    body = text.strip()
    if body[:2].lower() == "x=":
        body = body[2:]
    try:
        return evaluate_expression(body)
    except (ExpressionError, ZeroDivisionError, OverflowError, ValueError):
        return None


def math_answer_accuracy(targets: Sequence[Mapping], predictions: Sequence[str],
                         tolerance: float = 1e-4) -> dict[str, float]:
    """Math23K (%): predicted equation's value equals the gold answer (relative tolerance).

    `targets[i]` is `{"equation": str, "answer": str}`; the answer string may itself be
    an expression such as `3(1/2)` or `25%`. Also reports exact equation match.
    """
    if not targets:
        return {"answer_accuracy": 0.0, "equation_accuracy": 0.0}
    correct = exact = 0
    for target, prediction in zip(targets, predictions):
        gold = equation_value(target["answer"]) if target.get("answer") else None
        if gold is None:
            gold = equation_value(target["equation"])
        value = equation_value(prediction)
        if gold is not None and value is not None:
            correct += abs(float(value) - float(gold)) <= tolerance * max(1.0, abs(float(gold)))
        exact += prediction.replace(" ", "") == target["equation"].replace(" ", "")
    return {"answer_accuracy": 100.0 * correct / len(targets), "equation_accuracy": 100.0 * exact / len(targets)}
