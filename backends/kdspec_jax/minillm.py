"""The `minillm` stage on JAX: on-policy reverse-KL distillation by policy gradient (Gu et al.,
ICLR 2024), the torch backend's equations (``kdspec_torch.minillm``; docs/minillm.md).

Notation: ``q`` the student (policy), ``p`` the teacher, ``y_t`` the response token at response
position ``t``, ``m_t`` the response mask (1 up to and including the first eos), ``τ`` the
rollout temperature; per-token arrays are ``[B, R]``, logits ``[B, R, V]`` with position ``t``
holding the distribution ``y_t`` was drawn from.

**Rollouts.** Round ``r`` takes samples ``[r·N, (r+1)·N)`` of the seeded epoch stream over the
prompts (``[bos] + prompt``, last ``max_prompt_length`` tokens), samples them in chunks of
``batch_size`` from ``mix = α·p^τ + (1 − α)·q^τ`` (each warped by temperature/top-k/top-p first;
`kdspec_jax.generate.sample_generate`, a KV cache per model) for at most
``R = max_length − max_prompt_length`` tokens, then scores each chunk with one full forward pass
of each model:

    old log-prob    log q^τ(y_t)
    weight          w_t = q^τ(y_t) / (α·p^τ(y_t) + (1 − α)·q^τ(y_t))
    reward          r_t = clip((log p(y_t) − log q^τ(y_t)) / s, −c, c)     (teacher at τ = 1)

With top-k/top-p, ``q^τ, p^τ`` are restricted to the student's set ``K_t``, here computed from the
scoring pass (torch takes it from the decoding loop's logits; the two agree up to float
rounding), with the sampled token added.

**Loss of one optimizer step** on a mini-batch of ``batch_size`` rollouts::

    A_t      = whiten(R_t / N_t),   R_t = r_t + γ·R_{t+1},   N_t = Σ_{t'≥t} m_{t'}
    ρ_t      = exp(log q_θ^τ(y_t) − log q_old^τ(y_t)) · w_t
    L_PG     = Σ_t m_t·max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)) / Σ_t m_t
    L_single = Σ_t m_t·KL(q_θ^τ ‖ p^τ)_t / Σ_t m_t
    L_PT     = (1 − r)·CE(labels) + r·H(p_T, q_S)        on `batch_size` rows of pretrain_data
    L        = L_PG + [single_step_reg]·L_single + lm_coef·L_PT

Advantages are whitened over the whole step's response tokens; with ``grad_accum > 1`` each
micro-batch's policy terms are weighted by its share of the response tokens and its ``L_PT`` by
its share of the pre-training targets (the torch split).

**Loop.** ``for round: rollouts; for epoch in ppo_epochs: for each seeded mini-batch (last
partial one dropped): one step``; ``steps`` counts optimizer steps and may stop inside a round.
Checkpoints are written at the end of the round in which a multiple of ``checkpoint_every``
falls and at the last step; a resumed run restarts at that round boundary and redoes what an
uninterrupted one would (every random draw is seeded by (seed, stage, round[, epoch, chunk])).
The random streams are numpy / ``jax.random``, so JAX and torch runs draw different rollouts.

Events and files: the torch stage's (`start`; per round a `metrics` event with ``round``,
``rollouts``, ``rollout_len``, ``rollout_finished``, ``reward``, ``rev_kl``,
``rollout_tokens_per_s``, ``score_seconds``; per step `progress` and every ``log_every`` a
`metrics` event with ``loss``, ``pg_loss``, ``reg_loss``, ``rl_loss``, ``clip_frac``, ``ratio``,
``pt_loss``, ``lm_loss``, ``ds_loss``, ``grad_norm``, ``lr``, ``ppo_epoch``, ``tokens``,
``tokens_per_s``); ``model/``, ``flops.json``, ``measured.json``.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json

from .checkpoint import (
    Progress,
    latest_checkpoint,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from .data import (
    IGNORE_INDEX,
    EpochSampler,
    TokenRows,
    build_token_rows,
    derive_seed,
    load_tokenizer,
    order_seed,
    read_records,
)
from .flops import matmul_flops
from .generate import encode_prompts, left_pad, sample_generate, warp_logits
from .model import JaxModelConfig, Params, forward
from .models import LoadedModel, compute_dtype, load_model, save_student
from .optim import build_optimizer, lr_schedule
from .train_node import stage_of
from .train_step import TrainState, init_train_state

__all__ = [
    "Rollouts", "advantages", "clip_fraction", "discounted_returns", "importance_weights",
    "make_ppo_step", "masked_mean", "masked_whiten", "mixture_probs", "normalised_returns",
    "per_token_reverse_kl", "policy_ratio", "ppo_policy_loss", "pretrain_loss",
    "remaining_tokens", "run_minillm_node", "single_step_loss", "steps_per_round", "tempered",
    "token_logprobs", "token_rewards",
]

Array = jax.Array

# --------------------------------------------------------------------------------------------
# The math (kdspec_torch.minillm.math, function for function)
# --------------------------------------------------------------------------------------------


def masked_mean(values: Array, mask: Array) -> Array:
    """``Σ m·x / Σ m`` over all axes; 0 when nothing is masked in (outside entries never reach
    the result, not even as ``0·inf``)."""
    kept = jnp.where(mask, values, 0.0)
    return jnp.sum(kept) / jnp.maximum(jnp.sum(mask), 1)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"teacher_mix_alpha must be in [0, 1], got {alpha}")


def mixture_probs(student_probs: Array, teacher_probs: Array, alpha: float) -> Array:
    """``mix = α·p + (1 − α)·q``."""
    _check_alpha(alpha)
    return alpha * teacher_probs + (1.0 - alpha) * student_probs


def importance_weights(student_logprobs: Array, teacher_logprobs: Array, alpha: float) -> Array:
    """``w_t = q(y_t) / (α·p(y_t) + (1 − α)·q(y_t))``, in log space:
    ``exp(log q − logaddexp(log(1 − α) + log q, log α + log p))``; 1 when ``α = 0``."""
    _check_alpha(alpha)
    log_q = student_logprobs.astype(jnp.float32)
    if alpha == 0.0:
        return jnp.ones_like(log_q)
    log_p = teacher_logprobs.astype(jnp.float32)
    if alpha == 1.0:
        return jnp.exp(log_q - log_p)
    log_mix = jnp.logaddexp(log_q + math.log1p(-alpha), log_p + math.log(alpha))
    return jnp.exp(log_q - log_mix)


def tempered(logits: Array, temperature: float = 1.0, keep: Array | None = None) -> Array:
    """``logits / T`` in fp32, −inf outside ``keep`` (the set a token was sampled from)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = logits.astype(jnp.float32)
    if temperature != 1.0:
        out = out / temperature
    return out if keep is None else jnp.where(keep, out, -jnp.inf)


