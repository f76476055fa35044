"""Tokenizers a run can build without a hub: `builtin:words` and `builtin:bytes`.

`build_tokenizer(name, out_dir)` writes a HuggingFace `tokenizer.json` (built with the
`tokenizers` library, imported lazily) and `special_tokens.json` (`{"pad": "<pad>", "unk": ...,
"bos": ..., "eos": ...}`). The torch backend loads it with
`transformers.PreTrainedTokenizerFast(tokenizer_file=..., **special_token_kwargs(out_dir))`,
the JAX backend with `tokenizers.Tokenizer.from_file`. Neither tokenizer adds special tokens
when encoding: trainers insert `<bos>`/`<eos>` themselves.

- `builtin:words`: word level. Ids 0-3 are `<pad> <unk> <bos> <eos>`, then the integers 0..120
  in numeric order, then every other token of the builtin datasets (and the trainers' prompt
  words) in sorted order. Text is split on whitespace and every punctuation character is a
  token of its own (`kdspec.data.text.pretokenize`); decoding joins tokens with spaces and
  removes the space before `. , ? ! : ;`, so `decode(encode(x)) == normalize_spacing(x)`.
  Out-of-vocabulary words become `<unk>`.
- `builtin:bytes`: ids 0-3 are the same specials, byte b is id 4 + b (GPT-2 byte-to-unicode
  characters with a merge-free BPE model). Any UTF-8 text round-trips exactly.

Everything here except `build_tokenizer` is pure Python, so the planner can ask
`builtin_vocab_size` without importing `tokenizers`.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .builtin import builtin_vocabulary
from .errors import DataError
from .text import GLUED_PUNCTUATION

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
WORDS = "builtin:words"
BYTES = "builtin:bytes"
BUILTIN_TOKENIZERS = (WORDS, BYTES)
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens.json"
# Prefix that marks a word continuation for the WordPiece decoder; no builtin token has it ('#'
# is punctuation, so it is always a token of its own), hence every token is a separate word.
_NO_CONTINUATION = "##"


def _check_name(name: str) -> None:
    if name not in BUILTIN_TOKENIZERS:
        close = difflib.get_close_matches(name, BUILTIN_TOKENIZERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"unknown builtin tokenizer {name!r}; choose {' or '.join(BUILTIN_TOKENIZERS)}{hint}"
        )


def _token_order(token: str) -> tuple[int, int, str]:
    return (0, int(token), "") if token.isdigit() else (1, 0, token)


def words_vocabulary() -> list[str]:
    """The `builtin:words` vocabulary in id order: specials, numbers, then sorted tokens."""
    return list(SPECIAL_TOKENS.values()) + sorted(builtin_vocabulary(), key=_token_order)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters.

    Printable Latin-1 bytes (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) map to themselves; the other 68
    bytes, in order, to the characters 256, 257, ..., so no byte becomes whitespace or a control
    character that pre-tokenizers would treat specially.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def bytes_vocabulary() -> list[str]:
    """The `builtin:bytes` vocabulary in id order: specials, then byte 0..255 as characters."""
    chars = bytes_to_unicode()
    return list(SPECIAL_TOKENS.values()) + [chars[b] for b in range(256)]


def builtin_vocab_size(name: str) -> int:
    """Vocabulary size of a builtin tokenizer, without importing `tokenizers`."""
    _check_name(name)
    return len(words_vocabulary() if name == WORDS else bytes_vocabulary())


def special_token_kwargs(tokenizer_dir: Path) -> dict[str, str]:
    """`{"pad_token": "<pad>", ...}` from a built tokenizer's special_tokens.json, ready for
    `PreTrainedTokenizerFast(tokenizer_file=..., **kwargs)`."""
    path = Path(tokenizer_dir) / SPECIAL_TOKENS_FILE
    try:
        specials = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"{path} does not exist; build the tokenizer first") from err
    return {f"{role}_token": token for role, token in specials.items()}


def _special_added_tokens() -> list[Any]:
    from tokenizers import AddedToken

    return [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()]


def _words_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(words_vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    # WordPiece puts a space before every token that lacks the continuation prefix (all of
    # them); the Replace steps then glue sentence punctuation to the word before it.
    glue = [decoders.Replace(" " + p, p) for p in GLUED_PUNCTUATION]
    tokenizer.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix=_NO_CONTINUATION, cleanup=False), *glue]
    )
    tokenizer.add_special_tokens(_special_added_tokens())
    return tokenizer


def _bytes_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(bytes_vocabulary())}
    # No merges: every byte is a token. use_regex=False keeps spaces inside the byte stream
    # instead of splitting words GPT-2 style, which would change nothing but speed here.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(_special_added_tokens())
    return tokenizer


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed run never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_tokenizer(name: str, out_dir: Path) -> Path:
    """Write `tokenizer.json` and `special_tokens.json` for builtin tokenizer `name` into
    `out_dir` and return the tokenizer.json path. The bytes are the same on every call."""
    _check_name(name)
    try:
        tokenizer = _words_tokenizer() if name == WORDS else _bytes_tokenizer()
    except ImportError as err:
        raise DataError(
            f"building {name} needs the `tokenizers` package: pip install tokenizers"
        ) from err
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TOKENIZER_FILE
    _write_atomic(path, tokenizer.to_str(pretty=True) + "\n")
    _write_atomic(out_dir / SPECIAL_TOKENS_FILE, json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    return path
