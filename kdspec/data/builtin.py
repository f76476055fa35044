"""Builtin datasets: deterministic in-process generators, no download.

Each generator is a function `(*, seed, split, n) -> list[dict]`:

- `hmm`: pre-training documents `{"text"}` from a fixed random hidden Markov model
  (`kdspec.data.hmm`);
- `arithmetic`: word problems `{"input", "rationale", "label"}` (`kdspec.data.arithmetic`);
- `instructions`: tasks `{"prompt", "response"}` (`kdspec.data.instructions`).

The same (seed, split, n) gives the same records on every machine and Python version, and the
first n records of a larger request are the records of a smaller one. Splits `train` and `eval`
are disjoint and drawn from the same distribution.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from . import arithmetic, hmm, instructions
from ._random import SPLITS, check_split
from .errors import DataError
from .text import pretokenize

Generator = Callable[..., list[dict]]

BUILTIN: dict[str, Generator] = {
    "hmm": hmm.generate,
    "arithmetic": arithmetic.generate,
    "instructions": instructions.generate,
}

# The fields of each dataset's records.
FIELDS: dict[str, tuple[str, ...]] = {
    "hmm": ("text",),
    "arithmetic": ("input", "rationale", "label"),
    "instructions": ("prompt", "response"),
}

# Words of the prompt formats the trainers wrap records in, so that `builtin:words` covers them
# too: Distilling Step-by-Step's "predict:"/"explain:" prefixes, few-shot "Question: ...
# Rationale: ... Answer: ..." and "So the answer is N." prompts, "Instruction: ... Response:".
PROMPT_WORDS = (
    "predict: explain: Question: Rationale: Answer: So the answer is . "
    "Instruction: Input: Output: Response:"
)


def _vocabularies() -> dict[str, Callable[[], set[str] | list[str]]]:
    return {
        "hmm": hmm.vocabulary,
        "arithmetic": arithmetic.vocabulary,
        "instructions": instructions.vocabulary,
    }


def unknown_builtin(name: str) -> DataError:
    """The error for a dataset name that is not builtin, with the closest valid name."""
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return DataError(f"unknown builtin dataset {name!r}; choose one of {', '.join(BUILTIN)}{hint}")


def load_builtin(name: str, *, split: str = "train", n: int, seed: int = 0) -> list[dict]:
    """`n` records of builtin dataset `name` for `split` ("train" or "eval") and `seed`."""
    if name not in BUILTIN:
        raise unknown_builtin(name)
    check_split(split)
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    return BUILTIN[name](seed=seed, split=split, n=n)


def builtin_vocabulary(name: str | None = None) -> set[str]:
    """The word tokens of one builtin dataset (every split, every seed), or of all of them plus
    `PROMPT_WORDS` when `name` is None. Enumerated from the generators' word lists."""
    vocabularies = _vocabularies()
    if name is not None:
        if name not in vocabularies:
            raise unknown_builtin(name)
        return set(vocabularies[name]())
    words = set(pretokenize(PROMPT_WORDS))
    for vocabulary in vocabularies.values():
        words |= set(vocabulary())
    return words


__all__ = [
    "BUILTIN",
    "FIELDS",
    "PROMPT_WORDS",
    "SPLITS",
    "builtin_vocabulary",
    "load_builtin",
]
