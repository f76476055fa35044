"""Knowledge-distillation losses on logits: one small function per formula.

Conventions shared by every loss here:

* ``p`` is the teacher's distribution and ``q`` the student's, both ``softmax(logits / T)`` at the
  loss temperature ``T``. Logits are ``[..., vocab]``.
* Each divergence is summed over the vocabulary per position, then averaged over the counted
  positions (``mask`` True, over the leading dims); an all-masked input gives 0, not NaN.
* No ``T²`` factor is applied: the caller scales the soft term (``soft_scale`` in :func:`kd_loss`).
* Everything is computed in fp32 (fp64 stays fp64) from ``log_softmax``; terms with ``p == 0`` are
  exactly 0 (``0 · log 0 = 0``), so ``-inf`` logits never produce NaN.
* The teacher is a constant: :func:`kd_loss` detaches it.

``forward_kl`` is ``KL(p‖q)`` (mass-covering; Hinton/Gemma 2 KD up to the teacher entropy),
``reverse_kl`` is ``KL(q‖p)`` (mode-seeking; MiniLLM), ``jsd`` is the generalised JSD of TRL's GKD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "DIVERGENCES",
    "cross_entropy_loss",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "kd_loss",
    "resolve_teacher",
    "reverse_kl",
    "soft_cross_entropy",
    "sparse_divergence",
    "sparse_forward_kl",
    "sparse_soft_cross_entropy",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
"""Divergence names as users write them in YAML (``loss.divergence``)."""


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _compute_dtype(t: Tensor) -> torch.dtype:
    # fp32 at least: bf16/fp16 logits lose the small probabilities that the KL is made of.
    return torch.promote_types(t.dtype, torch.float32)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log softmax(logits / T)`` over the last dim, in fp32 or wider, with ``-inf`` raised to
    the dtype's lowest finite value: its exp is still exactly 0, but ``0 · (log a − log b)`` is
    then 0 where ``0 · (−inf − x)`` would be NaN (``0 · log 0 = 0``)."""
    _check_temperature(temperature)
    x = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    return _FiniteLogSoftmax.apply(x)


class _FiniteLogSoftmax(torch.autograd.Function):
    """``log_softmax`` floored in place at ``finfo.min``. One autograd op keeps the memory of a
    plain ``log_softmax`` (it saves only its output); a separate clamp would add a buffer."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = F.log_softmax(x, dim=-1).clamp_min_(torch.finfo(x.dtype).min)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        # ∂/∂x of log_softmax: grad − softmax · Σ grad (softmax is exactly 0 at floored entries).
        return out.exp().mul_(grad.sum(dim=-1, keepdim=True)).neg_().add_(grad)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must be in [0, 1], got {beta}")


# Per-position terms, from finite log-probabilities (as _log_probs returns them).


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a‖b) = Σ_v a_v (log a_v − log b_v)`` per position."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _cross_entropy_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``H(a, b) = −Σ_v a_v log b_v`` per position."""
    return -(log_a.exp() * log_b).sum(dim=-1)


