"""The `minillm` stage: rounds of rollouts, PPO epochs over them, a pre-training regulariser.

The loop follows the official trainer (LMOps `minillm/minillm/trainer.py`):

    for each round:
        sample `num_rollouts` rollouts (teacher-mixed, scored; `rollout.py`)
        for ppo_epoch in 1..ppo_epochs:
            for each mini-batch of `batch_size` rollouts (shuffled, the last partial one dropped):
                one optimizer step on  L = L_PG + [single_step_reg]·L_single + lm_coef·L_PT

with `L_PG` the clipped policy loss on whitened length-normalised returns, `L_single` the
exact per-token reverse KL against the teacher (whose logits are recomputed at every step, as
the official code does, not cached from the rollout), and `L_PT` the pre-training loss on the
step's batch of `batch_size` rows of `pretrain_data` (`math.pretrain_loss`). `steps` counts
optimizer steps (the official `total_iters`); a round holds
`ppo_epochs · ⌊num_rollouts / batch_size⌋` of them and the run may stop inside one.

The student samples and trains in eval mode (no dropout), so the PPO ratio is exactly 1 at
the first epoch (TRL's trainers disable dropout for the same reason).

Determinism and resume: round r's prompts are samples `[r·N, (r+1)·N)` of the seeded epoch
stream over the prompts, its sampling generator and its mini-batch orders are seeded by
(seed, stage, r[, epoch]), and step s's pre-training rows are samples `[s·B, (s+1)·B)` of their
own stream. So the run is a function of the step count at round boundaries: checkpoints are
written at the end of the round in which a multiple of `checkpoint_every` falls (and at the
last step), and a killed run resumes from the newest one, redoing at most one round.

The node writes `model/`, `flops.json` (`measure_flops`, once) and `measured.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json
from kdspec.spec.stages.minillm import MiniLLMStage

from ..batches import (
    Batch,
    EpochSampler,
    TokenData,
    build_token_data,
    order_seed,
    read_records,
    step_batches,
)
from ..checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from ..models import load_model, save_model
from ..objectives.distill import check_vocab
from ..optim import build_optimizer, build_scheduler
from ..runtime import (
    autocast,
    autocast_dtype,
    derive_seed,
    device,
    make_deterministic,
    preserved_rng,
)
from ..tokenizer import load_tokenizer
from .math import (
    advantages,
    clip_fraction,
    policy_ratio,
    ppo_policy_loss,
    pretrain_loss,
    single_step_loss,
    tempered,
    token_logprobs,
)
from .rollout import (
    Rollout,
    RolloutBatch,
    RolloutConfig,
    RolloutStats,
    collate,
    encode_prompts,
    response_logits,
    sample_rollouts,
)

__all__ = [
    "MiniLLMJob",
    "measure_flops",
    "ppo_step",
    "pretrain_step_loss",
    "rollout_config",
    "run_minillm_node",
    "run_node",
    "steps_per_round",
    "train_minillm",
]


def rollout_config(stage: MiniLLMStage) -> RolloutConfig:
    return RolloutConfig(
        max_prompt_length=stage.max_prompt_length, max_length=stage.max_length,
        teacher_mix_alpha=stage.teacher_mix_alpha, temperature=stage.temperature,
        top_k=stage.top_k, top_p=stage.top_p, reward_scaling=stage.reward_scaling,
        cliprange_reward=stage.cliprange_reward)


def steps_per_round(stage: MiniLLMStage) -> int:
    """Optimizer steps per round: `ppo_epochs · ⌊num_rollouts / batch_size⌋`."""
    minibatches = stage.num_rollouts // stage.batch_size
    if minibatches == 0:
        raise ValueError(
            f"stage `{stage.name}`: num_rollouts ({stage.num_rollouts}) < batch_size "
            f"({stage.batch_size}) leaves no full PPO mini-batch; raise num_rollouts")
    return stage.ppo_epochs * minibatches


@dataclass
class MiniLLMJob:
    """Everything the loop needs; `run_minillm_node` builds it from a plan node."""

    ctx: NodeContext
    stage: MiniLLMStage
    student: PreTrainedModel
    teacher: PreTrainedModel
    prompts: list[list[int]]
    prompt_sampler: EpochSampler
    pretrain: TokenData | None
    pretrain_sampler: EpochSampler | None
    pad_id: int
    eos_id: int
    device: torch.device
    amp: torch.dtype | None
    seed: int

    @property
    def rollout(self) -> RolloutConfig:
        return rollout_config(self.stage)


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


def pretrain_step_loss(student: PreTrainedModel, teacher: PreTrainedModel | None, batch: Batch,
                       kd_ratio: float) -> tuple[Tensor, dict[str, float]]:
    """The pre-training regulariser on one micro-batch (`math.pretrain_loss`): the student's
    LM loss, mixed with the soft cross-entropy to the teacher when `kd_ratio > 0`."""
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    student_logits = student(**kwargs).logits
    teacher_logits = None
    if teacher is not None and kd_ratio > 0:
        with torch.no_grad():
            teacher_logits = teacher(**kwargs).logits
    terms = pretrain_loss(student_logits, batch.labels, teacher_logits=teacher_logits,
                          kd_ratio=kd_ratio)
    logged = {"pt_loss": terms.total.item(), "lm_loss": terms.lm.item()}
    if terms.distil is not None:
        logged["ds_loss"] = terms.distil.item()
    return terms.total, logged


def _rows(batch: RolloutBatch, index: Tensor, adv: Tensor) -> tuple[RolloutBatch, Tensor]:
    picked = {name: value[index] if isinstance(value, Tensor) else value
              for name, value in batch.__dict__.items()}
    return RolloutBatch(**picked), adv[index]


def _policy_micro_loss(job: MiniLLMJob, mb: RolloutBatch,
                       adv: Tensor) -> tuple[Tensor, dict[str, float]]:
    """`L_PG (+ L_single)` on one micro-batch of rollouts (module docstring)."""
    stage, temperature = job.stage, job.stage.temperature
    student = tempered(response_logits(job.student, mb), temperature, mb.keep)
    with torch.no_grad():
        teacher = tempered(response_logits(job.teacher, mb), temperature, mb.keep)
    logprobs = token_logprobs(student, mb.response)
    ratio = policy_ratio(logprobs, mb.old_logprobs, mb.weights, mb.mask)
    pg = ppo_policy_loss(ratio, adv, mb.mask, stage.clip_range)
    reg = single_step_loss(student, teacher, mb.mask)
    rl = pg + reg if stage.single_step_reg else pg
    live = mb.mask
    return rl, {"pg_loss": pg.item(), "reg_loss": reg.item(), "rl_loss": rl.item(),
                "clip_frac": clip_fraction(ratio.detach(), live, stage.clip_range).item(),
                "ratio": (ratio.detach()[live].mean().item() if live.any() else 1.0)}


def ppo_step(job: MiniLLMJob, rollouts: list[Rollout],
             pt_batches: list[Batch] | None) -> tuple[dict[str, float], int]:
    """Accumulate the gradient of one optimizer step; return its logged terms and the number
    of tokens the student read. Advantages are whitened over the whole mini-batch, then the
    step is split into `grad_accum` micro-batches, each weighted by its share of the response
    tokens (policy terms) or of the pre-training targets (`L_PT`), so the gradient does not
    depend on the split."""
    stage = job.stage
    batch = collate([r.prompt for r in rollouts], [r.response for r in rollouts], job.pad_id,
                    rollouts).to(job.device)
    adv = advantages(batch.rewards, batch.mask, gamma=stage.gamma,
                     length_norm=stage.length_norm, whiten=True)
    total_tokens = int(batch.mask.sum())
    logged: dict[str, float] = {}
    tokens = batch.n_tokens
    for index in torch.arange(len(rollouts)).chunk(stage.grad_accum):
        mb, mb_adv = _rows(batch, index.to(job.device), adv)
        weight = int(mb.mask.sum()) / max(total_tokens, 1)
        with autocast(job.amp, job.device):
            rl, terms = _policy_micro_loss(job, mb, mb_adv)
        (rl * weight).backward()
        _accumulate(logged, terms, weight)
    if pt_batches is not None:
        pt_total = sum(b.n_targets for b in pt_batches)
        teacher = job.teacher if stage.kd_ratio > 0 else None
        for pt in pt_batches:
            pt = pt.to(job.device)
            weight = pt.n_targets / max(pt_total, 1)
            with autocast(job.amp, job.device):
                loss, terms = pretrain_step_loss(job.student, teacher, pt, stage.kd_ratio)
            (stage.lm_coef * loss * weight).backward()
            _accumulate(logged, terms, weight)
            tokens += pt.n_tokens
    logged["loss"] = logged["rl_loss"] + stage.lm_coef * logged.get("pt_loss", 0.0)
    return logged, tokens


def _accumulate(into: dict[str, float], terms: dict[str, float], weight: float) -> None:
    for name, value in terms.items():
        into[name] = into.get(name, 0.0) + value * weight


# --------------------------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------------------------


def collect_rollouts(job: MiniLLMJob, round_index: int) -> tuple[list[Rollout], RolloutStats]:
    """Round `round_index`'s rollouts: its slice of the prompt stream, sampled with a
    generator seeded by the round (so a resumed run samples the same ones)."""
    n = job.stage.num_rollouts
    index = job.prompt_sampler.indices(round_index * n, n).tolist()
    generator = torch.Generator(device=job.device)
    generator.manual_seed(derive_seed(job.seed, "rollout", job.stage.name, round_index))
    return sample_rollouts(job.student, job.teacher, [job.prompts[i] for i in index],
                           job.rollout, pad_id=job.pad_id, eos_id=job.eos_id,
                           generator=generator, chunk_size=job.stage.batch_size)


def minibatch_order(job: MiniLLMJob, round_index: int, epoch: int) -> list[Tensor]:
    """The mini-batches of one PPO epoch: a seeded permutation of the round's rollouts cut
    into `batch_size` pieces, the last partial one dropped (the official loader's drop_last)."""
    generator = torch.Generator().manual_seed(
        derive_seed(job.seed, "ppo", job.stage.name, round_index, epoch))
    order = torch.randperm(job.stage.num_rollouts, generator=generator)
    size = job.stage.batch_size
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


def train_minillm(job: MiniLLMJob) -> TrainState:
    """Run rounds until `stage.total_steps` optimizer steps; resume from a checkpoint."""
    stage, ctx = job.stage, job.ctx
    total, per_round = stage.total_steps, steps_per_round(stage)
    optimizer = build_optimizer(job.student, stage.optimizer)
    scheduler = build_scheduler(optimizer, stage.schedule, total)
    state = _resume(job, optimizer, scheduler, per_round)
    ctx.emit(Event("start", ctx.node.id, step=state.step, total=total))
    job.student.eval()
    last_saved = state.step
    while state.step < total:
        round_index = state.step // per_round
        rollouts, stats = collect_rollouts(job, round_index)
        _report_round(ctx, state, round_index, stats)
        state = replace(state, samples=state.samples + len(rollouts),
                        wall_seconds=state.wall_seconds + stats.generate_seconds
                        + stats.score_seconds)
        for epoch in range(stage.ppo_epochs):
            for index in minibatch_order(job, round_index, epoch):
                if state.step >= total:
                    break
                state = _optimizer_step(job, optimizer, scheduler, state,
                                        [rollouts[i] for i in index.tolist()], epoch)
        if state.step >= total or state.step // stage.checkpoint_every > \
                last_saved // stage.checkpoint_every:
            save_checkpoint(ctx.checkpoint_dir, model=job.student, optimizer=optimizer,
                            scheduler=scheduler, state=state)
            last_saved = state.step
    return state


def _optimizer_step(job: MiniLLMJob, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainState, rollouts: list[Rollout], epoch: int) -> TrainState:
    stage = job.stage
    started = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    pt = None
    if job.pretrain is not None:
        pt = step_batches(job.pretrain, job.pretrain_sampler, state.step, stage.batch_size,
                          stage.grad_accum)
    logged, tokens = ppo_step(job, rollouts, pt)
    params = [p for p in job.student.parameters() if p.grad is not None]
    clip = stage.optimizer.grad_clip
    logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip or float("inf")))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    state = replace(state, step=state.step + 1, tokens=state.tokens + tokens,
                    wall_seconds=state.wall_seconds + elapsed)
    _report_step(job.ctx, state, stage, lr, tokens / elapsed, logged, epoch)
    return state


