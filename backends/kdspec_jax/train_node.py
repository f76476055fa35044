"""Run a `train` node on JAX: tokenizer, student, data rows, objective, the jitted step on a
mesh, checkpoints, and the trained student saved as a HF folder.

The same contract as the torch backend: a `start` event, a `progress` event per optimizer step,
a `metrics` event every `log_every` steps and at the last (loss, its terms, grad norm, lr,
tokens, tokens/s), an atomic checkpoint every `checkpoint_every` steps and at the last (resumed
from on the next run), the student in `<node>/model` (with the tokenizer), and `flops.json` /
`measured.json` for the report (matmul FLOPs counted from the traced step, `kdspec_jax.flops`).

Stage kinds (`OBJECTIVES`): each has a row layout (`kdspec_jax.data`) and an objective:

* `pretrain` (packed) and `sft` (pairs): cross-entropy on the target tokens;
* `pretrain_kd` (packed) and `kd` (pairs): `(1 − w)·s·D_T(teacher ‖ student) + w·CE` against
  an online teacher, or, for `pretrain_kd` with `teacher_cache.mode: topk | sampled`, the
  forward KL against the cached slice that the node's `teacher_logits` input wrote; the slice
  of each row travels in the batch (`teacher_ids`, `teacher_probs`).

`loss.chunked` does not apply: the JAX step always builds the full `[tokens, vocab]` logits
(the same value; `on` is reported once as a message).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json
from kdspec.spec.stages.common import TrainStage

from .checkpoint import (
    Progress,
    latest_checkpoint,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from .data import (
    EpochSampler,
    JaxTokenizer,
    Layout,
    TokenRows,
    build_token_rows,
    load_tokenizer,
    micro_batches,
    order_seed,
    train_records,
)
from .flops import matmul_flops
from .models import LoadedModel, compute_dtype, load_model, save_student
from .optim import build_optimizer, lr_schedule
from .sharding import (
    jit_train_step,
    mesh_from_parallelism,
    shard_batch,
    state_shardings,
    tree_shardings,
)
from .teacher_cache import CacheReader
from .train_step import (
    Objective,
    cached_kd_objective,
    ce_objective,
    init_train_state,
    kd_objective,
    make_train_step,
)

__all__ = ["OBJECTIVES", "TrainJob", "build_job", "run_train_node", "unsupported_reason"]

OBJECTIVES: dict[str, Layout] = {
    "pretrain": "packed",
    "sft": "pairs",
    "pretrain_kd": "packed",
    "kd": "pairs",
}
"""Stage kinds the JAX backend trains, with the row layout of each."""


def unsupported_reason(stage: dict[str, Any], stage_kind: str | None) -> str | None:
    """Why a train node of this stage config cannot run here (None: it can)."""
    if stage_kind not in OBJECTIVES:
        return (f"stage kind `{stage_kind}` (the jax backend trains: "
                f"{', '.join(OBJECTIVES)})")
    if stage.get("labels_from"):
        return ("`labels_from` (teacher labels from a step_by_step stage), which needs "
                "rationales nodes the jax backend does not run")
    return None


def stage_of(ctx: NodeContext) -> TrainStage:
    for stage in ctx.spec.stages:
        if stage.name == ctx.node.stage:
            return stage
    raise KeyError(f"node `{ctx.node.id}` names stage `{ctx.node.stage}`, which the spec lacks")


@dataclass
class TrainJob:
    ctx: NodeContext
    stage: TrainStage
    tokenizer: JaxTokenizer
    student: LoadedModel
    teacher: LoadedModel | None  # an online teacher
    cache: CacheReader | None  # a cached teacher slice
    rows: TokenRows
    sampler: EpochSampler

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Optimizer step `step`'s batch, `[grad_accum, micro_batch, ...]` arrays."""
        size = self.stage.batch_size
        index = self.sampler.indices(step * size, size)
        batch = self.rows.batch(index)
        if self.cache is not None:
            batch["teacher_ids"], batch["teacher_probs"] = self.cache.get(index)
        return micro_batches(batch, self.stage.grad_accum)


