"""kdspec.metrics: ROUGE-L against hand-computed LCS values and the rouge-score package;
exact-match normalisation case by case."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdspec.metrics import (
    accuracy,
    exact_match,
    lcs_length,
    normalize_answer,
    rouge_l,
    rouge_l_corpus,
    rouge_tokens,
)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a b c d e", "a c e", 3),
        ("a b c", "c b a", 1),
        ("x y z", "p q", 0),
        ("a b a b", "b a b a", 3),  # "b a b" (or "a b a")
        ("a b c b d a b", "b d c a b a", 4),  # CLRS's example: "b c b a"
        ("", "a b", 0),
    ],
)
def test_lcs_length_by_hand(a, b, expected):
    assert lcs_length(a.split(), b.split()) == expected
    assert lcs_length(b.split(), a.split()) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # LCS "the cat on the mat" = 5 of 6 on both sides: P = R = F = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # LCS 2 ("police killed" or "the gunman") of 4 each: F = 1/2.
        ("the gunman police killed", "police killed the gunman", 0.5),
        # P = 2/2, R = 2/4: F = 2·1·0.5 / 1.5 = 2/3.
        ("a b", "a b c d", 2 / 3),
        # Case and punctuation only separate tokens.
        ("Hello, World!", "hello world", 1.0),
        ("don't stop", "DON T STOP", 1.0),
        ("", "a b", 0.0),
        ("...", "a b", 0.0),
        ("x y", "a b", 0.0),
    ],
)
def test_rouge_l_by_hand(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_tokens_keep_non_ascii_letters_and_drop_underscores():
    assert rouge_tokens("Café au-lait, 3.5 kg_x") == ["café", "au", "lait", "3", "5", "kg", "x"]


def test_rouge_l_corpus_is_the_mean_of_examples():
    assert rouge_l_corpus(["a b", "x"], ["a b c d", "x"]) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="1 predictions for 0 references"):
        rouge_l_corpus(["a"], [])


_WORDS = st.sampled_from(["the", "cat", "Sat", "on", "a", "mat", "42", "x1"])
_SEPARATORS = st.sampled_from([" ", ", ", ". ", "  ", "-", "!\n", "'"])


@st.composite
def _sentences(draw) -> str:
    words = draw(st.lists(_WORDS, max_size=12))
    seps = draw(st.lists(_SEPARATORS, min_size=len(words), max_size=len(words)))
    return "".join(w + s for w, s in zip(words, seps, strict=True))


_ASCII = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=40)


@settings(max_examples=150, deadline=None)
@given(prediction=_sentences() | _ASCII, reference=_sentences() | _ASCII)
def test_rouge_l_equals_rouge_score_on_ascii(prediction, reference):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The   Answer \n", "the answer"),
        ("8.", "8"),
        ("Yes!!", "yes"),
        ("a, b. ", "a, b"),
        ("3.5", "3.5"),
        ("(x)", "(x"),  # trailing punctuation goes, leading stays
        ("...", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        ("8.0", "8", True),
        ("8", " 8. ", True),
        ("1,000", "1000", True),
        ("0.50", ".5", True),
        ("+7", "7", True),
        ("-3", "3", False),
        ("8", "9", False),
        ("8 apples", "8", False),
        ("1,00", "100", False),  # not a thousands grouping: compared as text
        ("Paris.", "paris", True),
        ("New  York", "new york", True),
        ("newyork", "new york", False),
        ("", "", True),
    ],
)
def test_exact_match(prediction, label, expected):
    assert exact_match(prediction, label) is expected


def test_accuracy_is_the_fraction_matched():
    assert accuracy(["8", "yes", "no"], ["8.0", "Yes.", "yes"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy([], [])