def token_logprobs(logits: Array, tokens: Array) -> Array:
    """``log softmax(logits)[y_t]`` per position (fp32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_rewards(teacher_logprobs: Array, student_logprobs: Array, mask: Array, *,
                  reward_scaling: float = 1.0, cliprange_reward: float | None = None) -> Array:
    """``r_t = clip((log p(y_t) − log q(y_t)) / s, −c, c)·m_t`` (divide by s, then clip, as the
    official sampler)."""
    if not reward_scaling > 0:
        raise ValueError(f"reward_scaling must be > 0, got {reward_scaling}")
    rewards = (teacher_logprobs.astype(jnp.float32) - student_logprobs) / reward_scaling
    if cliprange_reward is not None:
        rewards = jnp.clip(rewards, -cliprange_reward, cliprange_reward)
    return jnp.where(mask, rewards, 0.0)


def discounted_returns(rewards: Array, gamma: float) -> Array:
    """``R_t = Σ_{t'≥t} γ^{t'−t} r_{t'}`` along the last axis, by ``R_t = r_t + γ·R_{t+1}``
    (a reverse scan; ``R_t`` includes ``r_t``, as the official advantages)."""
    def body(running: Array, reward: Array) -> tuple[Array, Array]:
        running = reward + gamma * running
        return running, running

    xs = jnp.moveaxis(rewards.astype(jnp.float32), -1, 0)
    _, out = jax.lax.scan(body, jnp.zeros_like(xs[0]), xs, reverse=True)
    return jnp.moveaxis(out, 0, -1)


def remaining_tokens(mask: Array) -> Array:
    """``N_t = Σ_{t'≥t} m_{t'}``, 1 where that is 0."""
    counts = jnp.flip(jnp.cumsum(jnp.flip(mask.astype(jnp.float32), -1), -1), -1)
    return jnp.where(counts == 0, 1.0, counts)


def normalised_returns(rewards: Array, mask: Array, *, gamma: float,
                       length_norm: bool = True) -> Array:
    """``R_t / N_t`` (or ``R_t``), zero outside the mask."""
    returns = discounted_returns(rewards, gamma)
    if length_norm:
        returns = returns / remaining_tokens(mask)
    return jnp.where(mask, returns, 0.0)


def masked_whiten(values: Array, mask: Array, eps: float = 1e-8) -> Array:
    """``(x − μ)/sqrt(σ² + ε)`` with the mean and Bessel-corrected variance over the masked-in
    entries only; 0 outside."""
    n = jnp.sum(mask)
    centred = jnp.where(mask, values - masked_mean(values, mask), 0.0)
    var = jnp.sum(centred**2) / jnp.maximum(n - 1, 1)
    return centred * jax.lax.rsqrt(var + eps)


def advantages(rewards: Array, mask: Array, *, gamma: float, length_norm: bool = True,
               whiten: bool = True) -> Array:
    """``A_t = whiten(R_t / N_t)`` over the response tokens; constants of the policy loss."""
    out = normalised_returns(rewards, mask, gamma=gamma, length_norm=length_norm)
    if whiten:
        out = masked_whiten(out, mask)
    return jax.lax.stop_gradient(out)


def policy_ratio(logprobs: Array, old_logprobs: Array, weights: Array, mask: Array) -> Array:
    """``ρ_t = exp(log q_θ(y_t) − log q_old(y_t))·w_t`` (log-ratio 0 outside the mask)."""
    log_ratio = jnp.where(mask, logprobs - old_logprobs, 0.0)
    return jnp.exp(log_ratio) * weights


def ppo_policy_loss(ratio: Array, adv: Array, mask: Array, clip_range: float) -> Array:
    """``Σ_t m_t·max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)) / Σ_t m_t``."""
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return masked_mean(jnp.maximum(unclipped, clipped), mask)


def clip_fraction(ratio: Array, mask: Array, clip_range: float) -> Array:
    """Share of response tokens whose ratio lies outside ``[1 − ε, 1 + ε]``."""
    return masked_mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32), mask)


def per_token_reverse_kl(student_logits: Array, teacher_logits: Array) -> Array:
    """``KL_t = Σ_v q(v)·(log q(v) − log p(v))``; terms with ``q(v) = 0`` are 0 (and get a zero
    gradient: the logs are replaced before the product, so no ``0·inf`` reaches a gradient)."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    q = jnp.exp(log_q)
    live = q > 0
    diff = jnp.where(live, log_q, 0.0) - jnp.where(live, log_p, 0.0)
    return jnp.sum(jnp.where(live, q * diff, 0.0), axis=-1)


