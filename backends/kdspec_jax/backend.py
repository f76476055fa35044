"""`JaxBackend`: runs kdspec `train` nodes of the `pretrain` and `pretrain_kd` (online teacher)
stage kinds with the JAX model, optax and a device mesh.

The same contract as the torch backend: a `start` event, a `progress` event per optimizer step,
a `metrics` event every `log_every` steps and at the last (loss, its terms, grad norm, lr,
tokens/s), an atomic checkpoint every `checkpoint_every` steps and at the last (resumed from
on the next run), the trained student saved as a HF folder in `<node>/model` (with the
tokenizer), and `flops.json` / `measured.json` for the report (matmul FLOPs counted from the
traced step, `kdspec_jax.flops`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdspec.plan.graph import Node
from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json
from kdspec.spec.models import ArchConfig
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
    TokenRows,
    derive_seed,
    load_tokenizer,
    order_seed,
    pack_documents,
    read_records,
    step_batch,
)
from .flops import matmul_flops
from .model import JaxModelConfig, Params, init_params
from .optim import build_optimizer, lr_schedule
from .sharding import (
    jit_train_step,
    mesh_from_parallelism,
    shard_batch,
    state_shardings,
    tree_shardings,
)
from .train_step import ce_objective, init_train_state, kd_objective, make_train_step
from .weights import load_hf, load_hf_config, save_hf

STAGE_KINDS = ("pretrain", "pretrain_kd")
JAX_FAMILIES = ("llama", "qwen2", "gemma2")


class JaxBackend:
    name = "jax"

    def supports(self, node: Node) -> bool:
        if node.kind != "train" or node.stage_kind not in STAGE_KINDS:
            return False
        return "teacher_logits" not in node.inputs  # online teacher only

    def run_node(self, ctx: NodeContext) -> None:
        node = ctx.node
        if not self.supports(node):
            what = (f"train node of stage kind `{node.stage_kind}`" if node.kind == "train"
                    else f"`{node.kind}` node")
            if node.kind == "train" and "teacher_logits" in node.inputs:
                what += " with a cached teacher (teacher_cache.mode: topk/sampled)"
            raise NotImplementedError(
                f"the jax backend cannot run `{node.id}`, a {what} (it trains: "
                f"{', '.join(STAGE_KINDS)} with an online teacher)")
        run_train_node(ctx)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    config: JaxModelConfig
    params: Params
    hf_config: dict[str, Any]  # config.json keys to keep when saving (token ids, ...)


def arch_hf_config(arch: ArchConfig, tokenizer: JaxTokenizer) -> dict[str, Any]:
    """The HF config.json of an inline `arch:`, as the torch backend builds it (vocabulary
    defaults to the tokenizer's; Gemma 2's query_pre_attn_scalar is head_dim and its window
    defaults to max_seq_len)."""
    if arch.family not in JAX_FAMILIES:
        raise NotImplementedError(
            f"the jax backend's model covers {', '.join(JAX_FAMILIES)}, not {arch.family}")
    vocab = arch.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"arch vocab_size {vocab} is smaller than the tokenizer's "
                         f"{len(tokenizer)}")
    hf: dict[str, Any] = {
        "model_type": arch.family,
        "vocab_size": vocab,
        "hidden_size": arch.d_model,
        "intermediate_size": arch.d_ff,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "num_key_value_heads": arch.n_kv_heads or arch.n_heads,
        "max_position_embeddings": arch.max_seq_len,
        "tie_word_embeddings": arch.resolved_tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        **tokenizer.token_ids(),
    }
    if arch.family == "qwen2":
        if arch.head_dim not in (None, arch.d_model // arch.n_heads):
            raise ValueError("qwen2 fixes head_dim = d_model / n_heads; drop `head_dim`")
        return hf
    hf["head_dim"] = arch.resolved_head_dim
    if arch.family == "gemma2":
        hf.update(query_pre_attn_scalar=arch.resolved_head_dim,
                  sliding_window=arch.sliding_window or arch.max_seq_len,
                  attn_logit_softcapping=arch.attn_softcap,
                  final_logit_softcapping=arch.final_softcap)
    return hf


def _param_dtype(ref: dict[str, Any], trainable: bool) -> Any:
    """Trained weights stay fp32 (bf16 only in the matmuls); a frozen model takes its `dtype`
    (auto: bf16 on accelerators, fp32 on the CPU)."""
    name = ref.get("dtype", "auto")
    if trainable or name == "float32" or (name == "auto" and jax.default_backend() == "cpu"):
        return jnp.float32
    return jnp.float16 if name == "float16" else jnp.bfloat16


def load_model(ref: dict[str, Any], *, ctx: NodeContext, role: str, tokenizer: JaxTokenizer,
               trainable: bool) -> LoadedModel:
    """The model `ref` (a node's `student` / `teacher` config) describes. Fresh `arch:` weights
    come from a key derived from the spec seed and the model's name."""
    own = ref.get("tokenizer")
    if own is not None and own != ctx.node.config.get("tokenizer"):
        raise NotImplementedError(
            f"model `{ref.get('model')}` names its own tokenizer {own!r}; the jax backend "
            "tokenizes every stage's data with the spec's `tokenizer`")
    dtype = _param_dtype(ref, trainable)
    if "stage" in ref:
        folder = ctx.model_dir(role)
        if folder is None or not (folder / "config.json").exists():
            raise FileNotFoundError(f"stage `{ref['stage']}` has no saved model at {folder}")
        return _from_folder(folder, dtype)
    if ref.get("preset") is not None:
        raise ValueError(f"model `{ref['model']}` is a preset ({ref['preset']}): presets have no "
                         "weights; give `source:` or `arch:` to run it")
    if ref.get("arch") is not None:
        hf = arch_hf_config(ArchConfig.model_validate(ref["arch"]), tokenizer)
        config = JaxModelConfig.from_hf(hf)
        seed = derive_seed(ctx.node.config.get("seed", 0), "init", ref["model"])
        params = init_params(config, jax.random.key(seed % 2**32), dtype)
        return LoadedModel(config, params, hf)
    source = ref["source"]
    if source.startswith("hf:"):
        raise NotImplementedError(
            f"model source {source!r}: the jax backend loads local folders only; download it "
            "(huggingface-cli download ID --local-dir DIR) and give the folder")
    folder = (ctx.spec_dir / source).expanduser()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"model source {folder} has no config.json")
    return _from_folder(folder, dtype)


