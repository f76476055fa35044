"""Tokenizer and training rows for the JAX backend, in numpy (no torch, no transformers).

The same conventions as the torch backend (``kdspec_torch.batches``). Every example is a row of
``seq_len + 1`` tokens: the model reads ``row[:-1]`` and predicts ``row[1:]``, and a boolean
``targets`` row says which tokens are predicted:

* ``packed`` (pretrain, pretrain_kd): documents, each followed by eos, concatenated and cut into
  consecutive rows (the tail shorter than a row is dropped); every token is a target.
* ``pairs`` (sft, kd): ``[bos] + prompt + response + [eos]`` cut to ``seq_len + 1`` tokens and
  right-padded; only the response and its eos are targets. A pair whose response falls wholly
  past the cut is dropped.

The rows are visited in a fresh seeded permutation each epoch, and optimizer step ``s`` takes
samples ``[s·B, (s+1)·B)`` of that stream, so the data position is one integer. The
permutations come from numpy, not torch (``torch.randperm``): both backends see every row
equally often, in different orders. That is also why this module duplicates the torch
backend's packing and sampler instead of sharing one in ``kdspec.data``: sharing would mean
switching the torch backend to numpy permutations, which changes its data order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "LAYOUTS",
    "EpochSampler",
    "JaxTokenizer",
    "TokenRows",
    "build_token_rows",
    "derive_seed",
    "load_tokenizer",
    "micro_batches",
    "order_seed",
    "pack_documents",
    "pair_rows",
    "read_records",
    "step_batch",
    "train_records",
]

IGNORE_INDEX = -100
Layout = Literal["packed", "pairs"]
LAYOUTS: tuple[Layout, ...] = ("packed", "pairs")

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

    @property
    def bos_id(self) -> int | None:
        return self.token_id("bos")

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens (documents get their eos from the packer)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, sequences: list[list[int]]) -> list[str]:
        """Text of each id list, special tokens dropped, stripped (as the torch backend's
        ``generate_text`` decodes with transformers)."""
        texts = self.tokenizer.decode_batch(sequences, skip_special_tokens=True)
        return [text.strip() for text in texts]

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
    """``[N, seq_len + 1]`` token rows, which tokens are targets, and each row's length before
    its padding. ``targets`` None: every token is one (packed rows); ``lengths`` None: no row
    is padded."""

    tokens: np.ndarray  # [N, seq_len + 1] int32
    targets: np.ndarray | None = None  # [N, seq_len + 1] bool
    lengths: np.ndarray | None = None  # [N] int32

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """``input_ids`` ``[b, seq_len]`` (``row[:-1]``), ``labels`` (``row[1:]``, IGNORE_INDEX
        where not a target) and, for padded rows, ``attention_mask`` (1 before the row's
        length). Padded rows always get a mask, even when a batch happens to need none, so
        every batch of a dataset has the same pytree (one compilation)."""
        rows = self.tokens[index]
        labels = rows[:, 1:]
        if self.targets is not None:
            labels = np.where(self.targets[index][:, 1:], labels, IGNORE_INDEX).astype(np.int32)
        out = {"input_ids": rows[:, :-1], "labels": labels}
        if self.lengths is not None:
            positions = np.arange(self.seq_len)
            out["attention_mask"] = (positions < self.lengths[index][:, None]).astype(np.int32)
        return out


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


def pair_rows(prompts: list[list[int]], responses: list[list[int]], *, bos_id: int | None,
              eos_id: int, pad_id: int, seq_len: int) -> TokenRows:
    """One right-padded row ``[bos] + prompt + response + [eos]`` per pair, cut to
    ``seq_len + 1``; targets = the response tokens and the eos. Pairs left with no target
    after the first token are dropped."""
    width = seq_len + 1
    rows, targets, lengths = [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        head = ([bos_id] if bos_id is not None else []) + list(prompt)
        row = (head + list(response) + [eos_id])[:width]
        target = ([False] * len(head) + [True] * (len(response) + 1))[:width]
        if not any(target[1:]):
            continue
        pad = width - len(row)
        rows.append(row + [pad_id] * pad)
        targets.append(target + [False] * pad)
        lengths.append(len(row))
    if not rows:
        raise ValueError(
            f"the data gives no training example ({len(prompts)} records; none yields a "
            "response token): add data or raise seq_len")
    return TokenRows(np.asarray(rows, np.int32), np.asarray(targets, bool),
                     np.asarray(lengths, np.int32))


def _field(records: list[dict[str, Any]], name: str) -> list[str]:
    for record in records:
        if name not in record:
            raise KeyError(
                f"a data record has no `{name}` field (fields: {', '.join(record)}); map one "
                f"with the data source's `fields: {{{name}: ...}}`")
    return [str(record[name]) for record in records]


def build_token_rows(layout: Layout, records: list[dict[str, Any]], tokenizer: JaxTokenizer,
                     seq_len: int) -> TokenRows:
    """Tokenize ``records`` into rows of ``layout`` (module docstring)."""
    if layout == "packed":
        return pack_documents(tokenizer.encode(_field(records, "text")),
                              eos_id=tokenizer.eos_id, seq_len=seq_len)
    if layout == "pairs":
        return pair_rows(tokenizer.encode(_field(records, "prompt")),
                         tokenizer.encode(_field(records, "response")),
                         bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, seq_len=seq_len)
    raise ValueError(f"unknown row layout {layout!r} (layouts: {', '.join(LAYOUTS)})")


def read_records(data: dict[str, Any], *, seed: int, spec_dir: Path) -> list[dict[str, Any]]:
    """The records of a node's ``data`` config."""
    from kdspec.data.sources import load_records

    return load_records(data["source"], split=data.get("split", "train"), n=data.get("n"),
                        seed=seed, fields=data.get("fields") or {}, base_dir=spec_dir)


def train_records(data: dict[str, Any], *, seed: int, spec_dir: Path,
                  fraction: float | None = None) -> list[dict[str, Any]]:
    """A train node's records; with ``fraction`` (sft's ``train_fraction``) a seeded sample of
    ``max(1, round(fraction · n))`` of them, drawn exactly as the torch backend draws it
    (Python's ``random.Random(derive_seed(seed, "fraction")).sample``)."""
    records = read_records(data, seed=seed, spec_dir=spec_dir)
    if fraction is None:
        return records
    keep = max(1, round(fraction * len(records)))
    return random.Random(derive_seed(seed, "fraction")).sample(records, keep)


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
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self.permutation(int(epoch))[offsets[where]]
        return out


def micro_batches(batch: dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
    """``[B, ...]`` arrays as ``[grad_accum, B / grad_accum, ...]`` (micro-batch ``i`` holds
    samples ``[i·m, (i+1)·m)``, the torch backend's split)."""
    return {k: v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:])
            for k, v in batch.items()}


def step_batch(rows: TokenRows, sampler: EpochSampler, step: int, batch_size: int,
               grad_accum: int) -> dict[str, np.ndarray]:
    """Optimizer step ``step``'s batch as ``[grad_accum, batch_size / grad_accum, seq_len]``."""
    return micro_batches(rows.batch(sampler.indices(step * batch_size, batch_size)), grad_accum)