def single_step_loss(student_logits: Array, teacher_logits: Array, mask: Array) -> Array:
    """``Σ_t m_t·KL(q_t ‖ p_t) / Σ_t m_t`` from the full (tempered) distributions; the
    teacher gets no gradient."""
    kl = per_token_reverse_kl(student_logits, jax.lax.stop_gradient(teacher_logits))
    return masked_mean(kl, mask)


def pretrain_loss(student_logits: Array, labels: Array, *, teacher_logits: Array | None = None,
                  kd_ratio: float = 0.0) -> dict[str, Array]:
    """``L_PT = (1 − r)·CE(labels) + r·H(p_T, q_S)``, both averaged over the positions whose
    label is not -100, ``H(p, q) = −Σ_v p(v) log q(v)`` (the official ``pt_loss``). Returns
    ``{"total", "lm"}`` and ``"distil"`` when the teacher term is on."""
    counted = labels != IGNORE_INDEX
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_q, jnp.where(counted, labels, 0)[..., None], -1)[..., 0]
    lm = masked_mean(-picked, counted)
    if teacher_logits is None or kd_ratio == 0.0:
        return {"total": lm, "lm": lm}
    p = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    distil = masked_mean(-jnp.sum(p * log_q, axis=-1), counted)
    return {"total": (1.0 - kd_ratio) * lm + kd_ratio * distil, "lm": lm, "distil": distil}


# --------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are sampled and scored (the stage's knobs of the same names)."""

    max_prompt_length: int
    max_length: int
    teacher_mix_alpha: float = 0.2
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    reward_scaling: float = 0.5
    cliprange_reward: float | None = 100.0

    @property
    def response_length(self) -> int:
        return self.max_length - self.max_prompt_length

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def rollout_config(stage: Any) -> RolloutConfig:
    return RolloutConfig(stage.max_prompt_length, stage.max_length, stage.teacher_mix_alpha,
                         stage.temperature, stage.top_k, stage.top_p, stage.reward_scaling,
                         stage.cliprange_reward)


