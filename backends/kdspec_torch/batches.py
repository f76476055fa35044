"""Training examples as fixed-size token rows, a seeded epoch sampler, and micro-batches.

Every example is one row of `seq_len + 1` tokens: the model reads `row[:-1]` and predicts
`row[1:]`. A boolean `targets` row says which tokens are predicted (loss positions):

* packed (pretrain, pretrain_kd): documents are tokenized, each followed by eos, concatenated
  and cut into consecutive rows of `seq_len + 1` tokens (the tail shorter than a row is
  dropped); every token is a target.
* pairs (sft, kd): `[bos] + prompt + response + [eos]`, cut to `seq_len + 1` tokens and
  right-padded; only the response and its eos are targets. A pair whose response falls wholly
  past the cut is dropped.

The sampler visits the rows in a fresh seeded permutation each epoch. Sample `i` of the stream
is row `perm_e[i mod n]` of epoch `e = i // n`; optimizer step `s` takes samples
`[s·B, (s+1)·B)` and splits them into `grad_accum` micro-batches in order. So the position in
the data is a single integer (samples consumed), and the stream does not depend on `grad_accum`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .runtime import derive_seed

IGNORE_INDEX = -100
Layout = Literal["packed", "pairs"]


@dataclass
class Batch:
    """One micro-batch. `labels[b, t]` is the token predicted at position t, or IGNORE_INDEX;
    `index` are the rows' positions in the dataset (the teacher cache is keyed by them)."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor | None
    index: Tensor

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        """Tokens the model reads (padding excluded)."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), mask, self.index)


@dataclass
class TokenData:
    """Rows of `seq_len + 1` tokens (`tokens`), which of them are targets, and valid lengths."""

    tokens: Tensor  # [N, seq_len + 1] int64
    targets: Tensor  # [N, seq_len + 1] bool
    lengths: Tensor  # [N] int64: tokens before the padding

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def batch(self, index: Tensor) -> Batch:
        rows, targets = self.tokens[index], self.targets[index]
        labels = rows[:, 1:].masked_fill(~targets[:, 1:], IGNORE_INDEX)
        lengths = self.lengths[index]
        mask = None
        if bool((lengths < rows.shape[1]).any()):
            mask = (torch.arange(self.seq_len) < lengths[:, None]).long()
        return Batch(rows[:, :-1].contiguous(), labels, mask, index)


def pack_documents(documents: list[list[int]], *, eos_id: int, seq_len: int) -> TokenData:
    """Concatenate `doc + [eos]` for every document and cut into rows of `seq_len + 1`."""
    stream = [token for doc in documents for token in (*doc, eos_id)]
    n_rows = len(stream) // (seq_len + 1)
    tokens = torch.tensor(stream[: n_rows * (seq_len + 1)], dtype=torch.long)
    tokens = tokens.view(n_rows, seq_len + 1)
    return TokenData(
        tokens,
        torch.ones_like(tokens, dtype=torch.bool),
        torch.full((n_rows,), seq_len + 1, dtype=torch.long),
    )


def pair_rows(
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    bos_id: int | None,
    eos_id: int,
    pad_id: int,
    seq_len: int,
) -> TokenData:
    """One right-padded row per (prompt, response) pair; targets = response tokens and eos."""
    width = seq_len + 1
    rows, targets, lengths = [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        head = ([bos_id] if bos_id is not None else []) + prompt
        row = (head + response + [eos_id])[:width]
        target = ([False] * len(head) + [True] * (len(response) + 1))[:width]
        if not any(target[1:]):
            continue
        pad = width - len(row)
        rows.append(row + [pad_id] * pad)
        targets.append(target + [False] * pad)
        lengths.append(len(row))
    if not rows:
        return TokenData(
            torch.zeros(0, width, dtype=torch.long),
            torch.zeros(0, width, dtype=torch.bool),
            torch.zeros(0, dtype=torch.long),
        )
    return TokenData(torch.tensor(rows), torch.tensor(targets), torch.tensor(lengths))


def read_records(data: dict[str, Any], *, seed: int, spec_dir: Path) -> list[dict[str, Any]]:
    """The records of a node's `data` config (a DataSource dump with its name)."""
    from kdspec.data.sources import load_records

    return load_records(
        data["source"],
        split=data.get("split", "train"),
        n=data.get("n"),
        seed=seed,
        fields=data.get("fields") or {},
        base_dir=spec_dir,
    )


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def build_token_data(
    layout: Layout, records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> TokenData:
    """Tokenize `records` into rows of the given layout (see the module docstring)."""
    if layout == "packed":
        data = pack_documents(
            encode(tokenizer, [_field(r, "text") for r in records]),
            eos_id=tokenizer.eos_token_id,
            seq_len=seq_len,
        )
    else:
        data = pair_rows(
            encode(tokenizer, [_field(r, "prompt") for r in records]),
            encode(tokenizer, [_field(r, "response") for r in records]),
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            seq_len=seq_len,
        )
    if len(data) == 0:
        what = f"a full row of {seq_len + 1} tokens" if layout == "packed" else "a response token"
        raise ValueError(
            f"the data gives no training example ({len(records)} records; none "
            f"yields {what}): add data or lower seq_len"
        )
    return data


def _field(record: dict[str, Any], name: str) -> str:
    if name not in record:
        raise KeyError(
            f"a data record has no `{name}` field (fields: {', '.join(record)}); map "
            f"one with the data source's `fields: {{{name}: ...}}`"
        )
    return str(record[name])


class EpochSampler:
    """Sample `i` of an endless stream over `n` rows: row `perm_e[i mod n]`, `e = i // n`, where
    `perm_e` is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the sampler needs at least one row")
        self.n, self.seed = n, seed

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs per sampler, freed with it
    def permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.n, generator=generator)

    def indices(self, start: int, count: int) -> Tensor:
        positions = torch.arange(start, start + count)
        epochs, offsets = positions // self.n, positions % self.n
        out = torch.empty(count, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            where = epochs == epoch
            out[where] = self.permutation(epoch)[offsets[where]]
        return out


def step_batches(
    data: TokenData, sampler: EpochSampler, step: int, batch_size: int, grad_accum: int
) -> list[Batch]:
    """The micro-batches of optimizer step `step` (0-based)."""
    index = sampler.indices(step * batch_size, batch_size)
    return [data.batch(part) for part in index.chunk(grad_accum)]


def order_seed(seed: int, data: dict[str, Any]) -> int:
    """The sampler seed: stages on the same data source see it in the same order (a fair
    comparison of a distilled student with one trained from scratch)."""
    return derive_seed(seed, "order", data["name"])
