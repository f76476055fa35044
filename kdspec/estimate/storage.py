"""Bytes a node writes to disk: checkpoints, teacher-logit caches, generated text."""

from __future__ import annotations

import math

from .arch import ArchDims
from .memory import training_precision
from .params import param_counts

MANIFEST_BYTES = 4096
"""Nominal size of a teacher-logit cache's manifest (JSON: shapes, dtypes, fingerprints)."""
TEXT_BYTES_PER_TOKEN = 4
"""Generated text on disk: ~4 bytes of UTF-8 per token (English BPE), before JSON overhead."""
CACHE_ID_BYTES = 4
"""Token id in a teacher-logit cache: int32."""
CACHE_PROB_BYTES = 2
"""Probability in the kdspec backends' teacher-logit cache: float16 (6 bytes a slot with the id;
per-shard headers and checksums add about 1 KiB per 64 MiB shard, not counted)."""


def checkpoint_bytes(a: ArchDims, dtype_bytes: int, *, save_optimizer: bool = True) -> int:
    """One checkpoint: weights in the training dtype, plus with ``save_optimizer`` the fp32
    master copy (mixed precision) and AdamW m and v: 4 + 8 = 12 B/param (fp32 training) or
    2 + 4 + 8 = 14 B/param (bf16 mixed)."""
    precision = training_precision(dtype_bytes)
    per_param = precision.weight_bytes
    if save_optimizer:
        per_param += precision.master_bytes + precision.optimizer_bytes
    return param_counts(a).total * per_param


def teacher_cache_bytes(positions: float, k: int, *, prob_bytes: int = 4) -> int:
    """A top-K / sampled-K teacher cache: ``positions · k · (4-byte id + prob_bytes)`` plus a
    ``MANIFEST_BYTES`` manifest. ``prob_bytes``: 4 (fp32) or 2 (fp16/bf16 probabilities)."""
    if prob_bytes not in (2, 4):
        raise ValueError(f"prob_bytes must be 2 or 4, got {prob_bytes}")
    return math.ceil(positions * k * (CACHE_ID_BYTES + prob_bytes)) + MANIFEST_BYTES


def generated_text_bytes(n_sequences: float, new_tokens: int) -> int:
    """Generated text: ``n_sequences · new_tokens · TEXT_BYTES_PER_TOKEN``."""
    return math.ceil(n_sequences * new_tokens * TEXT_BYTES_PER_TOKEN)