def _jsd_terms(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """``JSD_β`` per position (TRL's special cases at β = 0 and 1; see generalized_jsd)."""
    if beta == 0.0:
        return _kl_terms(log_p, log_q)
    if beta == 1.0:
        return _kl_terms(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)


def _divergence_terms(name: str, log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """The divergence ``name`` per position, teacher ``log p``, student ``log q``."""
    if name == "forward_kl":
        return _kl_terms(log_p, log_q)
    if name == "reverse_kl":
        return _kl_terms(log_q, log_p)
    return _jsd_terms(log_p, log_q, beta)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-position ``values`` over ``mask`` (True = count); 0 when nothing counts."""
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading dims "
            f"{tuple(values.shape)}"
        )
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [..., vocab]"
        )


# --------------------------------------------------------------------------------------------
# Divergences on full distributions
# --------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Forward KL, ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)``, averaged over counted positions.

    ``p = softmax(teacher / T)``, ``q = softmax(student / T)``. Its gradient in the student is that
    of :func:`soft_cross_entropy` (they differ by the teacher entropy, a constant).
    """
    _check_pair(student_logits, teacher_logits)
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return _masked_mean(_kl_terms(log_p, log_q), mask)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Reverse KL, ``KL(q‖p) = Σ_v q_v (log q_v − log p_v)``, averaged over counted positions.

    ``p = softmax(teacher / T)``, ``q = softmax(student / T)``. Mode-seeking: the per-token
    quantity MiniLLM's policy gradient optimises. Infinite where the teacher gives a token
    probability 0 that the student does not.
    """
    _check_pair(student_logits, teacher_logits)
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return _masked_mean(_kl_terms(log_q, log_p), mask)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence of TRL's GKD (Agarwal et al. 2024, Eq. 1).

    With ``m = β·p + (1 − β)·q`` (teacher weight β)::

        JSD_β = β·KL(p‖m) + (1 − β)·KL(q‖m)        for 0 < β < 1
        JSD_0 = KL(p‖q)   (forward KL)              special case, as in TRL
        JSD_1 = KL(q‖p)   (reverse KL)              special case, as in TRL

    The special cases are NOT the limits of the formula: ``JSD_β → 0`` as β → 0 or 1 (the
    mixture collapses onto one of the two distributions); TRL defines β = 0 and β = 1 this way
    and so do we. ``JSD_0.5`` is the symmetric JSD, bounded by ``log 2``. ``log m`` is computed as
    a ``logaddexp`` of the two log-probabilities, so it is finite wherever ``p + q > 0``.
    """
    _check_pair(student_logits, teacher_logits)
    _check_beta(beta)
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return _masked_mean(_jsd_terms(log_p, log_q, beta), mask)


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft-target cross-entropy ``H(p, q) = −Σ_v p_v log q_v`` (Gemma 2's KD objective).

    ``H(p, q) = KL(p‖q) + H(p)``: same student gradient as :func:`forward_kl`, larger by the
    teacher's entropy.
    """
    _check_pair(student_logits, teacher_logits)
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return _masked_mean(_cross_entropy_terms(log_p, log_q), mask)


def cross_entropy_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Hard-label cross-entropy ``−log softmax(logits)_y`` (temperature 1), averaged over the
    positions whose label is not ``ignore_index``; 0 when every label is ignored."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' leading dims "
            f"{tuple(logits.shape[:-1])}"
        )
    flat = logits.reshape(-1, logits.shape[-1]).to(_compute_dtype(logits))
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown divergence {name!r}; expected one of {', '.join(DIVERGENCES)}")


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """The divergence called ``name`` in the spec: ``forward_kl``, ``reverse_kl`` or ``jsd``
    (``beta`` is used by ``jsd`` only)."""
    if name not in DIVERGENCES:
        raise _unknown(name)
    _check_pair(student_logits, teacher_logits)
    if name == "jsd":
        _check_beta(beta)
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return _masked_mean(_divergence_terms(name, log_p, log_q, beta), mask)


# --------------------------------------------------------------------------------------------
# Divergences against a cached teacher slice (top-K or sampled-K)
# --------------------------------------------------------------------------------------------


def _slice_log_q(
    student_logits: Tensor, teacher_ids: Tensor, teacher_probs: Tensor, temperature: float
) -> Tensor:
    """The student's log-probs over the FULL vocabulary, after checking the slice's shapes."""
    if teacher_ids.shape != teacher_probs.shape:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_probs "
            f"{tuple(teacher_probs.shape)} must have the same shape [..., K]"
        )
    if teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher slice {tuple(teacher_ids.shape)} must match the student logits' leading "
            f"dims {tuple(student_logits.shape[:-1])}"
        )
    return _log_probs(student_logits, temperature)


def _slice_kl_terms(log_q: Tensor, teacher_ids: Tensor, teacher_probs: Tensor) -> Tensor:
    """``Σ_k p_k (log p_k − log q_{id_k})`` per position; slots with ``p_k = 0`` give 0."""
    p = teacher_probs.to(log_q.dtype)
    support = p > 0
    log_p = torch.where(support, p, torch.ones_like(p)).log()
    diff = torch.where(support, log_p - log_q.gather(-1, teacher_ids.long()), torch.zeros_like(p))
    return (p * diff).sum(dim=-1)


def sparse_forward_kl(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_probs: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Forward KL against a cached teacher slice: ``Σ_k p_k (log p_k − log q_{id_k})``.

    ``teacher_ids``/``teacher_probs`` are ``[..., K]``: the slice's tokens and their target
    probabilities (summing to 1 per position, as :mod:`kdspec_torch.teacher_slice` builds them;
    slots with ``p_k = 0`` are padding and count for nothing). ``q = softmax(student / T)`` over
    the FULL vocabulary; ``T`` applies to the student only, the slice's probabilities were fixed
    when it was cached (build it at the same temperature). The ids of non-zero slots must be
    distinct per position, or the ``p log p`` term is wrong (the student gradient is right either
    way). Reverse KL and JSD have no slice form: see :func:`sparse_divergence`.
    """
    log_q = _slice_log_q(student_logits, teacher_ids, teacher_probs, temperature)
    return _masked_mean(_slice_kl_terms(log_q, teacher_ids, teacher_probs), mask)


def sparse_soft_cross_entropy(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_probs: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft cross-entropy against a teacher slice: ``−Σ_k p_k log q_{id_k}``.

    Linear in the target, so with a sampled-K slice (``E[target] = p``) its expectation is the
    full :func:`soft_cross_entropy`, and so is its gradient's.
    """
    log_q = _slice_log_q(student_logits, teacher_ids, teacher_probs, temperature)
    log_q_ids = log_q.gather(-1, teacher_ids.long())
    return _masked_mean(-(teacher_probs.to(log_q.dtype) * log_q_ids).sum(dim=-1), mask)


def sparse_divergence(
    name: str,
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_probs: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """The divergence ``name`` against a teacher slice. Only ``forward_kl`` has one.

    ``reverse_kl`` and ``jsd`` weight every token by the student's probability, including the
    tokens outside the slice, where the teacher's probability is unknown: a slice cannot define
    them, so they raise ``ValueError`` instead of silently treating the missing mass as 0.
    """
    if name == "forward_kl":
        return sparse_forward_kl(
            student_logits, teacher_ids, teacher_probs, temperature=temperature, mask=mask
        )
    if name in DIVERGENCES:
        raise ValueError(
            f"divergence {name!r} needs the teacher's full distribution (it sums over the "
            "student's tokens, including those outside the cached slice); a top-K or sampled-K "
            "teacher slice supports only 'forward_kl'. Use an online teacher for this stage."
        )
    raise _unknown(name)


# --------------------------------------------------------------------------------------------
# The full KD objective from hidden states (the naive reference of chunked_loss)
# --------------------------------------------------------------------------------------------


def resolve_teacher(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    *,
    teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_head_weight: Tensor | None,
    teacher_topk: tuple[Tensor, Tensor] | None,
) -> str:
    """Check the KD inputs' shapes and say which teacher form was given: ``"logits"``,
    ``"hidden"`` or ``"topk"``. Exactly one form must be given."""
    if student_hidden.dim() < 1 or student_head_weight.dim() != 2:
        raise ValueError(
            "student_hidden must be [..., hidden] and student_head_weight [vocab, hidden]"
        )
    vocab, hidden = student_head_weight.shape
    if student_hidden.shape[-1] != hidden:
        raise ValueError(
            f"student_hidden's last dim {student_hidden.shape[-1]} != head weight's {hidden}"
        )
    lead = student_hidden.shape[:-1]
    given = [
        name
        for name, present in (
            ("logits", teacher_logits is not None),
            ("hidden", teacher_hidden is not None or teacher_head_weight is not None),
            ("topk", teacher_topk is not None),
        )
        if present
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one teacher: teacher_logits, teacher_hidden + teacher_head_weight, "
            f"or teacher_topk (got {given or 'none'})"
        )
    kind = given[0]
    if kind == "logits" and teacher_logits.shape != (*lead, vocab):
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} != {(*lead, vocab)}")
    if kind == "hidden":
        if teacher_hidden is None or teacher_head_weight is None:
            raise ValueError("teacher_hidden and teacher_head_weight must be given together")
        if teacher_head_weight.dim() != 2 or teacher_head_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher_head_weight {tuple(teacher_head_weight.shape)} must be "
                f"[{vocab}, teacher_hidden] (same vocabulary as the student)"
            )
        if teacher_hidden.shape != (*lead, teacher_head_weight.shape[1]):
            raise ValueError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} != "
                f"{(*lead, teacher_head_weight.shape[1])}"
            )
    if kind == "topk":
        ids, probs = teacher_topk
        if ids.shape != probs.shape or ids.shape[:-1] != lead:
            raise ValueError(
                f"teacher_topk (ids {tuple(ids.shape)}, probs {tuple(probs.shape)}) must both "
                f"be [{', '.join(map(str, lead))}, K]"
            )
    return kind


def check_kd_options(
    divergence_name: str,
    *,
    teacher_kind: str,
    beta: float,
    temperature: float,
    labels: Tensor | None,
    hard_label_weight: float,
    soft_scale: float,
    lead_shape: torch.Size,
) -> None:
    """Validate the scalar options of :func:`kd_loss` / ``chunked_kd_loss``."""
    if divergence_name not in DIVERGENCES:
        raise _unknown(divergence_name)
    if teacher_kind == "topk" and divergence_name != "forward_kl":
        raise ValueError(
            f"divergence {divergence_name!r} needs the teacher's full distribution; a cached "
            "teacher slice (teacher_topk) supports only 'forward_kl'"
        )
    _check_beta(beta)
    _check_temperature(temperature)
    if not 0.0 <= hard_label_weight <= 1.0:
        raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight}")
    if hard_label_weight > 0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels")
    if labels is not None and labels.shape != lead_shape:
        raise ValueError(f"labels {tuple(labels.shape)} must be {tuple(lead_shape)}")
    if not math.isfinite(soft_scale):
        raise ValueError(f"soft_scale must be finite, got {soft_scale}")


def kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    hard_label_weight: float = 0.0,
    ignore_index: int = -100,
    soft_scale: float = 1.0,
) -> Tensor:
    """KD objective from the student's final hidden states, computed naively on full logits.

    ``z = student_hidden @ student_head_weight.T`` (``[..., vocab]``) and::

        loss = (1 − w)·soft_scale·D_T(teacher, z) + w·CE(z, labels)

    averaged over the counted positions (``labels != ignore_index``; all positions when
    ``labels`` is None), with ``w = hard_label_weight``, ``D`` the named divergence at
    temperature ``T`` and ``CE`` at temperature 1. ``soft_scale`` defaults to 1 (no ``T²``);
    pass ``temperature**2`` for Hinton's scaling. The teacher is either full logits, its own
    hidden states and head (``teacher_hidden @ teacher_head_weight.T``), or a cached slice
    ``(ids, probs)`` (``forward_kl`` only); it gets no gradient.

    This builds every ``[tokens, vocab]`` tensor at once: it is the reference for
    :func:`kdspec_torch.chunked_loss.chunked_kd_loss`, which computes the same value and
    gradients in chunks.
    """
    kind = resolve_teacher(
        student_hidden,
        student_head_weight,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_head_weight=teacher_head_weight,
        teacher_topk=teacher_topk,
    )
    check_kd_options(
        divergence,
        teacher_kind=kind,
        beta=beta,
        temperature=temperature,
        labels=labels,
        hard_label_weight=hard_label_weight,
        soft_scale=soft_scale,
        lead_shape=student_hidden.shape[:-1],
    )
    dtype = _compute_dtype(student_hidden)
    logits = student_hidden.to(dtype) @ student_head_weight.to(dtype).T
    log_q = _log_probs(logits, temperature)
    if kind == "topk":
        ids, probs = (t.detach() for t in teacher_topk)
        terms = _slice_kl_terms(log_q, ids, probs)
    else:
        log_p = _teacher_log_probs(
            teacher_logits, teacher_hidden, teacher_head_weight, temperature, dtype
        )
        terms = _divergence_terms(divergence, log_p, log_q, beta)
    mask = None if labels is None else labels != ignore_index
    loss = (1.0 - hard_label_weight) * soft_scale * _masked_mean(terms, mask)
    if hard_label_weight > 0:
        # At T = 1 the student's log-probs are the hard-label ones: no second log-softmax.
        log_q1 = log_q if temperature == 1.0 else _log_probs(logits, 1.0)
        loss = loss + hard_label_weight * _nll(log_q1, labels, ignore_index)
    return loss


@torch.no_grad()
def _teacher_log_probs(
    logits: Tensor | None,
    hidden: Tensor | None,
    head_weight: Tensor | None,
    temperature: float,
    dtype: torch.dtype,
) -> Tensor:
    """The teacher's log-probs; its ``[tokens, vocab]`` logits die on return."""
    if logits is None:
        logits = hidden.to(dtype) @ head_weight.to(dtype).T
    return _log_probs(logits.to(dtype), temperature)


def _nll(log_probs: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``−log q_y`` averaged over the labels that are not ``ignore_index``."""
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    total = F.nll_loss(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)
