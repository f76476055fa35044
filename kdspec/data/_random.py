"""Seeded randomness for the builtin generators, independent of the Python version.

Only `random.Random(int).random()` is used as the source of randomness: the Mersenne Twister
seeded from an integer and its 53-bit floats are stable across CPython releases, whereas helpers
such as `choices`, `sample` or `gammavariate` are implementation details that may change. Every
draw below is built from `random()` alone, so a generator's output depends only on its seed.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from itertools import accumulate
from typing import TypeVar

from .errors import DataError

T = TypeVar("T")

SPLITS = ("train", "eval")
# One record key in EVAL_BUCKETS lands in the eval split (see `split_of`).
EVAL_BUCKETS = 8


def _digest(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def derive_rng(*parts: object) -> random.Random:
    """A generator seeded from a hash of `parts`, e.g. `("arithmetic", "train", 0)`."""
    return random.Random(_digest(*parts))


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; builtin datasets have {', '.join(SPLITS)}")


def split_of(key: str) -> str:
    """The split a record belongs to, from a hash of its identifying text.

    Partitioning the space of records by hash makes `train` and `eval` disjoint by construction
    while drawing both from the same distribution: the hash is independent of the content.
    """
    return "eval" if _digest("kdspec-split", key) % EVAL_BUCKETS == 0 else "train"


def randint(rng: random.Random, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return low + min(int(rng.random() * (high - low + 1)), high - low)


def choice(rng: random.Random, items: Sequence[T]) -> T:
    return items[randint(rng, 0, len(items) - 1)]


def sample(rng: random.Random, items: Sequence[T], k: int) -> list[T]:
    """`k` distinct items in random order (a partial Fisher-Yates shuffle)."""
    pool = list(items)
    for i in range(k):
        j = randint(rng, i, len(pool) - 1)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def cumulative(weights: Sequence[float]) -> list[float]:
    """Cumulative sums, for `categorical`."""
    return list(accumulate(weights))


def categorical(rng: random.Random, cum_weights: Sequence[float]) -> int:
    """Index i drawn with probability proportional to weight i, given cumulative weights."""
    u = rng.random() * cum_weights[-1]
    return min(bisect.bisect_right(cum_weights, u), len(cum_weights) - 1)


def _normal(rng: random.Random) -> float:
    """Standard normal by Box-Muller (one of the pair; simplicity beats the saved draw)."""
    u1 = 1.0 - rng.random()  # in (0, 1], so the log is finite
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * rng.random())


def gamma(rng: random.Random, shape: float) -> float:
    """Gamma(shape, 1) variate, Marsaglia & Tsang (2000).

    For shape >= 1: d = shape - 1/3, c = 1/sqrt(9d); draw x ~ N(0,1), v = (1 + c x)^3 and accept
    d·v when log U < x²/2 + d - d·v + d·log v. For shape < 1 use Gamma(shape) =
    Gamma(shape + 1) · U^(1/shape).
    """
    if shape <= 0:
        raise ValueError(f"gamma shape must be > 0, got {shape}")
    if shape < 1:
        return gamma(rng, shape + 1.0) * (1.0 - rng.random()) ** (1.0 / shape)
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = _normal(rng)
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = 1.0 - rng.random()
        if math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def dirichlet(rng: random.Random, alpha: float, k: int) -> list[float]:
    """A probability vector from the symmetric Dirichlet(alpha) on k outcomes (normalised gammas).

    Gammas of small shape can underflow to 0.0 all at once; redraw in that (rare) case.
    """
    while True:
        draws = [gamma(rng, alpha) for _ in range(k)]
        total = sum(draws)
        if total > 0:
            return [g / total for g in draws]