def _open_cache(ctx: NodeContext) -> CacheReader | None:
    folder = ctx.input_dir("teacher_logits")
    if folder is None:
        return None
    node = ctx.plan.node(ctx.node.inputs["teacher_logits"])
    return CacheReader.open(folder / "cache", expect=node)


def build_job(ctx: NodeContext) -> TrainJob:
    stage = stage_of(ctx)
    config = ctx.node.config
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=ctx.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    student = load_model(config["student"], ctx=ctx, role="student", tokenizer=tokenizer,
                         trainable=True)
    cache = _open_cache(ctx)
    teacher = None
    if stage.kind in ("pretrain_kd", "kd") and cache is None:
        teacher = load_model(config["teacher"], ctx=ctx, role="teacher", tokenizer=tokenizer,
                             trainable=False)
    records = train_records(config["data"], seed=config["seed"], spec_dir=ctx.spec_dir,
                            fraction=getattr(stage, "train_fraction", None))
    rows = build_token_rows(OBJECTIVES[stage.kind], records, tokenizer, stage.seq_len)
    sampler = EpochSampler(len(rows), order_seed(config["seed"], config["data"]))
    return TrainJob(ctx, stage, tokenizer, student, teacher, cache, rows, sampler)


def build_objective(job: TrainJob) -> Objective:
    stage = job.stage
    dtype, remat = compute_dtype(stage.precision), stage.recompute
    if stage.kind in ("pretrain", "sft"):
        return ce_objective(job.student.config, compute_dtype=dtype, remat=remat)
    loss = stage.loss
    if loss.chunked == "on":
        job.ctx.emit(Event("message", job.ctx.node.id, message=(
            "loss.chunked: on has no JAX implementation; the step builds the full logits "
            "(same loss)")))
    scale = loss.temperature**2 if loss.scale_by_t2 else 1.0
    if job.cache is not None:
        if loss.divergence != "forward_kl":
            raise ValueError(
                f"divergence {loss.divergence!r} needs the teacher's full distribution; a "
                "cached top-K / sampled-K teacher supports forward_kl only (use an online "
                "teacher)")
        return cached_kd_objective(
            job.student.config, vocab_size=job.cache.vocab_size, temperature=loss.temperature,
            hard_label_weight=loss.hard_label_weight, soft_scale=scale, compute_dtype=dtype,
            remat=remat)
    assert job.teacher is not None
    return kd_objective(
        job.student.config, job.teacher.config, divergence=loss.divergence, beta=loss.beta,
        temperature=loss.temperature, hard_label_weight=loss.hard_label_weight,
        soft_scale=scale, compute_dtype=dtype, remat=remat)


def run_train_node(ctx: NodeContext) -> None:
    """Train the node's student to `stage.total_steps` (resuming from the newest checkpoint),
    then save it as a HF folder in `<node>/model`."""
    job = build_job(ctx)
    total = job.stage.total_steps
    zero_stage = ctx.spec.hardware.parallelism.zero_stage
    # The mesh spans the devices this process sees; hardware.count is what `plan` prices.
    mesh = mesh_from_parallelism(zero_stage=zero_stage)
    optimizer = build_optimizer(job.stage.optimizer, job.stage.schedule, total)
    step_fn = make_train_step(build_objective(job), optimizer,
                              lr_fn=lr_schedule(job.stage.optimizer, job.stage.schedule, total))
    state = init_train_state(job.student.params, optimizer)
    shardings = state_shardings(state, mesh, zero_stage)
    state, progress = _resume(ctx, jax.device_get(state))  # host copies: the step donates
    state = jax.device_put(state, shardings)
    teacher = None
    if job.teacher is not None:
        teacher = jax.device_put(job.teacher.params, tree_shardings(
            job.teacher.params, mesh, shard=zero_stage >= 3))
    first = shard_batch(job.batch(progress.step), mesh)
    _write_flops(ctx, step_fn, state, first, teacher)
    compiled = jit_train_step(step_fn, shardings, mesh).lower(state, first, teacher).compile()
    state, progress = _train(job, compiled, state, teacher, mesh, progress)
    save_student(job.student, state.params, job.tokenizer, ctx.node_dir / "model")
    _write_measured(ctx, progress)


