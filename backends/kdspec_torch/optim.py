"""AdamW with decay on matrices only, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from kdspec.spec.stages.common import OptimizerConfig, ScheduleConfig


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """torch AdamW with the spec's lr, betas, eps and decoupled weight decay. Decay applies to
    matrices (ndim ≥ 2: linear and embedding weights) and not to vectors (norm scales, biases),
    as in GPT-2/nanoGPT and most LLM recipes: decaying a norm's scale toward 0 only fights it."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def lr_factor(step: int, *, total: int, config: ScheduleConfig) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based).

    Warmup, `step < W`: `(step + 1) / W` (so no step is wasted at lr 0; step W-1 is at the
    peak). Then, with `p = (step − W) / max(1, total − 1 − W)` (0 at the first decay step, 1 at
    the last step) and `r = min_lr_ratio`:
    cosine `r + (1 − r)·(1 + cos πp)/2`; linear `r + (1 − r)·(1 − p)`; constant `1`.
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.kind == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    r = config.min_lr_ratio
    if config.kind == "cosine":
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
    return r + (1 - r) * (1 - p)


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig,
                    total: int) -> LambdaLR:
    """A LambdaLR stepped once after every optimizer step: step `s` runs at `lr·lr_factor(s)`."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, total=total, config=config))
