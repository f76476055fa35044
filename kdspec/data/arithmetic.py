"""The `arithmetic` builtin dataset: word problems with gold rationales, for Distilling
Step-by-Step.

Records are `{"input": question, "rationale": worked steps, "label": answer}`, e.g.
`{"input": "Tom has 3 apples and buys 5 more. How many apples does Tom have now?",
"rationale": "Tom starts with 3 apples. He buys 5 more, so 3 + 5 = 8.", "label": "8"}`.
Four templates (add, subtract, multiply, add-then-subtract) are drawn uniformly. Operands are
small (2-20, factors 2-10), every number is between 0 and `NUMBER_MAX`, and the label is one
number, so the answer is a single token of the `builtin:words` tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from . import _random as rnd
from ._templates import literal_tokens, sample_split, values_tokens

NUMBER_MAX = 120  # largest number any record contains (10 * 10 + 20)

NAMES = (
    ("Tom", "He"),
    ("Anna", "She"),
    ("Ben", "He"),
    ("Mia", "She"),
    ("Sam", "He"),
    ("Lily", "She"),
    ("Max", "He"),
    ("Emma", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
)
# Plural nouns: every count in a question is at least 2.
OBJECTS = (
    "apples",
    "pears",
    "books",
    "pens",
    "cards",
    "stamps",
    "marbles",
    "shells",
    "coins",
    "stickers",
    "cookies",
    "balloons",
)

ADD = (
    "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
    "{name} starts with {a} {obj}. {Pron} buys {b} more, so {a} + {b} = {c}.",
)
SUBTRACT = (
    "{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have left?",
    "{name} starts with {a} {obj}. {Pron} gives away {b}, so {a} - {b} = {c}.",
)
MULTIPLY = (
    "{name} has {a} boxes with {b} {obj} in each box. How many {obj} does {name} have?",
    "{name} has {a} boxes of {b} {obj}, so {a} * {b} = {c}.",
)
TWO_STEP = (
    "{name} has {a} {obj}. {Pron} buys {b} more and then gives away {c}. "
    "How many {obj} does {name} have now?",
    "{name} starts with {a} {obj}. {Pron} buys {b} more, so {a} + {b} = {s}. "
    "Then {pron} gives away {c}, so {s} - {c} = {r}.",
)
TEMPLATES = (ADD, SUBTRACT, MULTIPLY, TWO_STEP)


def _numbers_add(rng: random.Random) -> tuple[dict, int]:
    a, b = rnd.randint(rng, 2, 20), rnd.randint(rng, 2, 20)
    return {"a": a, "b": b, "c": a + b}, a + b


def _numbers_subtract(rng: random.Random) -> tuple[dict, int]:
    a = rnd.randint(rng, 2, 20)
    b = rnd.randint(rng, 2, a)
    return {"a": a, "b": b, "c": a - b}, a - b


def _numbers_multiply(rng: random.Random) -> tuple[dict, int]:
    a, b = rnd.randint(rng, 2, 10), rnd.randint(rng, 2, 10)
    return {"a": a, "b": b, "c": a * b}, a * b


def _numbers_two_step(rng: random.Random) -> tuple[dict, int]:
    a, b = rnd.randint(rng, 2, 20), rnd.randint(rng, 2, 20)
    c = rnd.randint(rng, 2, min(20, a + b))
    return {"a": a, "b": b, "c": c, "s": a + b, "r": a + b - c}, a + b - c


_NUMBERS: tuple[Callable[[random.Random], tuple[dict, int]], ...] = (
    _numbers_add,
    _numbers_subtract,
    _numbers_multiply,
    _numbers_two_step,
)


def draw(rng: random.Random) -> dict:
    """One problem from the whole space (no split filtering)."""
    which = rnd.randint(rng, 0, len(TEMPLATES) - 1)
    question, rationale = TEMPLATES[which]
    numbers, answer = _NUMBERS[which](rng)
    name, pron = rnd.choice(rng, NAMES)
    slots = {"name": name, "Pron": pron, "pron": pron.lower(), "obj": rnd.choice(rng, OBJECTS)}
    slots.update(numbers)
    return {
        "input": question.format(**slots),
        "rationale": rationale.format(**slots),
        "label": str(answer),
    }


def generate(*, seed: int, split: str, n: int) -> list[dict]:
    """`n` records `{"input", "rationale", "label"}`; split by a hash of the question."""
    return sample_split(draw, "input", name="arithmetic", seed=seed, split=split, n=n)


def vocabulary() -> set[str]:
    """Every word token a record can contain (template text, names, objects, 0..NUMBER_MAX)."""
    fillers = [n for n, _ in NAMES] + [p for _, p in NAMES] + [p.lower() for _, p in NAMES]
    return (
        literal_tokens(t for pair in TEMPLATES for t in pair)
        | values_tokens(fillers)
        | values_tokens(OBJECTS)
        | values_tokens(range(NUMBER_MAX + 1))
    )
