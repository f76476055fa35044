"""Teacher-logit cache slices in JAX: K (token id, probability) pairs per position.

A slice stands in for the teacher's full distribution ``p = softmax(logits / T)`` in the
forward-KL loss (:func:`kdspec_jax.losses.sparse_forward_kl_terms`); the definitions are the
torch backend's (``kdspec_torch.teacher_slice``):

* :func:`topk_slice`: the K most probable tokens, renormalised over the K. Deterministic, but
  biased: the tail mass moves onto the head (Anshumann et al. 2025, arXiv 2503.16870).
* :func:`sampled_slice`: K i.i.d. draws from ``p``; the target is the empirical frequency
  (Gemma 3, arXiv 2503.19786), so ``E[target] = p`` and the loss is unbiased.

Both return ``(ids int32, probs fp32)``, each ``[..., K]``, probabilities summing to 1 per
position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["densify_slice", "sampled_slice", "topk_slice"]


def _check(logits: jax.Array, k: int, temperature: float) -> None:
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocab={vocab}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled(logits: jax.Array, temperature: float) -> jax.Array:
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return x / temperature if temperature != 1.0 else x


def topk_slice(logits: jax.Array, k: int, *, temperature: float = 1.0
               ) -> tuple[jax.Array, jax.Array]:
    """The K most probable tokens and ``p_{id_k} / Σ_j p_{id_j} = softmax(logits_ids / T)``:
    the softmax of the kept logits equals the renormalised full softmax (the normaliser
    cancels). Ties go to the lower token id (``lax.top_k``)."""
    _check(logits, k, temperature)
    values, ids = jax.lax.top_k(_scaled(logits, temperature), k)
    return ids.astype(jnp.int32), jax.nn.softmax(values, axis=-1)


def sampled_slice(logits: jax.Array, k: int, key: jax.Array, *, temperature: float = 1.0
                  ) -> tuple[jax.Array, jax.Array]:
    """K i.i.d. draws from ``p = softmax(logits / T)``; target ``c_v / K`` for a token drawn
    ``c_v`` times, an unbiased estimate of ``p_v`` (``E[c_v] = K·p_v``).

    The draws are sorted per position; each distinct id's weight sits on its first slot and
    its repeats keep the id with probability 0, so the shape stays ``[..., K]`` and the
    padding slots count for nothing in the loss (the torch backend's layout)."""
    _check(logits, k, temperature)
    scaled = _scaled(logits, temperature)
    draws = jax.random.categorical(key, scaled[..., None, :], axis=-1,
                                   shape=(*scaled.shape[:-1], k))
    ids = jnp.sort(draws.astype(jnp.int32), axis=-1)
    first = jnp.concatenate([jnp.ones_like(ids[..., :1], bool),
                             ids[..., 1:] != ids[..., :-1]], axis=-1)
    # c_v for the slot's id: how many of the K sorted draws equal it.
    counts = jnp.sum(ids[..., :, None] == ids[..., None, :], axis=-1)
    return ids, jnp.where(first, counts / k, 0.0).astype(jnp.float32)


def densify_slice(ids: jax.Array, probs: jax.Array, vocab: int) -> jax.Array:
    """The slice as a dense ``[..., vocab]`` distribution (zero off the slice; repeated ids
    add)."""
    one_hot = jax.nn.one_hot(ids, vocab, dtype=probs.dtype)
    return jnp.einsum("...k,...kv->...v", probs, one_hot)