def _tokens(batch: dict[str, np.ndarray]) -> int:
    """Tokens the model reads (padding excluded)."""
    if "attention_mask" in batch:
        return int(np.sum(batch["attention_mask"]))
    return int(batch["input_ids"].size)


def _train(job: TrainJob, compiled: Any, state: Any, teacher: Any, mesh: Any,
           progress: Progress) -> tuple[Any, Progress]:
    """The loop: one compiled step per optimizer step, events, checkpoints."""
    ctx, stage, total = job.ctx, job.stage, job.stage.total_steps
    ctx.emit(Event("start", ctx.node.id, step=progress.step, total=total))
    while progress.step < total:
        started = time.perf_counter()
        batch = job.batch(progress.step)
        state, metrics = compiled(state, shard_batch(batch, mesh), teacher)
        logged = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        elapsed = time.perf_counter() - started
        tokens = _tokens(batch)
        progress = replace(progress, step=progress.step + 1,
                           samples=progress.samples + stage.batch_size,
                           tokens=progress.tokens + tokens,
                           wall_seconds=progress.wall_seconds + elapsed)
        _report(ctx, progress, total, stage.log_every, tokens / elapsed, logged)
        if progress.step % stage.checkpoint_every == 0 or progress.step == total:
            save_checkpoint(ctx.checkpoint_dir, state, progress)
    return state, progress


def _resume(ctx: NodeContext, template: Any) -> tuple[Any, Progress]:
    remove_partial(ctx.checkpoint_dir)
    path = latest_checkpoint(ctx.checkpoint_dir)
    if path is None:
        return template, Progress()
    state, progress = load_checkpoint(path, template)
    ctx.emit(Event("message", ctx.node.id, step=progress.step,
                   message=f"resumed from {path.name} (step {progress.step})"))
    return state, progress


def _report(ctx: NodeContext, progress: Progress, total: int, log_every: int,
            tokens_per_s: float, logged: dict[str, float]) -> None:
    node, lr = ctx.node.id, logged.pop("lr")
    logged.pop("n_targets", None)
    ctx.emit(Event("progress", node, step=progress.step, total=total,
                   values={"loss": logged["loss"], "tokens_per_s": tokens_per_s, "lr": lr}))
    if progress.step % log_every == 0 or progress.step == total:
        values = {"step": progress.step, "tokens": progress.tokens, **logged, "lr": lr,
                  "tokens_per_s": tokens_per_s}
        ctx.emit(Event("metrics", node, step=progress.step, values=values))


def _write_flops(ctx: NodeContext, step_fn: Any, *args: Any) -> None:
    """`flops.json`: the matmul FLOPs of one optimizer step, counted from its traced program
    (student forward and backward, teacher forward; `kdspec_jax.flops`), the convention of the
    torch backend's FlopCounterMode count."""
    path = ctx.node_dir / "flops.json"
    if path.exists():
        return
    started = time.perf_counter()
    flops = matmul_flops(step_fn, *args)
    atomic_write_json(path, {"flops_per_step": flops, "flop_steps": 1,
                             "flop_seconds": round(time.perf_counter() - started, 3),
                             "flop_source": "jaxpr matmuls"})


def _write_measured(ctx: NodeContext, progress: Progress) -> dict[str, Any]:
    flops = json.loads((ctx.node_dir / "flops.json").read_text())
    wall = progress.wall_seconds
    measured = {**flops, "steps": progress.step, "tokens": progress.tokens,
                "wall_seconds": round(wall, 3),
                "tokens_per_s": round(progress.tokens / wall, 1) if wall > 0 else None}
    atomic_write_json(ctx.node_dir / "measured.json", measured)
    return measured
