"""The builtin tokenizers: vocabulary coverage, round trips, determinism, transformers loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdspec.data import DataError, load_builtin
from kdspec.data.builtin import BUILTIN, PROMPT_WORDS
from kdspec.data.text import normalize_spacing, pretokenize
from kdspec.data.tokenizer import (
    BUILTIN_TOKENIZERS,
    SPECIAL_TOKENS,
    build_tokenizer,
    builtin_vocab_size,
    bytes_to_unicode,
    special_token_kwargs,
    words_vocabulary,
)

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {name: build_tokenizer(name, root / name.split(":")[1]) for name in BUILTIN_TOKENIZERS}


@pytest.fixture(scope="module")
def words(built: dict[str, Path]):
    return tokenizers.Tokenizer.from_file(str(built["builtin:words"]))


@pytest.fixture(scope="module")
def byte_level(built: dict[str, Path]):
    return tokenizers.Tokenizer.from_file(str(built["builtin:bytes"]))


def _all_builtin_texts(n: int) -> list[str]:
    """Every field of n records per dataset, split and seed (seeds 0 and 1)."""
    return [
        value
        for name in BUILTIN
        for split in ("train", "eval")
        for seed in (0, 1)
        for record in load_builtin(name, split=split, n=n if name != "hmm" else n // 10, seed=seed)
        for value in record.values()
    ]


# --------------------------------------------------------------------------------------------
# pure-Python pre-tokenisation agrees with the HuggingFace pipeline

# Up to U+2FFF (Latin, Greek, Cyrillic, CJK punctuation, symbols): Python's and Rust's Unicode
# tables can disagree on characters of scripts added in newer Unicode versions.
_TEXT = st.text(
    alphabet=st.characters(
        whitelist_categories=("L", "N", "P", "S", "Z", "Cc", "Cf"), max_codepoint=0x2FFF
    ),
    max_size=40,
)


def test_pretokenize_examples() -> None:
    expected = "Tom has 3 apples . How many ?".split()
    assert pretokenize("Tom has 3 apples. How many?") == expected
    assert pretokenize("so 3 + 5 = 8.") == ["so", "3", "+", "5", "=", "8", "."]
    assert pretokenize(" a ,b\t?! ") == ["a", ",", "b", "?", "!"]
    assert normalize_spacing("Tom  has 3 , cats ?Yes :no") == "Tom has 3, cats? Yes: no"


@settings(max_examples=200, deadline=None)
@given(_TEXT)
def test_pretokenize_matches_hf(text: str) -> None:
    hf = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.WhitespaceSplit(), tokenizers.pre_tokenizers.Punctuation()]
    )
    assert pretokenize(text) == [piece for piece, _ in hf.pre_tokenize_str(text)]


@settings(max_examples=100, deadline=None)
@given(_TEXT)
def test_normalize_spacing_is_idempotent(text: str) -> None:
    once = normalize_spacing(text)
    assert normalize_spacing(once) == once


# --------------------------------------------------------------------------------------------
# builtin:words


def test_words_cover_every_builtin_record(words) -> None:
    unk = words.token_to_id(SPECIAL_TOKENS["unk"])
    for text in _all_builtin_texts(300):
        ids = words.encode(text).ids
        assert unk not in ids, text
        # Builtin text is written in canonical spacing, so the round trip is exact.
        assert words.decode(ids) == text == normalize_spacing(text)


def test_words_vocabulary_layout(words) -> None:
    vocab = words_vocabulary()
    assert vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert vocab[4:125] == [str(i) for i in range(121)]  # numbers first, in numeric order
    assert len(vocab) == len(set(vocab)) == words.get_vocab_size()
    assert words.get_vocab() == {token: i for i, token in enumerate(vocab)}
    for i in (0, 7, 42, 99, 120):
        assert words.encode(str(i)).tokens == [str(i)]  # numbers are single tokens
    assert words.encode("121").tokens == ["<unk>"]


def test_words_cover_prompt_formats(words) -> None:
    text = "predict: Tom has 3 pens. explain: Question: Rationale: So the answer is 3."
    assert SPECIAL_TOKENS["unk"] not in words.encode(text).tokens
    assert SPECIAL_TOKENS["unk"] not in words.encode(PROMPT_WORDS).tokens


def test_words_unknown_and_special_tokens(words) -> None:
    encoded = words.encode("<bos>Tom zebra <eos>")
    assert encoded.tokens == ["<bos>", "Tom", "<unk>", "<eos>"]
    assert encoded.ids[0] == 2 and encoded.ids[-1] == 3
    assert words.decode(encoded.ids, skip_special_tokens=False) == "<bos> Tom <unk> <eos>"
    assert words.decode(encoded.ids) == "Tom"
    assert words.encode("Tom has").ids == words.encode("Tom has", add_special_tokens=True).ids


# --------------------------------------------------------------------------------------------
# builtin:bytes


def test_bytes_to_unicode_is_a_bijection_to_printable_chars() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "Ġ"  # GPT-2's well-known choice
    assert set(mapping.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_bytes_round_trip_any_text(byte_level, text: str) -> None:
    ids = byte_level.encode(text).ids
    assert ids == [b + 4 for b in text.encode("utf-8")]
    assert byte_level.decode(ids) == text


def test_bytes_round_trip_builtin_records(byte_level) -> None:
    for text in _all_builtin_texts(20):
        assert byte_level.decode(byte_level.encode(text).ids) == text


# --------------------------------------------------------------------------------------------
# files, determinism, sizes, errors


@pytest.mark.parametrize("name", BUILTIN_TOKENIZERS)
def test_build_is_deterministic(name: str, built: dict[str, Path], tmp_path: Path) -> None:
    again = build_tokenizer(name, tmp_path / "again")
    assert again.name == "tokenizer.json"
    assert again.read_bytes() == built[name].read_bytes()
    specials = json.loads((again.parent / "special_tokens.json").read_text())
    assert specials == {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
    assert special_token_kwargs(again.parent) == {
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
    }
    assert sorted(p.name for p in again.parent.iterdir()) == [
        "special_tokens.json",
        "tokenizer.json",
    ]


@pytest.mark.parametrize("name", BUILTIN_TOKENIZERS)
def test_vocab_size_matches_built_tokenizer(name: str, built: dict[str, Path]) -> None:
    tok = tokenizers.Tokenizer.from_file(str(built[name]))
    assert builtin_vocab_size(name) == tok.get_vocab_size()
    for i, token in enumerate(SPECIAL_TOKENS.values()):
        assert tok.token_to_id(token) == i


def test_vocab_size_needs_no_tokenizers_import() -> None:
    code = (
        "import sys; from kdspec.data import builtin_vocab_size as v; "
        "print(v('builtin:words'), v('builtin:bytes'), 'tokenizers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    words_size, bytes_size, imported = out.stdout.split()
    assert int(bytes_size) == 260 and int(words_size) == len(words_vocabulary())
    assert imported == "False"


def test_unknown_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer 'builtin:word'.*did you mean 'builtin:words'"):
        build_tokenizer("builtin:word", tmp_path)
    with pytest.raises(DataError, match="choose builtin:words or builtin:bytes"):
        builtin_vocab_size("gpt2")
    with pytest.raises(DataError, match="special_tokens.json does not exist"):
        special_token_kwargs(tmp_path)


# --------------------------------------------------------------------------------------------
# transformers: the torch backend's view of the same files


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("name", BUILTIN_TOKENIZERS)
def test_transformers_fast_tokenizer_round_trips(
    name: str, built: dict[str, Path], transformers, tmp_path: Path
) -> None:
    path = built[name]
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), **special_token_kwargs(path.parent)
    )
    assert (fast.pad_token_id, fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert len(fast) == builtin_vocab_size(name)
    records = [r for n in BUILTIN for r in load_builtin(n, split="eval", n=3, seed=0)]
    texts = [v for r in records for v in r.values()]
    encoded = [fast(t)["input_ids"] for t in texts]
    assert [fast.decode(ids) for ids in encoded] == texts

    fast.save_pretrained(tmp_path / "saved")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert [loaded(t)["input_ids"] for t in texts] == encoded
    assert [loaded.decode(ids) for ids in encoded] == texts
    assert (loaded.pad_token, loaded.unk_token, loaded.bos_token, loaded.eos_token) == (
        "<pad>",
        "<unk>",
        "<bos>",
        "<eos>",
    )
    short, long = records[-1]["response"], records[-1]["prompt"]
    batch = loaded([long, short], padding=True)
    pad = len(batch["input_ids"][0]) - len(loaded(short)["input_ids"])
    assert pad > 0 and batch["input_ids"][1][-pad:] == [0] * pad  # right-padded with <pad>
    assert batch["attention_mask"][1][-pad:] == [0] * pad
