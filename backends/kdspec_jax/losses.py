"""Knowledge-distillation losses on logits, in JAX, with the torch backend's conventions.

* ``p`` is the teacher's distribution and ``q`` the student's, both ``softmax(logits / T)`` at the
  loss temperature ``T``. Logits are ``[..., vocab]``.
* Each divergence is summed over the vocabulary per position, then averaged over the counted
  positions (``mask`` True, over the leading dims); an all-masked input gives 0, not NaN.
* No ``T²`` factor is applied here: the caller scales the soft term.
* Everything is computed in fp32 (or wider) from ``log_softmax``; terms with ``p == 0`` are
  exactly 0 (``0 · log 0 = 0``), with gradient 0, so ``-inf`` logits never produce NaN.

Each mean-reduced loss has a ``*_terms`` twin returning the per-position values; the train step
sums those over a whole batch of micro-batches and divides once by the number of counted
positions, so gradient accumulation and sharding do not change the loss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "cross_entropy",
    "cross_entropy_terms",
    "divergence",
    "divergence_terms",
    "forward_kl",
    "generalized_jsd",
    "kl_terms",
    "log_probs",
    "masked_mean",
    "reverse_kl",
    "soft_cross_entropy",
    "sparse_forward_kl",
    "sparse_forward_kl_terms",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
"""Divergence names as users write them in YAML (``loss.divergence``)."""

IGNORE_INDEX = -100
"""Label of a position that is not predicted (padding, prompt tokens)."""

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must be in [0, 1], got {beta}")


def _check_pair(student_logits: Array, teacher_logits: Array) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [..., vocab]"
        )


def log_probs(logits: Array, temperature: float = 1.0) -> Array:
    """``log softmax(logits / T)`` over the last axis, in fp32 or wider."""
    _check_temperature(temperature)
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if temperature != 1.0:
        x = x / temperature
    return jax.nn.log_softmax(x, axis=-1)


def kl_terms(log_a: Array, log_b: Array) -> Array:
    """Per-position ``KL(a‖b) = Σ_v a_v (log a_v − log b_v)`` from log-probabilities.

    Where ``a_v == 0`` the term is exactly 0, also when ``log b_v = -inf``; the ``where`` on the
    difference (not on the product) keeps that term's gradient 0 instead of ``0 · inf = NaN``.
    """
    a = jnp.exp(log_a)
    diff = jnp.where(a > 0, log_a - log_b, 0.0)
    return jnp.sum(a * diff, axis=-1)


def _cross_entropy_terms(log_a: Array, log_b: Array) -> Array:
    """Per-position ``H(a, b) = −Σ_v a_v log b_v``, with ``0 · log 0 = 0``."""
    a = jnp.exp(log_a)
    return -jnp.sum(a * jnp.where(a > 0, log_b, 0.0), axis=-1)


def masked_mean(values: Array, mask: Array | None = None) -> Array:
    """Mean of per-position ``values`` over ``mask`` (True = counted); 0 when none counts."""
    if mask is None:
        return jnp.sum(values) / max(values.size, 1)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a bool array, got {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading dims "
            f"{tuple(values.shape)}"
        )
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1)


# --------------------------------------------------------------------------------------------
# Divergences on full distributions
# --------------------------------------------------------------------------------------------


def _jsd_terms(log_p: Array, log_q: Array, beta: float) -> Array:
    if beta == 0.0:
        return kl_terms(log_p, log_q)
    if beta == 1.0:
        return kl_terms(log_q, log_p)
    log_m = jnp.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * kl_terms(log_p, log_m) + (1.0 - beta) * kl_terms(log_q, log_m)


def divergence_terms(
    name: str,
    student_logits: Array,
    teacher_logits: Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Array:
    """Per-position divergence ``name`` (``forward_kl``, ``reverse_kl`` or ``jsd``), ``[...]``.

    forward_kl ``KL(p‖q)``; reverse_kl ``KL(q‖p)``; jsd the generalised JSD of
    :func:`generalized_jsd`.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; expected one of {', '.join(DIVERGENCES)}")
    _check_pair(student_logits, teacher_logits)
    _check_beta(beta)
    log_q = log_probs(student_logits, temperature)
    log_p = log_probs(teacher_logits, temperature)
    if name == "forward_kl":
        return kl_terms(log_p, log_q)
    if name == "reverse_kl":
        return kl_terms(log_q, log_p)
    return _jsd_terms(log_p, log_q, beta)


def forward_kl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """Forward KL, ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)``, averaged over counted positions.

    ``p = softmax(teacher / T)``, ``q = softmax(student / T)``: mass-covering; Hinton/Gemma 2
    KD up to the teacher's entropy (see :func:`soft_cross_entropy`).
    """
    terms = divergence_terms("forward_kl", student_logits, teacher_logits,
                             temperature=temperature)
    return masked_mean(terms, mask)


