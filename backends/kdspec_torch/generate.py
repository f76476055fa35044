"""Batched generation for causal LMs: left padding, a KV cache, greedy or sampled decoding.

One loop serves every stage that generates: greedy evaluation (ROUGE-L, accuracy), rationales,
sequence-level KD and MiniLLM rollouts. It can also return, per generated position,

* ``logits``: the policy model's raw next-token logits ``[B, N, V]`` (fp32);
* ``logprobs``: ``log softmax(logits)[token]`` ``[B, N]``, the model's own log-probability of the
  token it emitted (temperature 1, no filtering): the policy log-prob of a rollout;
* ``sample_logprobs``: the log-probability of the token under the distribution it was actually
  drawn from (after temperature, top-k, top-p and mixing): 0 for greedy decoding. The importance
  weight of a mixed rollout is ``exp(logprobs - sample_logprobs)`` at temperature 1.

Sampling distribution at one step, from the logits ``z`` (applied in this order, as in HF)::

    z / T  ->  keep the k largest (ties with the k-th kept)  ->  keep the smallest set of most
    probable tokens whose probability mass reaches p (always at least one)  ->  softmax

``T = 0`` is greedy decoding (``argmax z``, the first index on ties, like ``torch.argmax``).
With a ``mix_model`` (MiniLLM's teacher-mixed sampling) each model's logits are warped as above
and the probabilities are mixed, ``π = (1 - α)·π_policy + α·π_mix``; ``T > 0`` is required.

Positions: a left-padded row's ``i``-th real token has position ``i`` (``cumsum(mask) - 1``; pad
positions get 0 and are masked), and every generated token takes the next position, so a padded
prompt continues exactly as it would alone. After a row emits an eos token it is finished: it
gets ``pad_token_id`` from then on and ``mask`` is False there; decoding stops when every row is
finished or after ``max_new_tokens`` steps. Call ``model.eval()`` first; no gradients are kept.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "Generation",
    "KVDecoder",
    "Sampling",
    "generate",
    "generate_text",
    "left_pad",
    "sampling_probs",
    "warp_logits",
]


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1``
    disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> Sampling:
        """From a spec `GenerationConfig` (or its JSON dump)."""
        get = config.get if isinstance(config, Mapping) else lambda k, d: getattr(config, k, d)
        return cls(
            max_new_tokens=int(get("max_new_tokens", 64)),
            temperature=float(get("temperature", 0.0)),
            top_k=int(get("top_k", 0)),
            top_p=float(get("top_p", 1.0)),
        )


def warp_logits(logits: Tensor, sampling: Sampling) -> Tensor:
    """Temperature, then top-k, then top-p over the last dim; removed tokens become -inf."""
    if sampling.greedy:
        raise ValueError("greedy decoding has no sampling distribution to warp (temperature 0)")
    z = logits.float() / sampling.temperature
    if 0 < sampling.top_k < z.shape[-1]:
        kth = z.topk(sampling.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if sampling.top_p < 1:
        z = _top_p(z, sampling.top_p)
    return z


def _top_p(z: Tensor, p: float) -> Tensor:
    """Keep the most probable tokens until their mass reaches `p`: a token goes when the mass
    of the tokens ranked above it already reaches `p` (so the top token always stays)."""
    sorted_z, order = z.sort(dim=-1, descending=True)
    probs = sorted_z.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_z = sorted_z.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(z, float("-inf")).scatter(-1, order, sorted_z)


def sampling_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """``softmax(warp_logits(logits))``: the distribution one sampled step draws from."""
    return warp_logits(logits, sampling).softmax(dim=-1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both ``[B, max_len]`` int64, padded on the left."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token (e.g. a bos token)")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers 5 names the KV cache `cache`; older versions `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class KVDecoder:
    """One causal LM decoding a left-padded batch incrementally: ``prefill()`` reads the prompts
    once and returns the next-token logits ``[B, V]``; each ``step(tokens)`` appends one token per
    row (through the KV cache) and returns the logits after it."""

    def __init__(self, model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor):
        if model.config.is_encoder_decoder:
            raise ValueError("KVDecoder handles decoder-only (causal) models only")
        self.model = model
        self.input_ids = input_ids
        self.mask = attention_mask.long()
        self.cache: Any = None
        self._cache_key = _cache_kwarg(model)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        kwargs = {self._cache_key: self.cache, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, **kwargs)
        self.cache = getattr(out, self._cache_key)
        return out.logits[:, -1, :].float()

    def prefill(self) -> Tensor:
        positions = (self.mask.cumsum(dim=-1) - 1).masked_fill(self.mask == 0, 0)
        return self._forward(self.input_ids, positions)

    def step(self, tokens: Tensor) -> Tensor:
        positions = self.mask.sum(dim=-1, keepdim=True)  # real tokens so far = the next position
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
        return self._forward(tokens[:, None], positions)


@dataclass
class Generation:
    """The result of `generate`. ``tokens[b, :lengths[b]]`` are row b's new tokens (its eos
    included when ``finished[b]``); the rest is padding. Optional fields are None unless asked."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    tokens: Tensor  # [B, N] int64, N <= max_new_tokens
    mask: Tensor  # [B, N] bool: a real generated token
    finished: Tensor  # [B] bool: emitted an eos token
    logits: Tensor | None = None  # [B, N, V] fp32, raw policy logits
    logprobs: Tensor | None = None  # [B, N] log softmax(logits) at the emitted token
    sample_logprobs: Tensor | None = None  # [B, N] log π_sample(token); 0 when greedy

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=-1)

    def sequences(self) -> tuple[Tensor, Tensor]:
        """Prompt and generation as one batch ``(input_ids, attention_mask)``, ready for a full
        forward pass (e.g. to score the rollout under another model); pass
        ``position_ids = (mask.cumsum(-1) - 1).clamp(min=0)`` so positions match generation."""
        ids = torch.cat([self.prompt_ids, self.tokens], dim=-1)
        mask = torch.cat([self.prompt_mask.long(), self.mask.long()], dim=-1)
        return ids, mask

    def token_lists(self) -> list[list[int]]:
        """Each row's generated ids up to (excluding) its eos."""
        out = []
        for row, length, done in zip(self.tokens.tolist(), self.lengths.tolist(),
                                     self.finished.tolist(), strict=True):
            out.append(row[: length - 1] if done else row[:length])
        return out


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor:
    ids = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    return torch.tensor(ids, dtype=torch.long, device=device)


