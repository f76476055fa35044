"""`minillm`: on-policy reverse-KL distillation by policy gradient (Gu et al., ICLR 2024)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import Fraction, PositiveFloat
from .common import OptimizerConfig, ScheduleConfig, TeacherCache, TeacherStage


def _minillm_optimizer() -> OptimizerConfig:
    # The official scripts: lr 5e-6, AdamW betas (0.9, 0.95), eps 1e-8, weight decay 1e-6.
    return OptimizerConfig(lr=5e-6, betas=[0.9, 0.95], eps=1e-8, weight_decay=1e-6)


def _constant() -> ScheduleConfig:
    # The official scripts: constant lr after 100 warmup iterations (--warmup-iters 100).
    return ScheduleConfig(kind="constant", warmup_steps=100)


class MiniLLMStage(TeacherStage):
    """Minimise KL(q_S ‖ p_T) over student rollouts by policy gradient with teacher-mixed
    sampling, length-normalised long-term rewards, the single-step decomposition, PPO clipping and
    a pre-training regulariser (defaults from microsoft/LMOps minillm scripts).

    `data` holds the prompts; `steps` counts optimizer steps (the official total_iters).
    """

    kind: Literal["minillm"] = Field(description="Stage kind.")
    teacher_cache: TeacherCache = Field(
        default_factory=TeacherCache,
        description="Must stay `online`: an on-policy stage scores the student's own samples, "
        "which no cache of the teacher over fixed data holds.",
    )
    pretrain_data: str | None = Field(
        None, description="Data source for the pre-training regulariser; null disables it."
    )
    optimizer: OptimizerConfig = Field(default_factory=_minillm_optimizer, description="AdamW.")
    schedule: ScheduleConfig = Field(default_factory=_constant, description="LR schedule.")
    teacher_mix_alpha: Fraction = Field(
        0.2, description="Sample from α·p_T + (1-α)·q_S, corrected by the weight q_S / mix."
    )
    num_rollouts: int = Field(256, gt=0, description="Rollouts sampled per round.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each round's rollouts.")
    clip_range: PositiveFloat = Field(0.2, description="PPO clip ε of the importance ratio.")
    gamma: Fraction = Field(0.95, description="Discount of the long-term reward.")
    length_norm: bool = Field(True, description="Divide each return by the tokens left.")
    single_step_reg: bool = Field(
        True, description="Add the exact per-position reverse KL (single-step decomposition)."
    )
    reward_scaling: PositiveFloat = Field(
        0.5, description="Divide the per-token rewards by this (as the official sampler does; "
        "0.5 doubles them), before clipping."
    )
    cliprange_reward: PositiveFloat = Field(
        100.0, description="Clip the scaled per-token rewards to ±this."
    )
    kd_ratio: Fraction = Field(
        0.5, description="Pre-training loss = (1-r)·LM CE + r·forward KL to the teacher."
    )
    lm_coef: float = Field(1.0, ge=0, description="Weight of the pre-training loss.")
    max_prompt_length: int = Field(256, gt=0, description="Prompt tokens kept (left-truncated).")
    max_length: int = Field(512, gt=0, description="Prompt + response tokens at most.")
    temperature: PositiveFloat = Field(1.0, description="Rollout sampling temperature.")
    top_k: int = Field(0, ge=0, description="Rollout top-k; 0 disables.")
    top_p: Fraction = Field(1.0, description="Rollout nucleus p; 1 disables.")

    @model_validator(mode="after")
    def _rollout_shapes(self) -> MiniLLMStage:
        if self.max_length <= self.max_prompt_length:
            raise ValueError(
                f"max_length ({self.max_length}) must exceed max_prompt_length "
                f"({self.max_prompt_length}): responses get max_length - max_prompt_length tokens"
            )
        if self.num_rollouts < self.batch_size:
            raise ValueError(
                f"num_rollouts ({self.num_rollouts}) must be at least batch_size "
                f"({self.batch_size}): each PPO step takes batch_size rollouts"
            )
        return self
