"""AdamW (optax) with gradient clipping and the spec's warmup + decay learning-rate schedule.

The same optimizer as the torch backend: decoupled weight decay on weight matrices only, the
global gradient norm clipped to ``grad_clip`` before the Adam moments see it, and the
learning rate of optimizer step ``s`` (0-based) equal to ``lr · lr_factor(s)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from kdspec.spec.stages.common import OptimizerConfig, ScheduleConfig

from .model import decay_mask

__all__ = ["build_optimizer", "lr_factor", "lr_schedule"]


def lr_factor(step: jax.Array | int, *, total: int, config: ScheduleConfig) -> jax.Array:
    """The multiplier of the peak lr for optimizer step ``step`` (0-based); traceable.

    Warmup, ``step < W``: ``(step + 1) / W`` (no step wasted at lr 0; step ``W − 1`` is at the
    peak). Then, with ``p = min(1, (step − W) / max(1, total − 1 − W))`` (0 at the first decay
    step, 1 at the last) and ``r = min_lr_ratio``: cosine ``r + (1 − r)·(1 + cos πp)/2``;
    linear ``r + (1 − r)·(1 − p)``; constant ``1``.
    """
    s = jnp.asarray(step, jnp.float32)
    warmup = config.warmup_steps
    r = config.min_lr_ratio
    p = jnp.clip((s - warmup) / max(1, total - 1 - warmup), 0.0, 1.0)
    if config.kind == "constant":
        decayed = jnp.ones_like(s)
    elif config.kind == "cosine":
        decayed = r + (1 - r) * 0.5 * (1 + jnp.cos(math.pi * p))
    else:
        decayed = r + (1 - r) * (1 - p)
    if warmup == 0:
        return decayed
    return jnp.where(s < warmup, (s + 1) / warmup, decayed)


def lr_schedule(
    optimizer: OptimizerConfig, schedule: ScheduleConfig, total_steps: int
) -> optax.Schedule:
    """``step ↦ lr · lr_factor(step)``: an optax schedule (it is given the update count)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be ≥ 1, got {total_steps}")
    peak = optimizer.lr

    def schedule_fn(step: jax.Array) -> jax.Array:
        return peak * lr_factor(step, total=total_steps, config=schedule)

    return schedule_fn


def build_optimizer(
    optimizer: OptimizerConfig, schedule: ScheduleConfig, total_steps: int
) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` (when set), then AdamW with the scheduled lr.

    AdamW: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, and
    ``θ ← θ − lr·(m̂ / (√v̂ + ε) + λθ)`` with bias-corrected ``m̂, v̂``; ``λθ`` only for the
    matrices of :func:`kdspec_jax.model.decay_mask`. Clipping scales ``g`` by
    ``c / ‖g‖`` when ``‖g‖ > c`` (torch adds 1e-6 to the norm; a relative difference of
    ~1e-6/‖g‖).
    """
    b1, b2 = optimizer.betas
    adamw = optax.adamw(
        learning_rate=lr_schedule(optimizer, schedule, total_steps),
        b1=b1,
        b2=b2,
        eps=optimizer.eps,
        weight_decay=optimizer.weight_decay,
        mask=decay_mask,
    )
    if optimizer.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optimizer.grad_clip), adamw)
