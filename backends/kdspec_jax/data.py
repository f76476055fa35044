"""Tokenizer and training rows for the JAX backend, in numpy (no torch, no transformers).

The same conventions as the torch backend (``kdspec_torch.batches``): packed documents, each
followed by eos, cut into rows of ``seq_len + 1`` tokens (the model reads ``row[:-1]`` and
predicts ``row[1:]``); the rows are visited in a fresh seeded permutation each epoch, and
optimizer step ``s`` takes samples ``[s·B, (s+1)·B)`` of that stream, so the data position is
one integer. The permutations come from numpy, not torch: both backends see every row equally
often, in different orders.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EpochSampler",
    "JaxTokenizer",
    "TokenRows",
    "derive_seed",
    "load_tokenizer",
    "order_seed",
    "pack_documents",
    "read_records",
    "step_batch",
]

_ROLES = ("pad", "unk", "bos", "eos")


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose: sha256 of the base seed and the parts (the torch
    backend's scheme, so both derive the same seed for the same purpose)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def order_seed(seed: int, data: dict[str, Any]) -> int:
    """Stages on the same data source see it in the same order."""
    return derive_seed(seed, "order", data["name"])


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclass
class JaxTokenizer:
    """A ``tokenizers.Tokenizer`` with its special tokens (``pad`` falls back to ``eos``)."""

    tokenizer: Any
    special: dict[str, str | None]

    def token_id(self, role: str) -> int | None:
        token = self.special.get(role)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_id(self) -> int:
        return self.token_id("eos")

    @property
    def pad_id(self) -> int:
        return self.token_id("pad")

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens (documents get their eos from the packer)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def token_ids(self) -> dict[str, int | None]:
        """``{"pad_token_id": ..., "bos_token_id": ..., "eos_token_id": ...}`` for config.json."""
        return {f"{role}_token_id": self.token_id(role) for role in ("pad", "bos", "eos")}

    def save(self, folder: Path) -> None:
        """tokenizer.json plus a tokenizer_config.json naming the special tokens, so
        ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it."""
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces":
                  False, **{f"{r}_token": t for r, t in self.special.items() if t is not None}}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(name: str, *, spec_dir: Path, work_dir: Path) -> JaxTokenizer:
    """``builtin:words`` / ``builtin:bytes`` (built into ``work_dir``) or a local folder with
    tokenizer.json and tokenizer_config.json (relative to the spec file)."""
    from tokenizers import Tokenizer

    if name.startswith("builtin:"):
        from kdspec.data.tokenizer import SPECIAL_TOKENS_FILE, build_tokenizer

        path = build_tokenizer(name, work_dir)
        special = json.loads((path.parent / SPECIAL_TOKENS_FILE).read_text())
    elif name.startswith("hf:"):
        raise NotImplementedError(
            f"tokenizer {name!r}: the JAX backend reads local tokenizer folders only; download "
            "it (huggingface-cli download ID --local-dir DIR) and give the folder")
    else:
        folder = (spec_dir / name).expanduser()
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has no tokenizer.json")
        path = folder / "tokenizer.json"
        special = _special_tokens(folder)
    special = {role: special.get(role) for role in _ROLES}
    special["pad"] = special["pad"] or special["eos"]
    if special["eos"] is None:
        raise ValueError(f"tokenizer {name!r} has no eos token; kdspec separates documents with it")
    return JaxTokenizer(Tokenizer.from_file(str(path)), special)


def _special_tokens(folder: Path) -> dict[str, str | None]:
    """Special tokens from a HF tokenizer folder's tokenizer_config.json (strings or
    ``{"content": ...}`` objects)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    out = {}
    for role in _ROLES:
        token = config.get(f"{role}_token")
        out[role] = token.get("content") if isinstance(token, dict) else token
    return out


# --------------------------------------------------------------------------------------------
# Rows, sampler, batches
# --------------------------------------------------------------------------------------------


@dataclass
class TokenRows:
    """``[N, seq_len + 1]`` token rows; every token is a target (packed documents)."""

    tokens: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        rows = self.tokens[index]
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def pack_documents(documents: list[list[int]], *, eos_id: int, seq_len: int) -> TokenRows:
    """Concatenate ``doc + [eos]`` for every document and cut into rows of ``seq_len + 1``
    (the tail shorter than a row is dropped)."""
    stream = [token for doc in documents for token in (*doc, eos_id)]
    n_rows = len(stream) // (seq_len + 1)
    if n_rows == 0:
        raise ValueError(
            f"the data gives no training example ({len(documents)} documents, {len(stream)} "
            f"tokens; a row needs {seq_len + 1}): add data or lower seq_len")
    tokens = np.asarray(stream[: n_rows * (seq_len + 1)], dtype=np.int32)
    return TokenRows(tokens.reshape(n_rows, seq_len + 1))


def read_records(data: dict[str, Any], *, seed: int, spec_dir: Path) -> list[dict[str, Any]]:
    """The records of a node's ``data`` config."""
    from kdspec.data.sources import load_records

    return load_records(data["source"], split=data.get("split", "train"), n=data.get("n"),
                        seed=seed, fields=data.get("fields") or {}, base_dir=spec_dir)


class EpochSampler:
    """Sample ``i`` of an endless stream over ``n`` rows: row ``perm_e[i mod n]`` of epoch
    ``e = i // n``, ``perm_e`` a numpy permutation seeded by ``(seed, e)``."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the sampler needs at least one row")
        self.n, self.seed = n, seed

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs per sampler, freed with it
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(derive_seed(self.seed, "epoch", epoch)).permutation(self.n)

    def indices(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count)
        epochs, offsets = positions // self.n, positions % self.n
        return np.asarray([self.permutation(int(e))[o] for e, o in zip(epochs, offsets,
                                                                        strict=True)])


def step_batch(rows: TokenRows, sampler: EpochSampler, step: int, batch_size: int,
               grad_accum: int) -> dict[str, np.ndarray]:
    """Optimizer step ``step``'s batch as ``[grad_accum, batch_size / grad_accum, seq_len]``."""
    batch = rows.batch(sampler.indices(step * batch_size, batch_size))
    micro = batch_size // grad_accum
    return {k: v.reshape(grad_accum, micro, *v.shape[1:]) for k, v in batch.items()}