def _resume(job: MiniLLMJob, optimizer: torch.optim.Optimizer, scheduler: Any,
            per_round: int) -> TrainState:
    remove_partial(job.ctx.checkpoint_dir)
    path = latest_checkpoint(job.ctx.checkpoint_dir)
    if path is None:
        return TrainState()
    state = load_checkpoint(path, model=job.student, optimizer=optimizer, scheduler=scheduler)
    if state.step % per_round and state.step < job.stage.total_steps:
        raise RuntimeError(
            f"checkpoint {path} is at step {state.step}, inside a round of {per_round} steps; "
            "minillm resumes at round boundaries only (delete the checkpoint to restart)")
    job.ctx.emit(Event("message", job.ctx.node.id, step=state.step,
                       message=f"resumed from {path.name} (step {state.step}, round "
                               f"{state.step // per_round})"))
    return state


def _report_round(ctx: NodeContext, state: TrainState, round_index: int,
                  stats: RolloutStats) -> None:
    values = {"step": state.step, "round": round_index, "rollouts": stats.rollouts,
              **{k: round(v, 6) for k, v in stats.summary().items()}}
    ctx.emit(Event("metrics", ctx.node.id, step=state.step, values=values))


def _report_step(ctx: NodeContext, state: TrainState, stage: MiniLLMStage, lr: float,
                 tokens_per_s: float, logged: dict[str, float], epoch: int) -> None:
    node, total = ctx.node.id, stage.total_steps
    ctx.emit(Event("progress", node, step=state.step, total=total,
                   values={"loss": logged["loss"], "tokens_per_s": tokens_per_s, "lr": lr}))
    if state.step % stage.log_every == 0 or state.step == total:
        values = {"step": state.step, "tokens": state.tokens, "ppo_epoch": epoch, **logged,
                  "lr": lr, "tokens_per_s": tokens_per_s}
        ctx.emit(Event("metrics", node, step=state.step, values=values))


