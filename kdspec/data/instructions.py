"""The `instructions` builtin dataset: simple deterministic tasks with reference responses, for
instruction distillation (MiniLLM) and ROUGE-L / exact-match evaluation.

Records are `{"prompt": ..., "response": ...}`. Each task has exactly one correct response of 5
to 15 words, computed from the prompt's content: reverse a list of words, sort numbers, repeat
a word, name the letters that follow a letter, copy a list with one word substituted, count
between two numbers. Tasks are drawn uniformly.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from . import _random as rnd
from ._templates import literal_tokens, sample_split, values_tokens

NUMBER_MAX = 99  # numbers in prompts and responses lie in 0..NUMBER_MAX
LETTERS = string.ascii_lowercase
WORDS = (
    "apple",
    "ball",
    "bird",
    "blue",
    "boat",
    "book",
    "cake",
    "car",
    "cat",
    "cloud",
    "cup",
    "dog",
    "door",
    "fish",
    "green",
    "hat",
    "house",
    "key",
    "lamp",
    "moon",
    "red",
    "river",
    "road",
    "rock",
    "shoe",
    "star",
    "sun",
    "tree",
    "water",
    "wind",
)

REVERSE = "Reverse the order of these words: {items}."
SORT = "Sort these numbers from smallest to largest: {items}."
REPEAT = "Repeat the word {word} {count} times."
LETTERS_AFTER = "Write the {count} letters that come after {letter} in the alphabet."
REPLACE = "Copy these words, but write {new} instead of {old}: {items}."
COUNT = "Count from {start} to {stop}."
TEMPLATES = (REVERSE, SORT, REPEAT, LETTERS_AFTER, REPLACE, COUNT)

Task = Callable[[random.Random], tuple[str, list[str]]]


def _reverse(rng: random.Random) -> tuple[str, list[str]]:
    items = [rnd.choice(rng, WORDS) for _ in range(rnd.randint(rng, 5, 10))]
    return REVERSE.format(items=" ".join(items)), items[::-1]


def _sort(rng: random.Random) -> tuple[str, list[str]]:
    items = [rnd.randint(rng, 0, NUMBER_MAX) for _ in range(rnd.randint(rng, 5, 10))]
    prompt = SORT.format(items=" ".join(map(str, items)))
    return prompt, [str(x) for x in sorted(items)]


def _repeat(rng: random.Random) -> tuple[str, list[str]]:
    word, count = rnd.choice(rng, WORDS), rnd.randint(rng, 5, 12)
    return REPEAT.format(word=word, count=count), [word] * count


def _letters_after(rng: random.Random) -> tuple[str, list[str]]:
    count = rnd.randint(rng, 5, 10)
    start = rnd.randint(rng, 0, len(LETTERS) - 1 - count)
    prompt = LETTERS_AFTER.format(count=count, letter=LETTERS[start])
    return prompt, list(LETTERS[start + 1 : start + 1 + count])


def _replace(rng: random.Random) -> tuple[str, list[str]]:
    old, new = rnd.sample(rng, WORDS, 2)
    items = [rnd.choice(rng, WORDS) for _ in range(rnd.randint(rng, 5, 10))]
    items[rnd.randint(rng, 0, len(items) - 1)] = old  # the word to replace occurs at least once
    prompt = REPLACE.format(new=new, old=old, items=" ".join(items))
    return prompt, [new if w == old else w for w in items]


def _count(rng: random.Random) -> tuple[str, list[str]]:
    length = rnd.randint(rng, 5, 15)
    start = rnd.randint(rng, 0, NUMBER_MAX + 1 - length)
    stop = start + length - 1
    return COUNT.format(start=start, stop=stop), [str(x) for x in range(start, stop + 1)]


TASKS: tuple[Task, ...] = (_reverse, _sort, _repeat, _letters_after, _replace, _count)


def draw(rng: random.Random) -> dict:
    """One task instance from the whole space (no split filtering)."""
    prompt, response = rnd.choice(rng, TASKS)(rng)
    return {"prompt": prompt, "response": " ".join(response)}


def generate(*, seed: int, split: str, n: int) -> list[dict]:
    """`n` records `{"prompt", "response"}`; split by a hash of the prompt."""
    return sample_split(draw, "prompt", name="instructions", seed=seed, split=split, n=n)


def vocabulary() -> set[str]:
    """Every word token a record can contain (template text, words, letters, 0..NUMBER_MAX)."""
    return (
        literal_tokens(TEMPLATES)
        | values_tokens(WORDS)
        | values_tokens(LETTERS)
        | values_tokens(range(NUMBER_MAX + 1))
    )
