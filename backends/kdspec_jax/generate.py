"""Greedy generation with a KV cache, for the eval node's `rouge_l` and `accuracy`.

The torch backend's conventions (``kdspec_torch.generate``): prompts are ``[bos] + prompt``
(no other special tokens), left-truncated to ``max_prompt_tokens`` and left-padded; a padded
row's ``i``-th real token has position ``i`` and every generated token takes the next one, so a
row continues exactly as it would alone. Each step picks ``argmax`` of the next-token logits
(the first index on ties, as ``torch.argmax``); a row that emitted eos is finished and gets
``pad`` from then on; decoding stops when every row is finished or after ``max_new_tokens``
tokens. A row's generation is its tokens before its eos.

Shapes are fixed per call so that XLA compiles one prefill and one step: every batch is padded
to ``batch_size`` rows (copies of a real prompt, dropped afterwards) and every prompt to the
width of the longest one; the cache holds ``width + max_new_tokens`` slots. The two jitted
functions are module-level, so every caller with the same model config and shapes shares
their compilations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .data import JaxTokenizer
from .model import JaxModelConfig, KVCache, Params, forward_cached, init_kv_cache

__all__ = ["Sampled", "encode_prompts", "generate_text", "greedy_generate", "left_pad",
           "sample_generate", "sampling_probs", "warp_logits"]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int32, mask bool)``, both ``[B, width]`` (default: the longest), padded
    on the left."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token (e.g. a bos token)")
    width = width or max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = True
    return ids, mask


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(2,))
def _prefill(params: Params, config: JaxModelConfig, cache: KVCache, ids: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, KVCache, jax.Array]:
    """Read the prompts; return the first greedy token ``[B]``, the cache and each row's next
    position."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = forward_cached(params, config, cache, ids, positions, mask, 0)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache, jnp.sum(mask, axis=1)


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(2,))
def _step(params: Params, config: JaxModelConfig, cache: KVCache, token: jax.Array,
          position: jax.Array, index: jax.Array) -> tuple[jax.Array, KVCache]:
    """Append ``token [B]`` at ``position [B]`` into slot ``index``; the next greedy token."""
    ones = jnp.ones((token.shape[0], 1), bool)
    logits, cache = forward_cached(params, config, cache, token[:, None], position[:, None],
                                   ones, index)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def greedy_generate(params: Params, config: JaxModelConfig, ids: np.ndarray, mask: np.ndarray,
                    *, max_new_tokens: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch ``[B, P]``: each row's new tokens before
    its eos (module doc)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, width = ids.shape
    dtype = params["embed_tokens"].dtype
    cache = init_kv_cache(config, batch, width + max_new_tokens, dtype)
    token, cache, position = _prefill(params, config, cache, jnp.asarray(ids),
                                      jnp.asarray(mask))
    out = np.full((batch, max_new_tokens), pad_id, np.int64)
    done = np.zeros(batch, bool)
    lengths = np.zeros(batch, np.int64)
    for step in range(max_new_tokens):
        chosen = np.where(done, pad_id, np.asarray(token))
        out[:, step] = chosen
        lengths += ~done
        done |= chosen == eos_id
        if done.all() or step == max_new_tokens - 1:
            break
        token, cache = _step(params, config, cache, jnp.asarray(chosen, jnp.int32),
                             position + step, jnp.int32(width + step))
    return [out[row, : lengths[row] - int(done[row])].tolist() for row in range(batch)]


def encode_prompts(tokenizer: JaxTokenizer, prompts: Sequence[str],
                   max_prompt_tokens: int | None) -> list[list[int]]:
    """``[bos] + prompt`` ids of each prompt (no other special tokens), left-truncated."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    encoded = [bos + ids for ids in tokenizer.encode(list(prompts))]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    return encoded


def generate_text(params: Params, config: JaxModelConfig, tokenizer: JaxTokenizer,
                  prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
                  max_prompt_tokens: int | None = None) -> list[str]:
    """The decoded greedy continuation of each prompt (special tokens dropped, stripped), in
    order."""
    if not prompts:
        return []
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    width = max(len(ids) for ids in encoded)
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))  # fixed shapes: one compile
        ids, mask = left_pad(filled, tokenizer.pad_id, width)
        tokens = greedy_generate(params, config, ids, mask, max_new_tokens=max_new_tokens,
                                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        texts += tokenizer.decode(tokens[: len(chunk)])
    return texts


# --------------------------------------------------------------------------------------------
# Sampling (temperature, top-k, top-p) and teacher-mixed sampling, for MiniLLM rollouts
# --------------------------------------------------------------------------------------------


def warp_logits(logits: jax.Array, temperature: float, top_k: int = 0,
                top_p: float = 1.0) -> jax.Array:
    """``logits / T``, then top-k, then top-p over the last axis; removed tokens become −inf
    (``kdspec_torch.generate.warp_logits``). Top-k keeps the tokens at or above the k-th
    largest value; top-p drops a token when the mass of the tokens ranked above it already
    reaches ``p`` (so the top token always stays)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
    z = logits.astype(jnp.float32) / temperature
    if 0 < top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if top_p < 1.0:
        order = jnp.argsort(-z, axis=-1)
        sorted_z = jnp.take_along_axis(z, order, axis=-1)
        probs = jax.nn.softmax(sorted_z, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_z = jnp.where(mass_before >= top_p, -jnp.inf, sorted_z)
        z = jnp.take_along_axis(sorted_z, jnp.argsort(order, axis=-1), axis=-1)
    return z


def sampling_probs(logits: jax.Array, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> jax.Array:
    """``softmax(warp_logits(logits))``: the distribution one sampled step draws from."""
    return jax.nn.softmax(warp_logits(logits, temperature, top_k, top_p), axis=-1)


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(2,))
def _prefill_logits(params: Params, config: JaxModelConfig, cache: KVCache, ids: jax.Array,
                    mask: jax.Array) -> tuple[jax.Array, KVCache]:
    """Read the prompts; the next-token logits ``[B, V]`` and the cache."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return forward_cached(params, config, cache, ids, positions, mask, 0)


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(2,))
def _step_logits(params: Params, config: JaxModelConfig, cache: KVCache, token: jax.Array,
                 position: jax.Array, index: jax.Array) -> tuple[jax.Array, KVCache]:
    ones = jnp.ones((token.shape[0], 1), bool)
    return forward_cached(params, config, cache, token[:, None], position[:, None], ones, index)


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p", "alpha"))
def _draw(key: jax.Array, logits: jax.Array, mix_logits: jax.Array | None, *,
          temperature: float, top_k: int, top_p: float, alpha: float) -> jax.Array:
    """One token per row from ``(1 − α)·q + α·p`` (each warped first), or from ``q``."""
    probs = sampling_probs(logits, temperature, top_k, top_p)
    if mix_logits is not None:
        probs = (1.0 - alpha) * probs + alpha * sampling_probs(mix_logits, temperature, top_k,
                                                               top_p)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


@dataclass
class Sampled:
    """Sampled continuations of a batch: ``tokens [B, N]`` (pad after a row's eos),
    ``lengths [B]`` (tokens up to and including the first eos) and ``finished [B]`` (an eos
    was drawn)."""

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray


def sample_generate(params: Params, config: JaxModelConfig, ids: np.ndarray, mask: np.ndarray,
                    *, max_new_tokens: int, eos_id: int, pad_id: int, key: jax.Array,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    mix: tuple[Params, JaxModelConfig] | None = None,
                    mix_alpha: float = 0.0) -> Sampled:
    """Sample continuations of a left-padded batch ``[B, P]``, each step from the warped
    student distribution ``q``, or with ``mix = (teacher params, config)`` from
    ``(1 − α)·q + α·p`` (both warped with the same temperature, top-k and top-p; MiniLLM's
    teacher-mixed sampling), the two models decoding side by side, each with its own KV cache.
    Step ``i`` draws with ``fold_in(key, i)``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
    batch, width = ids.shape
    length = width + max_new_tokens
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    cache = init_kv_cache(config, batch, length, params["embed_tokens"].dtype)
    logits, cache = _prefill_logits(params, config, cache, ids_j, mask_j)
    mix_logits = mix_cache = None
    if mix is not None:
        mix_cache = init_kv_cache(mix[1], batch, length, mix[0]["embed_tokens"].dtype)
        mix_logits, mix_cache = _prefill_logits(mix[0], mix[1], mix_cache, ids_j, mask_j)
    position = jnp.sum(mask_j, axis=1)
    out = np.full((batch, max_new_tokens), pad_id, np.int64)
    done = np.zeros(batch, bool)
    lengths = np.zeros(batch, np.int64)
    options = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   alpha=float(mix_alpha))
    for step in range(max_new_tokens):
        token = _draw(jax.random.fold_in(key, step), logits, mix_logits, **options)
        chosen = np.where(done, pad_id, np.asarray(token))
        out[:, step] = chosen
        lengths += ~done
        done |= chosen == eos_id
        if done.all() or step == max_new_tokens - 1:
            break
        chosen_j = jnp.asarray(chosen, jnp.int32)
        index = jnp.int32(width + step)
        logits, cache = _step_logits(params, config, cache, chosen_j, position + step, index)
        if mix is not None:
            mix_logits, mix_cache = _step_logits(mix[0], mix[1], mix_cache, chosen_j,
                                                 position + step, index)
    return Sampled(out, lengths, done)