# --------------------------------------------------------------------------------------------
# Measured FLOPs
# --------------------------------------------------------------------------------------------


def measure_flops(job: MiniLLMJob) -> dict[str, Any]:
    """FLOPs per optimizer step, rollouts included, by `torch.utils.flop_counter` (both models
    in eager attention, which the CPU counter sees; RNG streams and gradients left as they
    were): one chunk of `batch_size` rollouts of round 0 (sampling + scoring), scaled to the
    round's `num_rollouts` and spread over its `steps_per_round` steps, plus step 0 (PPO and
    pre-training forward and backward passes, teacher forwards)."""
    stage = job.stage
    models = (job.student, job.teacher)
    previous = [m.config._attn_implementation for m in models]
    started = time.perf_counter()
    prompts = [job.prompts[i] for i in job.prompt_sampler.indices(0, stage.batch_size).tolist()]
    generator = torch.Generator(device=job.device).manual_seed(derive_seed(job.seed, "flops"))
    with preserved_rng():
        try:
            for m in models:
                m.set_attn_implementation("eager")
            with FlopCounterMode(display=False) as rollout_counter:
                rollouts, _ = sample_rollouts(
                    job.student, job.teacher, prompts, job.rollout, pad_id=job.pad_id,
                    eos_id=job.eos_id, generator=generator, chunk_size=stage.batch_size)
            pt = None
            if job.pretrain is not None:
                pt = step_batches(job.pretrain, job.pretrain_sampler, 0, stage.batch_size,
                                  stage.grad_accum)
            with FlopCounterMode(display=False) as step_counter:
                ppo_step(job, rollouts, pt)
        finally:
            job.student.zero_grad(set_to_none=True)
            for m, impl in zip(models, previous, strict=True):
                m.set_attn_implementation(impl)
    per_round = rollout_counter.get_total_flops() * stage.num_rollouts / len(prompts)
    step = step_counter.get_total_flops()
    return {"flops_per_step": per_round / steps_per_round(stage) + step,
            "rollout_flops_per_round": per_round, "step_flops": step, "flop_steps": 1,
            "flop_seconds": round(time.perf_counter() - started, 3),
            "attn_implementation": "eager"}


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------