@dataclass
class Rollouts:
    """A round's rollouts as fixed-shape numpy arrays: prompts left-padded to
    ``max_prompt_length`` (``P``), responses right-padded to ``R``; per-token fields
    ``[N, R]`` (zero outside ``mask``); ``keep [N, R, V]`` the sampling set (None: all)."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    response: np.ndarray
    mask: np.ndarray
    old_logprobs: np.ndarray
    weights: np.ndarray
    rewards: np.ndarray
    keep: np.ndarray | None = None

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The rows ``index`` as a batch of the PPO step (`sequence_inputs` added)."""
        out = {name: getattr(self, name)[index] for name in
               ("response", "mask", "old_logprobs", "weights", "rewards")}
        out.update(sequence_inputs(self.prompt_ids[index], self.prompt_mask[index],
                                   out["response"], out["mask"]))
        if self.keep is not None:
            out["keep"] = self.keep[index]
        return out


def sequence_inputs(prompt_ids: np.ndarray, prompt_mask: np.ndarray, response: np.ndarray,
                    mask: np.ndarray) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask`` and ``positions`` of prompt + response rows (a row's
    ``i``-th real token at position ``i``, as during decoding)."""
    attention = np.concatenate([prompt_mask, mask], axis=1).astype(np.int32)
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
    ids = np.concatenate([prompt_ids, response], axis=1).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attention, "positions": positions}


def response_logits(params: Params, config: JaxModelConfig, batch: dict[str, Array],
                    dtype: Any = None) -> Array:
    """``[B, R, V]``: position ``t`` holds the distribution of response token ``t`` (the
    logits at sequence positions ``P − 1 … P + R − 2``)."""
    prompt_width = batch["input_ids"].shape[1] - batch["response"].shape[1]
    logits = forward(params, config, batch["input_ids"], batch["attention_mask"],
                     positions=batch["positions"], compute_dtype=dtype)
    return logits[:, prompt_width - 1:-1]


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _score(student: Params, teacher: Params, s_config: JaxModelConfig,
           t_config: JaxModelConfig, rollout: RolloutConfig,
           batch: dict[str, Array]) -> dict[str, Array]:
    """Old log-probs, weights, rewards, the exact reverse KL and (filtered) the keep sets."""
    s_logits = response_logits(student, s_config, batch)
    t_logits = response_logits(teacher, t_config, batch)
    tokens, mask = batch["response"], batch["mask"]
    keep = None
    if rollout.filtered:
        keep = jnp.isfinite(warp_logits(s_logits, rollout.temperature, rollout.top_k,
                                        rollout.top_p))
        keep = keep | jax.nn.one_hot(tokens, keep.shape[-1], dtype=bool)  # the drawn token
        keep = jnp.where(mask[..., None], keep, True)
    s_t = tempered(s_logits, rollout.temperature, keep)
    t_t = tempered(t_logits, rollout.temperature, keep)
    log_q = token_logprobs(s_t, tokens)
    weights = importance_weights(log_q, token_logprobs(t_t, tokens), rollout.teacher_mix_alpha)
    rewards = token_rewards(token_logprobs(t_logits, tokens), log_q, mask,
                            reward_scaling=rollout.reward_scaling,
                            cliprange_reward=rollout.cliprange_reward)
    out = {"old_logprobs": jnp.where(mask, log_q, 0.0), "weights": jnp.where(mask, weights, 0.0),
           "rewards": rewards,
           "reverse_kl": jnp.where(mask, per_token_reverse_kl(s_t, t_t), 0.0)}
    if keep is not None:
        out["keep"] = keep
    return out


@dataclass
class RolloutStats:
    """What one round's sampling produced and how fast (`summary()` is the round event)."""

    rollouts: int = 0
    response_tokens: int = 0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    reverse_kl_sum: float = 0.0
    reward_sum: float = 0.0
    finished: int = 0

    def summary(self) -> dict[str, float]:
        n, tokens = max(self.rollouts, 1), max(self.response_tokens, 1)
        return {"rollout_len": self.response_tokens / n, "rollout_finished": self.finished / n,
                "reward": self.reward_sum / n, "rev_kl": self.reverse_kl_sum / tokens,
                "rollout_tokens_per_s": self.response_tokens / max(self.generate_seconds, 1e-9),
                "score_seconds": self.score_seconds}


