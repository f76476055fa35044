"""Text metrics of the `eval` stage, in pure Python: ROUGE-L and exact-match accuracy.

ROUGE-L (Lin 2004) of a prediction against a reference is the F-measure of their longest common
subsequence (LCS) over word tokens::

    P = LCS / |prediction|,   R = LCS / |reference|,   F = 2·P·R / (P + R)    (0 if either is empty)

Tokenisation (`rouge_tokens`): lowercase, then every maximal run of letters and digits is a token;
whitespace, punctuation and other symbols only separate tokens and are dropped. On ASCII text this
is exactly the `rouge-score` package's tokenizer without stemming (`[a-z0-9]+` runs after
lowercasing); unlike it, letters outside ASCII ("café", "日本") are kept rather than discarded.
No stemming is applied (MiniLLM's evaluation uses Porter stemming, so its numbers can be a little
higher on English text). Scores are fractions in [0, 1], not percentages.

Exact-match accuracy compares `normalize_answer(prediction)` with `normalize_answer(label)`:
lowercase, trim, collapse runs of whitespace to one space and strip trailing punctuation
("The answer is 8." -> "the answer is 8"); when both sides then read as decimal numbers
(`-3`, `8.0`, `1,024`, `.5`) they are compared as numbers, so "8.0" == "8" and "1,000" == "1000".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from .data.text import is_punctuation

__all__ = [
    "accuracy",
    "exact_match",
    "lcs_length",
    "normalize_answer",
    "rouge_l",
    "rouge_l_corpus",
    "rouge_tokens",
]

# A run of Unicode letters or digits: `\w` without the underscore.
_WORD = re.compile(r"[^\W_]+")
_SPACES = re.compile(r"\s+")
# An optional sign, digits (optionally grouped by thousands commas), an optional fraction.
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")


def rouge_tokens(text: str) -> list[str]:
    """Lowercased runs of letters and digits; everything else separates tokens."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by the O(|a|·|b|) dynamic programme
    `L[i][j] = L[i-1][j-1] + 1 if a_i = b_j else max(L[i-1][j], L[i][j-1])`, one row at a time."""
    if len(a) < len(b):
        a, b = b, a  # keep the row as short as the shorter sequence
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other
                           else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure `2·P·R / (P + R)` with `P = LCS/|pred|`, `R = LCS/|ref|` (module doc)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    common = lcs_length(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l_corpus(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-example ROUGE-L F-measure (the MiniLLM evaluation's averaging)."""
    _check_lengths(predictions, references)
    return _mean([rouge_l(p, r) for p, r in zip(predictions, references, strict=True)])


def normalize_answer(text: str) -> str:
    """Lowercase, trim, collapse whitespace, strip trailing punctuation (module doc)."""
    text = _SPACES.sub(" ", text.lower()).strip()
    end = len(text)
    while end and (is_punctuation(text[end - 1]) or text[end - 1].isspace()):
        end -= 1
    return text[:end]


def _as_number(text: str) -> Decimal | None:
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        return None


def exact_match(prediction: str, label: str) -> bool:
    """Equal after `normalize_answer`; equal as numbers when both sides are numbers."""
    pred, gold = normalize_answer(prediction), normalize_answer(label)
    pred_number, gold_number = _as_number(pred), _as_number(gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    return pred == gold


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction of predictions that `exact_match` their label."""
    _check_lengths(predictions, labels)
    return _mean([float(exact_match(p, g)) for p, g in zip(predictions, labels, strict=True)])


def _check_lengths(predictions: Sequence[str], golds: Sequence[str]) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} references")


def _mean(values: list[float]) -> float:
    if not values:
        raise ValueError("no examples to score")
    return sum(values) / len(values)