def _prompt_ids(ctx: NodeContext, stage: MiniLLMStage,
                tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    config = ctx.node.config
    records = read_records(config["data"], seed=config["seed"], spec_dir=ctx.spec_dir)
    if not records or "prompt" not in records[0]:
        raise KeyError(f"stage `{stage.name}` samples from prompts: data `{stage.data}` needs a "
                       "`prompt` field (map one with the data source's `fields: {prompt: ...}`)")
    return encode_prompts(tokenizer, [str(r["prompt"]) for r in records], stage.max_prompt_length)


def _pretrain_data(ctx: NodeContext, stage: MiniLLMStage,
                   tokenizer: PreTrainedTokenizerBase) -> TokenData | None:
    """Rows of the pre-training source: packed documents when its records have `text`,
    prompt/response pairs (loss on the response) otherwise, as the official LM pipeline
    masks the prompt of instruction data."""
    source = ctx.node.config.get("pretrain_data")
    if source is None:
        return None
    records = read_records(source, seed=ctx.node.config["seed"], spec_dir=ctx.spec_dir)
    layout = "packed" if records and "text" in records[0] else "pairs"
    return build_token_data(layout, records, tokenizer, stage.seq_len)


def build_job(ctx: NodeContext, stage: MiniLLMStage) -> tuple[MiniLLMJob, Any]:
    """Tokenizer, models, prompts and pre-training rows of a `minillm` node."""
    config = ctx.node.config
    dev = device()
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=ctx.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    student = load_model(config["student"], ctx=ctx, role="student", tokenizer=tokenizer,
                         dev=dev, trainable=True)
    teacher = load_model(config["teacher"], ctx=ctx, role="teacher", tokenizer=tokenizer,
                         dev=dev, trainable=False)
    check_vocab(student, teacher.get_output_embeddings().weight.shape[0])
    prompts = _prompt_ids(ctx, stage, tokenizer)
    pretrain = _pretrain_data(ctx, stage, tokenizer)
    seed = config["seed"]
    pt_sampler = None
    if pretrain is not None:
        pt_sampler = EpochSampler(len(pretrain), order_seed(seed, config["pretrain_data"]))
    job = MiniLLMJob(
        ctx=ctx, stage=stage, student=student, teacher=teacher, prompts=prompts,
        prompt_sampler=EpochSampler(len(prompts), order_seed(seed, config["data"])),
        pretrain=pretrain, pretrain_sampler=pt_sampler, pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id, device=dev, amp=autocast_dtype(stage.precision, dev),
        seed=seed)
    return job, tokenizer


def run_minillm_node(ctx: NodeContext) -> None:
    """Train the node's student with MiniLLM and save it to `<node>/model`."""
    from ..train_node import stage_of

    stage = stage_of(ctx)
    make_deterministic()
    job, tokenizer = build_job(ctx, stage)
    flops = ctx.node_dir / "flops.json"
    if not flops.exists():  # once per node, not again on resume
        atomic_write_json(flops, measure_flops(job))
    state = train_minillm(job)
    save_model(job.student, tokenizer, ctx.node_dir / "model")
    _write_measured(ctx, state, json.loads(flops.read_text()))


# The name the torch backend's train-node dispatch looks for in a stage kind's module.
run_node = run_minillm_node


def _write_measured(ctx: NodeContext, state: TrainState, flops: dict[str, Any]) -> None:
    """`measured.json`: the measured FLOPs and the loop's steps, student tokens, rollouts,
    wall time (rollouts included, summed over resumed segments) and tokens/s."""
    wall = state.wall_seconds
    atomic_write_json(ctx.node_dir / "measured.json", {
        **flops, "steps": state.step, "tokens": state.tokens, "rollouts": state.samples,
        "wall_seconds": round(wall, 3),
        "tokens_per_s": round(state.tokens / wall, 1) if wall > 0 else None})