def sample_rollouts(student: LoadedModel, teacher: LoadedModel, prompts: Sequence[list[int]],
                    rollout: RolloutConfig, *, pad_id: int, eos_id: int, key: Array,
                    chunk_size: int) -> tuple[Rollouts, RolloutStats]:
    """One response per prompt from the teacher-mixed distribution, scored (module doc).
    Chunk ``c`` samples with ``fold_in(key, c)``; every chunk has ``chunk_size`` rows (a short
    last one is filled with copies, dropped afterwards), so one compilation serves all."""
    parts: list[dict[str, np.ndarray]] = []
    stats = RolloutStats()
    mix = (teacher.params, teacher.config) if rollout.teacher_mix_alpha > 0 else None
    for c, start in enumerate(range(0, len(prompts), chunk_size)):
        chunk = list(prompts[start:start + chunk_size])
        real = len(chunk)
        chunk += [chunk[0]] * (chunk_size - real)
        ids, pmask = left_pad(chunk, pad_id, rollout.max_prompt_length)
        started = time.perf_counter()
        sampled = sample_generate(
            student.params, student.config, ids, pmask,
            max_new_tokens=rollout.response_length, eos_id=eos_id, pad_id=pad_id,
            key=jax.random.fold_in(key, c), temperature=rollout.temperature,
            top_k=rollout.top_k, top_p=rollout.top_p, mix=mix,
            mix_alpha=rollout.teacher_mix_alpha)
        generated = time.perf_counter()
        width = rollout.response_length
        mask = np.arange(width)[None, :] < sampled.lengths[:, None]
        response = np.where(mask, sampled.tokens, pad_id).astype(np.int32)
        batch = {"response": response, "mask": mask,
                 **sequence_inputs(ids, pmask, response, mask)}
        scores = jax.device_get(_score(student.params, teacher.params, student.config,
                                       teacher.config, rollout, batch))
        part = {"prompt_ids": ids, "prompt_mask": pmask, **batch, **scores}
        parts.append({k: v[:real] for k, v in part.items()})
        kept = mask[:real]
        stats.rollouts += real
        stats.response_tokens += int(kept.sum())
        stats.generate_seconds += generated - started
        stats.score_seconds += time.perf_counter() - generated
        stats.reverse_kl_sum += float(scores["reverse_kl"][:real].sum())
        stats.reward_sum += float((scores["rewards"][:real].sum(-1)
                                   / np.maximum(kept.sum(-1), 1)).sum())
        stats.finished += int(sampled.finished[:real].sum())
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Rollouts(joined["prompt_ids"], joined["prompt_mask"], joined["response"],
                    joined["mask"], joined["old_logprobs"], joined["weights"],
                    joined["rewards"], joined.get("keep")), stats


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOConfig:
    """The loss knobs of a step (static: part of the compiled step)."""

    temperature: float = 1.0
    clip_range: float = 0.2
    gamma: float = 0.95
    length_norm: bool = True
    single_step_reg: bool = True
    kd_ratio: float = 0.5
    lm_coef: float = 1.0
    grad_accum: int = 1


def ppo_config(stage: Any) -> PPOConfig:
    return PPOConfig(stage.temperature, stage.clip_range, stage.gamma, stage.length_norm,
                     stage.single_step_reg, stage.kd_ratio, stage.lm_coef, stage.grad_accum)


def _split(batch: dict[str, Array], prefix: str, parts: int) -> list[dict[str, Array]]:
    """The keys starting with `prefix` (prefix removed), cut into `parts` row blocks."""
    chosen = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
    rows = next(iter(chosen.values())).shape[0]
    size = rows // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in chosen.items()} for i in range(parts)]


