"""MiniLLM's loss pieces as small pure functions (Gu et al., ICLR 2024; microsoft/LMOps minillm/).

Notation. `q` is the student (the policy), `p` the teacher, `y_t` the response token sampled at
response position `t`, `m_t ∈ {0, 1}` the response mask (1 from the first response token up to
and including the first eos). Per-token tensors are `[batch, response]`; logits are
`[batch, response, vocab]`, where position `t` holds the distribution that `y_t` was drawn from.

Where the official code (LMOps `minillm/minillm/{sampler,losses,utils}.py`) fixes a convention
that the paper leaves open, the docstring says so. One deliberate difference: advantages are
whitened over the response tokens only; the official code whitens the whole padded
`[batch, max_length - max_prompt_length]` tensor, so its statistics include a number of padding
zeros that depends on the generation budget (see :func:`masked_whiten`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import cross_entropy_loss, reverse_kl, soft_cross_entropy

__all__ = [
    "PretrainTerms",
    "advantages",
    "clip_fraction",
    "discounted_returns",
    "importance_weights",
    "masked_mean",
    "masked_whiten",
    "mixture_probs",
    "normalised_returns",
    "per_token_reverse_kl",
    "policy_ratio",
    "ppo_policy_loss",
    "pretrain_loss",
    "remaining_tokens",
    "single_step_loss",
    "tempered",
    "token_logprobs",
    "token_rewards",
]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """`Σ_t m_t x_t / Σ_t m_t` over all dims; 0 when nothing is masked in. Entries outside the
    mask never reach the result (not even as `0 · inf = nan`)."""
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# Teacher-mixed sampling
# --------------------------------------------------------------------------------------------


def mixture_probs(student_probs: Tensor, teacher_probs: Tensor, alpha: float) -> Tensor:
    """The teacher-mixed sampling distribution `mix = α·p + (1 − α)·q` (paper §2.2; the
    official sampler mixes the two models' probabilities after each has had its own
    temperature / top-k / top-p applied, and so does kdspec)."""
    _check_alpha(alpha)
    return alpha * teacher_probs + (1.0 - alpha) * student_probs


def importance_weights(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float) -> Tensor:
    """Per sampled token, `w_t = q(y_t) / (α·p(y_t) + (1 − α)·q(y_t))`.

    Computed in log space, `w = exp(log q − logaddexp(log(1−α) + log q, log α + log p))`, so it
    stays exact when the probabilities are tiny. `0 ≤ w ≤ 1/(1 − α)`; `w = 1` when `α = 0`.
    The official sampler evaluates both probabilities with a fresh full forward pass after the
    rollout (at the sampling temperature, restricted to the student's top-k/top-p set)."""
    _check_alpha(alpha)
    if alpha == 0.0:
        return torch.ones_like(student_logprobs)
    log_q, log_p = student_logprobs.float(), teacher_logprobs.float()
    if alpha == 1.0:
        return torch.exp(log_q - log_p)
    log_mix = torch.logaddexp(log_q + math.log1p(-alpha), log_p + math.log(alpha))
    return torch.exp(log_q - log_mix)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"teacher_mix_alpha must be in [0, 1], got {alpha}")


# --------------------------------------------------------------------------------------------
# Log-probabilities of sampled tokens
# --------------------------------------------------------------------------------------------


def tempered(logits: Tensor, temperature: float = 1.0, keep: Tensor | None = None) -> Tensor:
    """`logits / T` in fp32, with `-inf` outside `keep` (the top-k/top-p set the token was
    sampled from), so a softmax of the result is the distribution actually sampled from."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = logits.float() / temperature if temperature != 1.0 else logits.float()
    if keep is not None:
        out = out.masked_fill(~keep, -math.inf)
    return out


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """`log softmax(logits)[y_t]` per position: `[..., V]`, `[...]` -> `[...]` (fp32)."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Rewards, returns, advantages
# --------------------------------------------------------------------------------------------


