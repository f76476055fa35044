"""MiniLLM rollouts: teacher-mixed sampling with a KV cache, then batched scoring.

A round's prompts are encoded as the training pairs are (`[bos] + prompt`, no other special
tokens), left-truncated to `max_prompt_length` and sampled in chunks of `chunk_size` prompts by
`kdspec_torch.generate.generate`, which decodes the student and the teacher side by side, each
with its own KV cache, from `mix = α·p_T + (1 − α)·q_S` (each model's logits warped by the
temperature, top-k and top-p first, as in the official fork of transformers). A response gets at
most `max_length − max_prompt_length` tokens: the official pipeline pads every prompt to
`max_prompt_length` and generates up to `max_length` in all.

Each chunk is then scored by one full forward pass of each model over prompt + response (the
official sampler also recomputes these rather than trusting the decoding loop's numerics):

* `old_logprobs` `log q_S(y_t)`: at the sampling temperature, over the student's top-k/top-p set;
* `weights` `w_t = q_S(y_t) / (α·p_T(y_t) + (1 − α)·q_S(y_t))`, the teacher at the sampling
  temperature over the same set (as the official sampler does);
* `rewards` `r_t = clip((log p_T(y_t) − log q_S(y_t)) / reward_scaling, ±cliprange_reward)`, the
  teacher at temperature 1 over the full vocabulary (the official reward model).

A rollout's response runs up to and including its first eos (the official mask, which counts a
position when the token *before* it is not padding, includes that eos too).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generate import Sampling, generate, left_pad, warp_logits
from .math import (
    importance_weights,
    per_token_reverse_kl,
    tempered,
    token_logprobs,
    token_rewards,
)

__all__ = [
    "Rollout",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutStats",
    "collate",
    "encode_prompts",
    "response_logits",
    "sample_rollouts",
    "score",
]


@dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are sampled and scored (the `minillm` stage's knobs of the same names)."""

    max_prompt_length: int
    max_length: int
    teacher_mix_alpha: float = 0.2
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    reward_scaling: float = 0.5
    cliprange_reward: float | None = 100.0

    def __post_init__(self) -> None:
        if self.max_length <= self.max_prompt_length:
            raise ValueError(
                f"max_length ({self.max_length}) must exceed max_prompt_length "
                f"({self.max_prompt_length}): a response gets max_length − max_prompt_length "
                "tokens")

    @property
    def sampling(self) -> Sampling:
        return Sampling(max_new_tokens=self.max_length - self.max_prompt_length,
                        temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p removes tokens (then the kept set is stored per token)."""
        return self.top_k > 0 or self.top_p < 1.0


@dataclass
class Rollout:
    """One prompt's sampled response and what the PPO epochs need, on the CPU. `keep[t]` is
    the student's top-k/top-p set at response position t (None when nothing is filtered)."""

    prompt: list[int]
    response: Tensor  # [n] int64, up to and including the first eos
    old_logprobs: Tensor  # [n]
    weights: Tensor  # [n]
    rewards: Tensor  # [n]
    keep: Tensor | None = None  # [n, V] bool


@dataclass
class RolloutBatch:
    """Rollouts collated for a forward pass: prompts left-padded to width `prompt_width`,
    responses right-padded to `response.shape[1]`. Per-token fields are `[B, R]`."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    prompt_width: int
    response: Tensor
    mask: Tensor  # bool: a response token
    old_logprobs: Tensor | None = None
    weights: Tensor | None = None
    rewards: Tensor | None = None
    keep: Tensor | None = None

    def to(self, device: torch.device) -> RolloutBatch:
        moved = {name: value.to(device) if isinstance(value, Tensor) else value
                 for name, value in self.__dict__.items()}
        return RolloutBatch(**moved)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class RolloutStats:
    """What one call of `sample_rollouts` produced and how fast."""

    rollouts: int = 0
    response_tokens: int = 0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    reverse_kl_sum: float = 0.0  # Σ over response tokens of the exact KL(q_S ‖ p_T) there
    reward_sum: float = 0.0  # Σ over rollouts of Σ_t r_t / |y|
    finished: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def merge(self, other: RolloutStats) -> None:
        for name in ("rollouts", "response_tokens", "generate_seconds", "score_seconds",
                     "reverse_kl_sum", "reward_sum", "finished"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict[str, float]:
        n, tokens = max(self.rollouts, 1), max(self.response_tokens, 1)
        return {
            "rollout_len": self.response_tokens / n,
            "rollout_finished": self.finished / n,
            "reward": self.reward_sum / n,
            "rev_kl": self.reverse_kl_sum / tokens,
            "rollout_tokens_per_s": self.response_tokens / max(self.generate_seconds, 1e-9),
            "score_seconds": self.score_seconds,
        }


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_prompt_length: int) -> list[list[int]]:
    """`[bos] + prompt` token ids (as `batches.pair_rows` builds training rows), keeping the
    last `max_prompt_length` tokens of a longer prompt."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [(bos + ids)[-max_prompt_length:] for ids in encoded]


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Tensor], pad_id: int,
            rollouts: Sequence[Rollout] | None = None) -> RolloutBatch:
    """One batch of prompt + response rows; with `rollouts`, their per-token fields too
    (zero-padded; `keep` padded with True)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(len(r) for r in responses)
    response = torch.full((len(responses), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for row, tokens in enumerate(responses):
        response[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = True
    attention = torch.cat([prompt_mask, mask.long()], dim=1)
    batch = RolloutBatch(
        input_ids=torch.cat([prompt_ids, response], dim=1),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).masked_fill(attention == 0, 0),
        prompt_width=prompt_ids.shape[1],
        response=response,
        mask=mask,
    )
    if rollouts is not None:
        for name in ("old_logprobs", "weights", "rewards"):
            setattr(batch, name, _pad_rows([getattr(r, name) for r in rollouts], width, 0.0))
        if rollouts[0].keep is not None:
            batch.keep = _pad_rows([r.keep for r in rollouts], width, True)
    return batch


def _pad_rows(rows: Sequence[Tensor], width: int, value: float | bool) -> Tensor:
    out = torch.full((len(rows), width, *rows[0].shape[1:]), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


def response_logits(model: PreTrainedModel, batch: RolloutBatch) -> Tensor:
    """`[B, R, V]` logits; position t holds the distribution of response token t (the logits
    at sequence positions `P − 1 … P + R − 2`). Only those positions go through the head."""
    width = batch.response.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, logits_to_keep=width + 1)
    return out.logits[:, :-1]


@dataclass
class Scores:
    """Per-token scores of a batch of rollouts (`[B, R]`, zero outside the mask)."""

    old_logprobs: Tensor
    weights: Tensor
    rewards: Tensor
    reverse_kl: Tensor  # exact Σ_v q(v)(log q(v) − log p(v)) at the sampling temperature


@torch.no_grad()
def score(student: PreTrainedModel, teacher: PreTrainedModel, batch: RolloutBatch,
          config: RolloutConfig) -> Scores:
    """Old log-probs, teacher-mix weights, rewards and the exact reverse KL of each response
    token, from one batched forward pass of each model (module docstring)."""
    s_logits = response_logits(student, batch).float()
    t_logits = response_logits(teacher, batch).float()
    s_tempered = tempered(s_logits, config.temperature, batch.keep)
    t_tempered = tempered(t_logits, config.temperature, batch.keep)
    tokens, mask = batch.response, batch.mask
    log_q = token_logprobs(s_tempered, tokens)
    weights = importance_weights(log_q, token_logprobs(t_tempered, tokens),
                                 config.teacher_mix_alpha)
    rewards = token_rewards(token_logprobs(t_logits, tokens), log_q, mask,
                            reward_scaling=config.reward_scaling,
                            cliprange_reward=config.cliprange_reward)
    rev_kl = per_token_reverse_kl(s_tempered, t_tempered)
    zero = torch.zeros_like(log_q)
    return Scores(torch.where(mask, log_q, zero), torch.where(mask, weights, zero), rewards,
                  torch.where(mask, rev_kl, zero))


def _keep_sets(raw_logits: Tensor, tokens: Tensor, sampling: Sampling) -> Tensor:
    """The student's top-k/top-p set per position, plus the sampled token (a token drawn from
    the teacher's share of the mixture may lie outside the student's set; its log q would be
    −inf and its PPO ratio undefined, so it is added rather than dropped)."""
    keep = torch.isfinite(warp_logits(raw_logits, sampling))
    return keep.scatter(-1, tokens[..., None], True)


def sample_rollouts(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig,
    *,
    pad_id: int,
    eos_id: int,
    generator: torch.Generator | None = None,
    chunk_size: int = 8,
) -> tuple[list[Rollout], RolloutStats]:
    """Sample one response per prompt from the teacher-mixed distribution and score it.
    Both models must be in eval mode; the student is put back in train mode by the caller."""
    device = next(student.parameters()).device
    rollouts: list[Rollout] = []
    stats = RolloutStats()
    for start in range(0, len(prompts), chunk_size):
        chunk = [list(p) for p in prompts[start:start + chunk_size]]
        made, chunk_stats = _sample_chunk(student, teacher, chunk, config, pad_id=pad_id,
                                          eos_id=eos_id, generator=generator, device=device)
        rollouts.extend(made)
        stats.merge(chunk_stats)
    return rollouts, stats


def _sample_chunk(student: PreTrainedModel, teacher: PreTrainedModel, prompts: list[list[int]],
                  config: RolloutConfig, *, pad_id: int, eos_id: int,
                  generator: torch.Generator | None,
                  device: torch.device) -> tuple[list[Rollout], RolloutStats]:
    ids, mask = left_pad(prompts, pad_id)
    started = time.perf_counter()
    mix = config.teacher_mix_alpha > 0
    gen = generate(student, ids.to(device), mask.to(device), config.sampling,
                   eos_token_id=eos_id, pad_token_id=pad_id, generator=generator,
                   output_logits=config.filtered, mix_model=teacher if mix else None,
                   mix_alpha=config.teacher_mix_alpha)
    generated = time.perf_counter()
    responses = [gen.tokens[row, :n].cpu() for row, n in enumerate(gen.lengths.tolist())]
    batch = collate(prompts, responses, pad_id)
    if config.filtered:  # padding positions keep everything, so no row is all -inf
        keep = _keep_sets(gen.logits, gen.tokens, config.sampling).cpu()
        batch.keep = torch.where(batch.mask[..., None], keep, True)
    scores = score(student, teacher, batch.to(device), config)
    stats = RolloutStats(
        rollouts=len(prompts), response_tokens=int(batch.mask.sum()),
        generate_seconds=generated - started, score_seconds=time.perf_counter() - generated,
        reverse_kl_sum=float(scores.reverse_kl.sum()),
        reward_sum=float((scores.rewards.sum(-1) / batch.mask.sum(-1).clamp_min(1)).sum()),
        finished=int(gen.finished.sum()),
    )
    out = []
    for row, tokens in enumerate(responses):
        n = len(tokens)
        out.append(Rollout(
            prompt=prompts[row], response=tokens,
            old_logprobs=scores.old_logprobs[row, :n].cpu(), weights=scores.weights[row, :n].cpu(),
            rewards=scores.rewards[row, :n].cpu(),
            keep=None if batch.keep is None else batch.keep[row, :n].clone()))
    return out, stats