def _from_folder(folder: Path, dtype: Any) -> LoadedModel:
    config, params = load_hf(folder, dtype=dtype)
    return LoadedModel(config, params, load_hf_config(folder))


def save_student(model: LoadedModel, params: Params, tokenizer: JaxTokenizer,
                 folder: Path) -> None:
    """The HF folder (config, safetensors, tokenizer) built in a temp folder, then renamed:
    `folder` is either absent or complete."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    base = {**model.hf_config, **tokenizer.token_ids()}
    save_hf(params, model.config, tmp, base_config=base)
    tokenizer.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# --------------------------------------------------------------------------------------------
# The train node
# --------------------------------------------------------------------------------------------


def stage_of(ctx: NodeContext) -> TrainStage:
    for stage in ctx.spec.stages:
        if stage.name == ctx.node.stage:
            return stage
    raise KeyError(f"node `{ctx.node.id}` names stage `{ctx.node.stage}`, which the spec lacks")


def compute_dtype(precision: str) -> Any:
    """`auto`: fp32 on the CPU, bf16 matmuls on accelerators; weights stay fp32 either way."""
    if precision == "fp32" or (precision == "auto" and jax.default_backend() == "cpu"):
        return None
    return jnp.bfloat16


@dataclass
class TrainJob:
    ctx: NodeContext
    stage: TrainStage
    tokenizer: JaxTokenizer
    student: LoadedModel
    teacher: LoadedModel | None
    rows: TokenRows
    sampler: EpochSampler

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return step_batch(self.rows, self.sampler, step, self.stage.batch_size,
                          self.stage.grad_accum)


def build_job(ctx: NodeContext) -> TrainJob:
    stage = stage_of(ctx)
    config = ctx.node.config
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=ctx.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    student = load_model(config["student"], ctx=ctx, role="student", tokenizer=tokenizer,
                         trainable=True)
    teacher = None
    if stage.kind == "pretrain_kd":
        teacher = load_model(config["teacher"], ctx=ctx, role="teacher", tokenizer=tokenizer,
                             trainable=False)
    records = read_records(config["data"], seed=config["seed"], spec_dir=ctx.spec_dir)
    rows = pack_documents(tokenizer.encode(_texts(records)), eos_id=tokenizer.eos_id,
                          seq_len=stage.seq_len)
    sampler = EpochSampler(len(rows), order_seed(config["seed"], config["data"]))
    return TrainJob(ctx, stage, tokenizer, student, teacher, rows, sampler)


def _texts(records: list[dict[str, Any]]) -> list[str]:
    if records and "text" not in records[0]:
        raise KeyError(f"a data record has no `text` field (fields: {', '.join(records[0])}); "
                       "map one with the data source's `fields: {text: ...}`")
    return [str(r["text"]) for r in records]


def _objective(job: TrainJob) -> Any:
    stage = job.stage
    dtype, remat = compute_dtype(stage.precision), stage.recompute
    if job.teacher is None:
        return ce_objective(job.student.config, compute_dtype=dtype, remat=remat)
    loss = stage.loss
    return kd_objective(
        job.student.config, job.teacher.config, divergence=loss.divergence, beta=loss.beta,
        temperature=loss.temperature, hard_label_weight=loss.hard_label_weight,
        soft_scale=loss.temperature**2 if loss.scale_by_t2 else 1.0, compute_dtype=dtype,
        remat=remat)


def run_train_node(ctx: NodeContext) -> None:
    """Train the node's student to `stage.total_steps` (resuming from the newest checkpoint),
    then save it as a HF folder in `<node>/model`."""
    job = build_job(ctx)
    total = job.stage.total_steps
    zero_stage = ctx.spec.hardware.parallelism.zero_stage
    # The mesh spans the devices this process sees; hardware.count is what `plan` prices.
    mesh = mesh_from_parallelism(zero_stage=zero_stage)
    optimizer = build_optimizer(job.stage.optimizer, job.stage.schedule, total)
    step_fn = make_train_step(_objective(job), optimizer,
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
        tokens = int(batch["input_ids"].size)
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