def token_rewards(
    teacher_logprobs: Tensor,
    student_logprobs: Tensor,
    mask: Tensor,
    *,
    reward_scaling: float = 1.0,
    cliprange_reward: float | None = None,
) -> Tensor:
    """Per-token reward `r_t = clip((log p(y_t) − log q(y_t)) / s, −c, c)·m_t`.

    The official sampler *divides* by `reward_scaling` (s = 0.5 in the paper scripts doubles
    the rewards) and clips afterwards, to `±cliprange_reward` (c = 100 there); so does this.
    `log p` is the teacher's log-prob at temperature 1 (the official reward model applies no
    temperature); `log q` is the student's at the sampling temperature.
    """
    if not reward_scaling > 0:
        raise ValueError(f"reward_scaling must be > 0, got {reward_scaling}")
    rewards = (teacher_logprobs.float() - student_logprobs.float()) / reward_scaling
    if cliprange_reward is not None:
        rewards = rewards.clamp(-cliprange_reward, cliprange_reward)
    return torch.where(mask, rewards, torch.zeros_like(rewards))


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """`R_t = Σ_{t' ≥ t} γ^{t'−t} r_{t'}` along the last dim, by the reverse recurrence
    `R_t = r_t + γ·R_{t+1}` (relative discounts: no `γ^t` underflow on long responses).

    As in the official `_get_advantages_and_returns`, `R_t` includes the reward of `y_t`
    itself (the paper's long-term term uses `R_{t+1}`; see docs/minillm.md)."""
    out = torch.empty_like(rewards, dtype=torch.promote_types(rewards.dtype, torch.float32))
    running = torch.zeros_like(out[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


def remaining_tokens(mask: Tensor) -> Tensor:
    """`N_t = Σ_{t' ≥ t} m_{t'}`, the response tokens from `t` to the end, with `N_t := 1`
    where that is 0 (the official code's guard against dividing by zero)."""
    counts = mask.float().flip(-1).cumsum(-1).flip(-1)
    return counts.masked_fill(counts == 0, 1.0)


def normalised_returns(
    rewards: Tensor, mask: Tensor, *, gamma: float, length_norm: bool = True
) -> Tensor:
    """`R_t / N_t` (length-normalised, paper Eq. 7) or `R_t`, zero outside the mask."""
    returns = discounted_returns(rewards, gamma)
    if length_norm:
        returns = returns / remaining_tokens(mask)
    return torch.where(mask, returns, torch.zeros_like(returns))


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """`(x − μ) / sqrt(σ² + ε)` with the mean `μ` and the Bessel-corrected variance `σ²` (as
    `torch.var_mean`, which the official `whiten` uses) taken over the masked-in entries only;
    0 outside the mask. One deliberate difference from the official code, which whitens the
    whole padded tensor: padding is not data, so it does not enter the statistics."""
    n = mask.sum()
    mean = masked_mean(values, mask)
    centred = torch.where(mask, values - mean, torch.zeros_like(values))
    var = (centred**2).sum() / (n - 1).clamp_min(1)
    return centred * torch.rsqrt(var + eps)


def advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    length_norm: bool = True,
    whiten: bool = True,
) -> Tensor:
    """The advantages of the long-term policy-gradient term: `A_t = whiten(R_t / N_t)` over the
    mini-batch's response tokens (the official code recomputes them per PPO mini-batch from
    the rollout's stored rewards). Detached: they are constants of the policy loss."""
    out = normalised_returns(rewards, mask, gamma=gamma, length_norm=length_norm)
    if whiten:
        out = masked_whiten(out, mask)
    return out.detach()


# --------------------------------------------------------------------------------------------
# The PPO policy loss
# --------------------------------------------------------------------------------------------


def policy_ratio(logprobs: Tensor, old_logprobs: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """`ρ_t = exp(log q_θ(y_t) − log q_old(y_t))·w_t`: the PPO ratio times the teacher-mix
    importance weight (the official `_pg_loss` multiplies the two before clipping). Outside
    the mask the log-ratio is taken as 0, so `ρ_t = w_t` there and nothing overflows."""
    log_ratio = torch.where(mask, logprobs.float() - old_logprobs.float(),
                            torch.zeros_like(logprobs, dtype=torch.float32))
    return torch.exp(log_ratio) * weights


def ppo_policy_loss(ratio: Tensor, advantages: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """`L = Σ_t m_t·max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε)) / Σ_t m_t` (PPO's clipped
    surrogate, negated to a loss; mean over the response tokens of the mini-batch)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return masked_mean(torch.maximum(unclipped, clipped), mask)


def clip_fraction(ratio: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """Share of response tokens whose ratio lies outside `[1 − ε, 1 + ε]` (a PPO health stat)."""
    outside = (ratio - 1.0).abs() > clip_range
    return masked_mean(outside.float(), mask)


# --------------------------------------------------------------------------------------------
# The single-step term and the pre-training regulariser
# --------------------------------------------------------------------------------------------


def per_token_reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """`KL_t = Σ_v q(v)·(log q(v) − log p(v))` per position, `q, p = softmax(logits)` (pass
    tempered logits); terms with `q(v) = 0` are 0, also where `p(v) = 0`."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)


def single_step_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """The single-step part of the decomposition: the exact per-position reverse KL
    `KL_t = Σ_v q(v)·(log q(v) − log p(v))` from the full distributions, averaged over the
    response tokens. The official `_reg_loss` computes it as `H(q, p) − H(q)` from logits at
    the sampling temperature (both restricted to the rollout's top-k/top-p set); pass them
    through :func:`tempered` first. The teacher is detached here."""
    return reverse_kl(student_logits, teacher_logits.detach(), mask=mask)


@dataclass
class PretrainTerms:
    """The pre-training loss and its parts (for logging)."""

    total: Tensor
    lm: Tensor
    distil: Tensor | None


def pretrain_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    kd_ratio: float = 0.0,
    ignore_index: int = -100,
) -> PretrainTerms:
    """`L_PT = (1 − r)·CE(labels) + r·H(p_T, q_S)` on a pre-training batch, `r = kd_ratio`,
    both averaged over the positions whose label is not `ignore_index`.

    `H(p, q) = −Σ_v p(v) log q(v)` is the soft cross-entropy the official `pt_loss` uses: forward
    KL plus the teacher's entropy, so it has the forward-KL gradient. Without a teacher (or
    with `r = 0`) the loss is the LM cross-entropy alone."""
    lm = cross_entropy_loss(student_logits, labels, ignore_index=ignore_index)
    if teacher_logits is None or kd_ratio == 0.0:
        return PretrainTerms(lm, lm, None)
    distil = soft_cross_entropy(student_logits, teacher_logits.detach(),
                                mask=labels != ignore_index)
    return PretrainTerms((1.0 - kd_ratio) * lm + kd_ratio * distil, lm, distil)
