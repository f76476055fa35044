"""The generic training loop: AdamW, schedule, accumulation, clipping, events, checkpoints."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedModel

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json
from kdspec.spec.stages.common import TrainStage

from .batches import EpochSampler, TokenData, step_batches
from .checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from .flops import FLOP_STEPS, measure_flops
from .objectives.base import Objective
from .optim import build_optimizer, build_scheduler
from .step import forward_backward


@dataclass
class TrainJob:
    """Everything the loop needs; built by `kdspec_torch.train_node`."""

    ctx: NodeContext
    stage: TrainStage
    model: PreTrainedModel
    objective: Objective
    data: TokenData
    sampler: EpochSampler
    device: torch.device
    amp: torch.dtype | None

    def batches(self, step: int) -> list:
        return step_batches(self.data, self.sampler, step, self.stage.batch_size,
                            self.stage.grad_accum)


def train(job: TrainJob) -> TrainState:
    """Train to `stage.total_steps`, resuming from the newest complete checkpoint. Emits `start`,
    a `progress` event per step and a `metrics` event every `log_every` steps and at the last;
    checkpoints every `checkpoint_every` steps and at the last."""
    stage, ctx = job.stage, job.ctx
    total = stage.total_steps
    optimizer = build_optimizer(job.model, stage.optimizer)
    scheduler = build_scheduler(optimizer, stage.schedule, total)
    state = _resume(job, optimizer, scheduler)
    _measure_flops_once(job)
    ctx.emit(Event("start", ctx.node.id, step=state.step, total=total))
    while state.step < total:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        batches = job.batches(state.step)
        logged = forward_backward(job.model, job.objective, batches, amp=job.amp,
                                  device=job.device)
        logged["grad_norm"] = _clip(job.model, stage.optimizer.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(batch.n_tokens for batch in batches)
        elapsed = time.perf_counter() - started
        state = replace(state, step=state.step + 1, samples=state.samples + stage.batch_size,
                        tokens=state.tokens + tokens, wall_seconds=state.wall_seconds + elapsed)
        _report(ctx, state, total, stage.log_every, lr, tokens / elapsed, logged)
        if state.step % stage.checkpoint_every == 0 or state.step == total:
            save_checkpoint(ctx.checkpoint_dir, model=job.model, optimizer=optimizer,
                            scheduler=scheduler, state=state)
    return state


def _resume(job: TrainJob, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    remove_partial(job.ctx.checkpoint_dir)
    path = latest_checkpoint(job.ctx.checkpoint_dir)
    if path is None:
        return TrainState()
    state = load_checkpoint(path, model=job.model, optimizer=optimizer, scheduler=scheduler)
    job.ctx.emit(Event("message", job.ctx.node.id, step=state.step,
                       message=f"resumed from {path.name} (step {state.step})"))
    return state


def _clip(model: PreTrainedModel, max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None: no clipping); return the norm before."""
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf))


def _report(ctx: NodeContext, state: TrainState, total: int, log_every: int, lr: float,
            tokens_per_s: float, logged: dict[str, float]) -> None:
    node = ctx.node.id
    ctx.emit(Event("progress", node, step=state.step, total=total,
                   values={"loss": logged["loss"], "tokens_per_s": tokens_per_s, "lr": lr}))
    if state.step % log_every == 0 or state.step == total:
        values = {"step": state.step, "tokens": state.tokens, **logged, "lr": lr,
                  "tokens_per_s": tokens_per_s}
        ctx.emit(Event("metrics", node, step=state.step, values=values))


def _measure_flops_once(job: TrainJob) -> None:
    """Count FLOPs over the first FLOP_STEPS steps' batches, once per node (`flops.json`)."""
    path = job.ctx.node_dir / "flops.json"
    if path.exists():
        return
    steps = [job.batches(s) for s in range(min(FLOP_STEPS, job.stage.total_steps))]
    atomic_write_json(path, measure_flops(job.model, job.objective, steps, amp=job.amp,
                                          device=job.device))


def write_measured(ctx: NodeContext, state: TrainState) -> dict[str, Any]:
    """`measured.json`: measured FLOPs per step, and the training loop's steps, tokens, wall
    time (summed over resumed segments) and throughput."""
    flops = json.loads((ctx.node_dir / "flops.json").read_text())
    wall = state.wall_seconds
    measured = {**flops, "steps": state.step, "tokens": state.tokens,
                "wall_seconds": round(wall, 3),
                "tokens_per_s": round(state.tokens / wall, 1) if wall > 0 else None}
    atomic_write_json(ctx.node_dir / "measured.json", measured)
    return measured