def make_ppo_step(s_config: JaxModelConfig, t_config: JaxModelConfig, ppo: PPOConfig,
                  optimizer: optax.GradientTransformation, lr_fn: optax.Schedule,
                  dtype: Any = None) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """``step(state, batch, teacher_params) -> (state, metrics)``: the loss of one optimizer
    step (module doc) over ``batch`` (the rollout fields, and ``pt_*`` pre-training rows when
    the regulariser is on), its gradient, clipping and the AdamW update."""

    def policy_terms(params: Params, teacher: Params, mb: dict[str, Array],
                     adv: Array) -> dict[str, Array]:
        keep = mb.get("keep")
        student = tempered(response_logits(params, s_config, mb, dtype), ppo.temperature, keep)
        frozen = tempered(response_logits(teacher, t_config, mb, dtype), ppo.temperature, keep)
        ratio = policy_ratio(token_logprobs(student, mb["response"]), mb["old_logprobs"],
                             mb["weights"], mb["mask"])
        pg = ppo_policy_loss(ratio, adv, mb["mask"], ppo.clip_range)
        reg = single_step_loss(student, frozen, mb["mask"])
        ratio = jax.lax.stop_gradient(ratio)
        return {"pg_loss": pg, "reg_loss": reg,
                "rl_loss": pg + reg if ppo.single_step_reg else pg,
                "clip_frac": clip_fraction(ratio, mb["mask"], ppo.clip_range),
                "ratio": masked_mean(ratio, mb["mask"])}

    def pt_terms(params: Params, teacher: Params, mb: dict[str, Array]) -> dict[str, Array]:
        logits = forward(params, s_config, mb["input_ids"], mb["attention_mask"],
                         compute_dtype=dtype)
        t_logits = None
        if ppo.kd_ratio > 0:
            t_logits = forward(teacher, t_config, mb["input_ids"], mb["attention_mask"],
                               compute_dtype=dtype)
        terms = pretrain_loss(logits, mb["labels"], teacher_logits=t_logits,
                              kd_ratio=ppo.kd_ratio)
        out = {"pt_loss": terms["total"], "lm_loss": terms["lm"]}
        if "distil" in terms:
            out["ds_loss"] = terms["distil"]
        return out

    def loss_fn(params: Params, batch: dict[str, Array],
                teacher: Params) -> tuple[Array, dict[str, Array]]:
        adv = advantages(batch["rewards"], batch["mask"], gamma=ppo.gamma,
                         length_norm=ppo.length_norm, whiten=True)  # over the whole step
        total_tokens = jnp.maximum(jnp.sum(batch["mask"]), 1)
        rollout_mbs = _split({**batch, "adv": adv}, "", ppo.grad_accum)
        loss, logged = jnp.zeros((), jnp.float32), {}
        for mb in rollout_mbs:
            mb = {k: v for k, v in mb.items() if not k.startswith("pt_")}
            weight = jnp.sum(mb["mask"]) / total_tokens
            terms = policy_terms(params, teacher, mb, mb["adv"])
            loss = loss + weight * terms["rl_loss"]
            logged = {k: logged.get(k, 0.0) + weight * v for k, v in terms.items()}
        if "pt_labels" in batch:
            pt_total = jnp.maximum(jnp.sum(batch["pt_labels"] != IGNORE_INDEX), 1)
            for mb in _split(batch, "pt_", ppo.grad_accum):
                weight = jnp.sum(mb["labels"] != IGNORE_INDEX) / pt_total
                terms = pt_terms(params, teacher, mb)
                loss = loss + ppo.lm_coef * weight * terms["pt_loss"]
                logged = {**logged, **{k: logged.get(k, 0.0) + weight * v
                                       for k, v in terms.items()}}
        logged["loss"] = loss
        return loss, logged

    def step(state: TrainState, batch: dict[str, Array],
             teacher: Params) -> tuple[TrainState, dict[str, Array]]:
        (_, logged), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                      teacher)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**logged, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------


def steps_per_round(stage: Any) -> int:
    """Optimizer steps per round: ``ppo_epochs · ⌊num_rollouts / batch_size⌋``."""
    minibatches = stage.num_rollouts // stage.batch_size
    if minibatches == 0:
        raise ValueError(f"stage `{stage.name}`: num_rollouts ({stage.num_rollouts}) < "
                         f"batch_size ({stage.batch_size}) leaves no full PPO mini-batch")
    return stage.ppo_epochs * minibatches


def minibatch_order(seed: int, stage: Any, round_index: int, epoch: int) -> list[np.ndarray]:
    """One PPO epoch's mini-batches: a seeded permutation cut into ``batch_size`` pieces, the
    last partial one dropped."""
    rng = np.random.default_rng(derive_seed(seed, "ppo", stage.name, round_index, epoch))
    order = rng.permutation(stage.num_rollouts)
    size = stage.batch_size
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


@dataclass
class MiniLLMJob:
    ctx: NodeContext
    stage: Any
    tokenizer: Any
    student: LoadedModel
    teacher: LoadedModel
    prompts: list[list[int]]
    prompt_sampler: EpochSampler
    pretrain: TokenRows | None
    pretrain_sampler: EpochSampler | None
    seed: int

    def pretrain_batch(self, step: int) -> dict[str, np.ndarray]:
        """Step `step`'s pre-training rows (`pt_` keys; a packed batch gets an all-ones mask
        so both layouts share one step signature)."""
        if self.pretrain is None or self.pretrain_sampler is None:
            return {}
        size = self.stage.batch_size
        batch = self.pretrain.batch(self.pretrain_sampler.indices(step * size, size))
        batch.setdefault("attention_mask", np.ones_like(batch["input_ids"], np.int32))
        return {f"pt_{k}": v for k, v in batch.items()}


