"""Teacher-logit cache slices: K (token id, probability) pairs per position.

A cached slice stands in for the teacher's full distribution ``p = softmax(logits / T)`` in the
forward-KL / soft-CE losses (:func:`kdspec_torch.losses.sparse_forward_kl`). Two ways to build it:

* :func:`topk_slice` keeps the K most probable tokens, renormalised over the K. Cheap and
  deterministic, but biased: the tail mass is moved onto the head, so the student learns an
  over-confident teacher (Anshumann et al. 2025, arXiv 2503.16870).
* :func:`sampled_slice` draws K tokens i.i.d. from ``p`` and uses the empirical frequencies as the
  target (Gemma 3, arXiv 2503.19786). Unbiased: ``E[target] = p``, so the soft cross-entropy and
  its gradient are unbiased too.

Both return ``(ids, probs)``, each ``[..., K]``: ids int64, probs fp32 summing to 1 per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["densify_slice", "sampled_slice", "topk_slice"]


def _check(teacher_logits: Tensor, k: int, temperature: float) -> None:
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocab={vocab}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled(teacher_logits: Tensor, temperature: float) -> Tensor:
    x = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
    return x / temperature if temperature != 1.0 else x


@torch.no_grad()
def topk_slice(
    teacher_logits: Tensor, k: int, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The K most probable tokens and their probabilities renormalised over the K.

    ``probs_k = p_{id_k} / Σ_j p_{id_j} = softmax(logits_{ids} / T)``: the softmax of the K kept
    logits equals the renormalised full softmax, and needs no full-vocabulary normaliser. Ties
    are broken as ``torch.topk`` breaks them.
    """
    _check(teacher_logits, k, temperature)
    values, ids = _scaled(teacher_logits, temperature).topk(k, dim=-1)
    return ids, F.softmax(values, dim=-1)


@torch.no_grad()
def sampled_slice(
    teacher_logits: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """K i.i.d. draws from ``p = softmax(logits / T)``; target = counts / K over distinct ids.

    With ``c_v`` the number of draws of token ``v``, the target is ``c_v / K``: an unbiased
    estimate of ``p_v`` (``E[c_v] = K·p_v``). Repeated draws are merged into the first slot of
    their id (ids come out sorted per position); the other slots keep a valid repeated id with
    probability 0, so the shape stays ``[..., K]`` and padding slots count for nothing in the
    losses.
    """
    _check(teacher_logits, k, temperature)
    probs = F.softmax(_scaled(teacher_logits, temperature), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat, k, replacement=True, generator=generator)
    ids, weights = _merge_duplicates(draws.sort(dim=-1).values)
    lead = teacher_logits.shape[:-1]
    return ids.reshape(*lead, k), weights.reshape(*lead, k)


def _merge_duplicates(sorted_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Weights ``count / K`` on the first slot of each distinct id of sorted rows, 0 elsewhere."""
    k = sorted_ids.shape[-1]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = first.long().cumsum(dim=-1) - 1  # index of each slot's distinct id within its row
    counts = torch.zeros(sorted_ids.shape, dtype=torch.float32, device=sorted_ids.device)
    counts.scatter_add_(1, group, torch.ones_like(counts))
    weights = torch.where(first, counts.gather(1, group) / k, torch.zeros_like(counts))
    return sorted_ids, weights


def densify_slice(ids: Tensor, probs: Tensor, vocab: int) -> Tensor:
    """The slice as a dense ``[..., vocab]`` distribution (zero off the slice; repeated ids add)."""
    dense = torch.zeros(*ids.shape[:-1], vocab, dtype=probs.dtype, device=probs.device)
    return dense.scatter_add_(-1, ids.long(), probs)
