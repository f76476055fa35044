"""Shared machinery of the template-based builtin datasets (`arithmetic`, `instructions`)."""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable

from . import _random as rnd
from .errors import DataError
from .text import pretokenize


def literal_tokens(templates: Iterable[str]) -> set[str]:
    """The word tokens of the fixed text of format strings, placeholders left out.

    Templates put a space or punctuation around every placeholder, so the tokens of the literal
    text plus the tokens of every value a placeholder can take are all the tokens a record can
    contain: the vocabulary is enumerated, not sampled.
    """
    tokens: set[str] = set()
    for template in templates:
        for literal, _field, _spec, _conv in string.Formatter().parse(template):
            tokens.update(pretokenize(literal))
    return tokens


def values_tokens(values: Iterable[object]) -> set[str]:
    return {tok for v in values for tok in pretokenize(str(v))}


def sample_split(
    draw: Callable[[random.Random], dict], key: str, *, name: str, seed: int, split: str, n: int
) -> list[dict]:
    """`n` records from `draw`, keeping only those whose `key` field hashes into `split`.

    `draw` proposes records from the whole space; rejection keeps the split's share, so train
    and eval are disjoint and identically distributed (see `_random.split_of`).
    """
    rnd.check_split(split)
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    rng = rnd.derive_rng(name, split, seed)
    records: list[dict] = []
    while len(records) < n:
        record = draw(rng)
        if rnd.split_of(record[key]) == split:
            records.append(record)
    return records