def _job(ctx: NodeContext) -> MiniLLMJob:
    stage = stage_of(ctx)
    config = ctx.node.config
    seed = config["seed"]
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=ctx.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    student = load_model(config["student"], ctx=ctx, role="student", tokenizer=tokenizer,
                         trainable=True)
    teacher = load_model(config["teacher"], ctx=ctx, role="teacher", tokenizer=tokenizer,
                         trainable=False)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocabulary ({student.config.vocab_size}) and teacher "
                         f"vocabulary ({teacher.config.vocab_size}) must match for minillm")
    records = read_records(config["data"], seed=seed, spec_dir=ctx.spec_dir)
    if not records or "prompt" not in records[0]:
        raise KeyError(f"stage `{stage.name}` samples from prompts: data `{stage.data}` needs a "
                       "`prompt` field (map one with the data source's `fields: {prompt: ...}`)")
    prompts = encode_prompts(tokenizer, [str(r["prompt"]) for r in records],
                             stage.max_prompt_length)
    pretrain = pt_sampler = None
    if config.get("pretrain_data") is not None:
        pt_records = read_records(config["pretrain_data"], seed=seed, spec_dir=ctx.spec_dir)
        layout = "packed" if pt_records and "text" in pt_records[0] else "pairs"
        pretrain = build_token_rows(layout, pt_records, tokenizer, stage.seq_len)
        pt_sampler = EpochSampler(len(pretrain), order_seed(seed, config["pretrain_data"]))
    return MiniLLMJob(ctx, stage, tokenizer, student, teacher, prompts,
                      EpochSampler(len(prompts), order_seed(seed, config["data"])), pretrain,
                      pt_sampler, seed)


def collect_rollouts(job: MiniLLMJob, params: Params,
                     round_index: int) -> tuple[Rollouts, RolloutStats]:
    """Round `round_index`'s rollouts from its slice of the prompt stream, with a key seeded
    by the round (a resumed run samples the same ones)."""
    n = job.stage.num_rollouts
    index = job.prompt_sampler.indices(round_index * n, n)
    key = jax.random.key(derive_seed(job.seed, "rollout", job.stage.name, round_index) % 2**32)
    student = replace(job.student, params=params)
    return sample_rollouts(student, job.teacher, [job.prompts[i] for i in index],
                           rollout_config(job.stage), pad_id=job.tokenizer.pad_id,
                           eos_id=job.tokenizer.eos_id, key=key, chunk_size=job.stage.batch_size)


def _resume(job: MiniLLMJob, template: TrainState, per_round: int) -> tuple[TrainState,
                                                                              Progress]:
    ctx = job.ctx
    remove_partial(ctx.checkpoint_dir)
    path = latest_checkpoint(ctx.checkpoint_dir)
    if path is None:
        return template, Progress()
    state, progress = load_checkpoint(path, template)
    if progress.step % per_round and progress.step < job.stage.total_steps:
        raise RuntimeError(
            f"checkpoint {path} is at step {progress.step}, inside a round of {per_round} "
            "steps; minillm resumes at round boundaries only (delete the checkpoint to restart)")
    ctx.emit(Event("message", ctx.node.id, step=progress.step,
                   message=f"resumed from {path.name} (step {progress.step}, round "
                           f"{progress.step // per_round})"))
    return state, progress