def _choose(probs: Tensor | None, logits: Tensor, generator: torch.Generator | None) -> Tensor:
    if probs is None:  # greedy
        return logits.argmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    sampling: Sampling,
    *,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    output_logits: bool = False,
    output_logprobs: bool = False,
    mix_model: PreTrainedModel | None = None,
    mix_alpha: float = 0.0,
) -> Generation:
    """Continue a left-padded batch of prompts (module doc). ``generator`` seeds the sampling
    (it must live on the model's device); greedy decoding ignores it."""
    if mix_model is not None and sampling.greedy:
        raise ValueError("teacher-mixed sampling needs temperature > 0")
    if not 0 <= mix_alpha <= 1:
        raise ValueError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
    policy = KVDecoder(model, input_ids, attention_mask)
    mixer = KVDecoder(mix_model, input_ids, attention_mask) if mix_model is not None else None
    eos = _eos_tensor(eos_token_id, input_ids.device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    steps: dict[str, list[Tensor]] = {"tokens": [], "mask": [], "logits": [], "logprobs": [],
                                      "sample_logprobs": []}
    logits = policy.prefill()
    mix_logits = mixer.prefill() if mixer is not None else None
    for step in range(sampling.max_new_tokens):
        probs = None if sampling.greedy else sampling_probs(logits, sampling)
        if mix_logits is not None:
            probs = (1 - mix_alpha) * probs + mix_alpha * sampling_probs(mix_logits, sampling)
        token = _choose(probs, logits, generator)
        token = token.masked_fill(done, pad_token_id)
        _record(steps, token, ~done, logits, probs, output_logits, output_logprobs)
        done = done | torch.isin(token, eos)
        if bool(done.all()) or step == sampling.max_new_tokens - 1:
            break
        logits = policy.step(token)
        mix_logits = mixer.step(token) if mixer is not None else None
    return Generation(
        prompt_ids=input_ids, prompt_mask=attention_mask,
        tokens=torch.stack(steps["tokens"], dim=1), mask=torch.stack(steps["mask"], dim=1),
        finished=done,
        logits=torch.stack(steps["logits"], dim=1) if output_logits else None,
        logprobs=torch.stack(steps["logprobs"], dim=1) if output_logprobs else None,
        sample_logprobs=torch.stack(steps["sample_logprobs"], dim=1) if output_logprobs else None,
    )


def _record(steps: dict[str, list[Tensor]], token: Tensor, live: Tensor, logits: Tensor,
            probs: Tensor | None, output_logits: bool, output_logprobs: bool) -> None:
    steps["tokens"].append(token)
    steps["mask"].append(live)
    if output_logits:
        steps["logits"].append(logits)
    if output_logprobs:
        picked = token[:, None]
        steps["logprobs"].append(logits.log_softmax(dim=-1).gather(-1, picked).squeeze(-1))
        sample = (torch.zeros_like(logits[:, 0]) if probs is None
                  else probs.gather(-1, picked).squeeze(-1).log())
        steps["sample_logprobs"].append(sample.masked_fill(~live, 0.0))


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampling: Sampling,
    *,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """The decoded continuation of each prompt (eos and special tokens dropped), in order.

    Prompts are encoded as the training pairs are (`batches.pair_rows`): ``[bos] + prompt``
    without the tokenizer's own special tokens, left-truncated to `max_prompt_tokens`. They are
    batched in order of length, which saves padding and does not change greedy outputs."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in chunk], tokenizer.pad_token_id)
        out = generate(model, ids.to(device), mask.to(device), sampling,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       generator=generator)
        decoded = tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
        for i, text in zip(chunk, decoded, strict=True):
            texts[i] = text.strip()
    return texts
