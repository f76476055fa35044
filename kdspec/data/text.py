"""Word-level pre-tokenisation in pure Python, matching the `builtin:words` tokenizer.

The HuggingFace tokenizer built by `kdspec.data.tokenizer` splits text on whitespace and then
isolates every punctuation character (`WhitespaceSplit` followed by `Punctuation("isolated")`).
`pretokenize` reproduces that split without importing `tokenizers`, so the vocabulary can be
enumerated and the planner can reason about it in the pure-Python core.

Decoding joins tokens with one space and then removes the space before `. , ? ! : ;`
(`GLUED_PUNCTUATION`). `normalize_spacing(x)` is therefore exactly what
`decode(encode(x))` returns for in-vocabulary text.
"""

from __future__ import annotations

import re
import string
import unicodedata

# Punctuation the decoder attaches to the preceding token ("3 ." -> "3.").
GLUED_PUNCTUATION = (".", ",", "?", "!", ":", ";")
# Unicode White_Space, as Rust's `char::is_whitespace`: Python's `str.split()` would also split
# on the separators U+001C..U+001F, which `WhitespaceSplit` keeps inside words.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


def is_punctuation(char: str) -> bool:
    """The predicate of the `Punctuation` pre-tokenizer: ASCII punctuation or Unicode class P*.

    ASCII punctuation follows Rust's `is_ascii_punctuation`, which also counts symbols such as
    `$ + < = > ^ | ~` (exactly Python's `string.punctuation`).
    """
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def pretokenize(text: str) -> list[str]:
    """Split on whitespace, then make every punctuation character a token of its own."""
    tokens: list[str] = []
    for chunk in _WHITESPACE.split(text):
        word = ""
        for char in chunk:
            if is_punctuation(char):
                if word:
                    tokens.append(word)
                    word = ""
                tokens.append(char)
            else:
                word += char
        if word:
            tokens.append(word)
    return tokens


def join_tokens(tokens: list[str]) -> str:
    """Inverse of `pretokenize` up to spacing: one space between tokens, none before `.,?!:;`."""
    out = ""
    for i, token in enumerate(tokens):
        out += token if i == 0 or token in GLUED_PUNCTUATION else " " + token
    return out


def normalize_spacing(text: str) -> str:
    """The canonical spacing of `text`, i.e. what a `builtin:words` round trip returns."""
    return join_tokens(pretokenize(text))