def reverse_kl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """Reverse KL, ``KL(q‖p) = Σ_v q_v (log q_v − log p_v)``, averaged over counted positions.

    Mode-seeking: the per-token quantity MiniLLM's policy gradient optimises.
    """
    terms = divergence_terms("reverse_kl", student_logits, teacher_logits,
                             temperature=temperature)
    return masked_mean(terms, mask)


def generalized_jsd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """Generalised Jensen-Shannon divergence of TRL's GKD (Agarwal et al. 2024, Eq. 1).

    With ``m = β·p + (1 − β)·q`` (teacher weight β)::

        JSD_β = β·KL(p‖m) + (1 − β)·KL(q‖m)        for 0 < β < 1
        JSD_0 = KL(p‖q)   (forward KL)              special case, as in TRL
        JSD_1 = KL(q‖p)   (reverse KL)              special case, as in TRL

    The special cases are not the limits of the formula (it tends to 0 at both ends).
    ``log m`` is a ``logaddexp`` of the two log-probabilities, finite wherever ``p + q > 0``.
    """
    terms = divergence_terms("jsd", student_logits, teacher_logits, beta=beta,
                             temperature=temperature)
    return masked_mean(terms, mask)


def soft_cross_entropy(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """Soft-target cross-entropy ``H(p, q) = −Σ_v p_v log q_v`` (Gemma 2's KD objective);
    ``H(p, q) = KL(p‖q) + H(p)``, so its student gradient is that of :func:`forward_kl`."""
    _check_pair(student_logits, teacher_logits)
    log_q = log_probs(student_logits, temperature)
    log_p = log_probs(teacher_logits, temperature)
    return masked_mean(_cross_entropy_terms(log_p, log_q), mask)


def divergence(
    name: str,
    student_logits: Array,
    teacher_logits: Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """The divergence called ``name`` in the spec, averaged over the counted positions
    (``beta`` is used by ``jsd`` only)."""
    terms = divergence_terms(name, student_logits, teacher_logits, beta=beta,
                             temperature=temperature)
    return masked_mean(terms, mask)


# --------------------------------------------------------------------------------------------
# Hard labels
# --------------------------------------------------------------------------------------------


def cross_entropy_terms(
    logits: Array, labels: Array, *, ignore_index: int = IGNORE_INDEX
) -> Array:
    """Per-position ``−log softmax(logits)_y`` (temperature 1); 0 where ``y == ignore_index``."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' leading dims "
            f"{tuple(logits.shape[:-1])}"
        )
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    logp = log_probs(logits)
    picked = jnp.take_along_axis(logp, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(valid, -picked, 0.0)


def cross_entropy(
    logits: Array,
    labels: Array,
    *,
    ignore_index: int = IGNORE_INDEX,
    mask: Array | None = None,
) -> Array:
    """Hard-label cross-entropy ``−log softmax(logits)_y``, averaged over the positions whose
    label is not ``ignore_index`` (and, if given, where ``mask`` is True); 0 if none counts."""
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask
    terms = cross_entropy_terms(logits, labels, ignore_index=ignore_index)
    return masked_mean(terms, counted)


# --------------------------------------------------------------------------------------------
# A cached teacher slice (top-K or sampled-K)
# --------------------------------------------------------------------------------------------


def sparse_forward_kl_terms(
    student_logits: Array,
    teacher_ids: Array,
    teacher_probs: Array,
    *,
    temperature: float = 1.0,
) -> Array:
    """Per-position forward KL against a teacher slice: ``Σ_k p_k (log p_k − log q_{id_k})``.

    ``teacher_ids``/``teacher_probs`` are ``[..., K]`` (probabilities summing to 1 per
    position; slots with ``p_k = 0`` are padding). ``q = softmax(student / T)`` over the FULL
    vocabulary; the slice was fixed when it was cached. Only the forward KL has a slice form:
    the reverse KL and JSD weight tokens outside the slice, whose teacher mass is unknown.
    """
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
    log_q = log_probs(student_logits, temperature)
    log_q_ids = jnp.take_along_axis(log_q, teacher_ids.astype(jnp.int32), axis=-1)
    p = teacher_probs.astype(log_q.dtype)
    support = p > 0
    log_p = jnp.log(jnp.where(support, p, 1.0))
    return jnp.sum(p * jnp.where(support, log_p - log_q_ids, 0.0), axis=-1)


def sparse_forward_kl(
    student_logits: Array,
    teacher_ids: Array,
    teacher_probs: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """:func:`sparse_forward_kl_terms` averaged over the counted positions."""
    terms = sparse_forward_kl_terms(student_logits, teacher_ids, teacher_probs,
                                    temperature=temperature)
    return masked_mean(terms, mask)