def run_minillm_node(ctx: NodeContext) -> None:
    """Train the node's student with MiniLLM (module doc) and save it to `<node>/model`."""
    job = _job(ctx)
    stage = job.stage
    total, per_round = stage.total_steps, steps_per_round(stage)
    optimizer = build_optimizer(stage.optimizer, stage.schedule, total)
    lr_fn = lr_schedule(stage.optimizer, stage.schedule, total)
    step_fn = make_ppo_step(job.student.config, job.teacher.config, ppo_config(stage),
                            optimizer, lr_fn, compute_dtype(stage.precision))
    compiled = jax.jit(step_fn, donate_argnums=(0,))
    state, progress = _resume(job, init_train_state(job.student.params, optimizer), per_round)
    ctx.emit(Event("start", ctx.node.id, step=progress.step, total=total))
    last_saved = progress.step
    while progress.step < total:
        round_index = progress.step // per_round
        rollouts, stats = collect_rollouts(job, state.params, round_index)
        values = {"step": progress.step, "round": round_index, "rollouts": stats.rollouts,
                  **{k: round(v, 6) for k, v in stats.summary().items()}}
        ctx.emit(Event("metrics", ctx.node.id, step=progress.step, values=values))
        progress = replace(progress, samples=progress.samples + stats.rollouts,
                           wall_seconds=progress.wall_seconds + stats.generate_seconds
                           + stats.score_seconds)
        for epoch in range(stage.ppo_epochs):
            for index in minibatch_order(job.seed, stage, round_index, epoch):
                if progress.step >= total:
                    break
                batch = {**rollouts.take(index), **job.pretrain_batch(progress.step)}
                if not (ctx.node_dir / "flops.json").exists():
                    _write_flops(job, step_fn, state, batch, rollouts, per_round)
                started = time.perf_counter()
                state, metrics = compiled(state, batch, job.teacher.params)
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - started
                tokens = int(batch["attention_mask"].sum()) + int(
                    batch.get("pt_attention_mask", np.zeros(0)).sum())
                progress = replace(progress, step=progress.step + 1,
                                   tokens=progress.tokens + tokens,
                                   wall_seconds=progress.wall_seconds + elapsed)
                _report_step(ctx, progress, stage, tokens / elapsed, logged, epoch)
        if progress.step >= total or progress.step // stage.checkpoint_every > \
                last_saved // stage.checkpoint_every:
            save_checkpoint(ctx.checkpoint_dir, state, progress)
            last_saved = progress.step
    save_student(job.student, state.params, job.tokenizer, ctx.node_dir / "model")
    _write_measured(ctx, progress)


def _report_step(ctx: NodeContext, progress: Progress, stage: Any, tokens_per_s: float,
                 logged: dict[str, float], epoch: int) -> None:
    node, total, lr = ctx.node.id, stage.total_steps, logged.pop("lr")
    ctx.emit(Event("progress", node, step=progress.step, total=total,
                   values={"loss": logged["loss"], "tokens_per_s": tokens_per_s, "lr": lr}))
    if progress.step % stage.log_every == 0 or progress.step == total:
        values = {"step": progress.step, "tokens": progress.tokens, "ppo_epoch": epoch,
                  **logged, "lr": lr, "tokens_per_s": tokens_per_s}
        ctx.emit(Event("metrics", node, step=progress.step, values=values))


def _write_flops(job: MiniLLMJob, step_fn: Callable[..., Any], state: TrainState,
                 batch: dict[str, np.ndarray], rollouts: Rollouts, per_round: int) -> None:
    """`flops.json`: matmul FLOPs from the traced programs: the optimizer step, plus one
    round's scoring passes spread over its steps. The token-by-token decoding of the rollouts
    is not counted (a Python loop of cached steps, not one traced program)."""
    started = time.perf_counter()
    step = matmul_flops(step_fn, state, batch, job.teacher.params)
    size = job.stage.batch_size
    chunk = {k: v[:size] for k, v in rollouts.take(np.arange(size)).items()
             if k in ("response", "mask", "input_ids", "attention_mask", "positions")}
    configs = (job.student.config, job.teacher.config, rollout_config(job.stage))
    score = matmul_flops(lambda s, t, b: _score(s, t, *configs, b), job.student.params,
                         job.teacher.params, chunk)
    per_round_scoring = score * job.stage.num_rollouts / size
    atomic_write_json(job.ctx.node_dir / "flops.json", {
        "flops_per_step": per_round_scoring / per_round + step,
        "score_flops_per_round": per_round_scoring, "step_flops": step, "flop_steps": 1,
        "flop_seconds": round(time.perf_counter() - started, 3),
        "flop_source": "jaxpr matmuls (rollout decoding not counted)"})


def _write_measured(ctx: NodeContext, progress: Progress) -> None:
    flops = json.loads((ctx.node_dir / "flops.json").read_text())
    wall = progress.wall_seconds
    atomic_write_json(ctx.node_dir / "measured.json", {
        **flops, "steps": progress.step, "tokens": progress.tokens, "rollouts": progress.samples,
        "wall_seconds": round(wall, 3),
        "tokens_per_s": round(progress.tokens / wall, 1) if wall > 0 else None})
