"""The `step_by_step` train objective on JAX (Distilling Step-by-Step, Hsieh et al. 2023).

Every example of the node's rationales artifact becomes one (prompt, target) pair per task
(``kdspec_torch.step_by_step.prompts.training_tasks``, pure Python): multitask gives
``predict`` = (predict prefix + input, label) and ``explain`` = (explain prefix + input,
rationale); single_task gives ``single`` = (predict prefix + input, answer_format filled in).
Each task's pair is a causal row ``[bos] + prompt + target + [eos]`` cut to ``seq_len + 1``
(`kdspec_jax.data.pair_rows`); an example whose prompt leaves no room for a target in some task
is dropped from every task, as in torch.

The loss of a micro-batch is the torch backend's::

    multitask:    L = α·CE_predict + (1 − α)·CE_explain
    single_task:  L = CE_single

with ``CE_task = −(1/|T_k|) Σ_{t∈T_k} log q(y_t | prompt, y_<t)`` the mean over that task's
target tokens in the micro-batch. Micro-batches are weighted by their share ``n_mb / N`` of the
step's target tokens (both tasks counted), so with ``grad_accum: 1`` a step's loss is exactly the
formula over its batch. To fit the shared train step (which divides the objective's sum by the
step's count of ``labels != -100``), the tasks of an example travel side by side in one row of
``K·seq_len`` columns and the objective returns ``n_mb · L``. A task with weight 0 is counted but
not run (no forward pass), as in torch.

Encoder-decoder students (T5) are refused: the JAX model is decoder-only.
`train_fraction` keeps ``max(1, round(f·N))`` rationale rows with the torch backend's draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec_torch.step_by_step.prompts import training_tasks

from . import losses
from .data import EpochSampler, JaxTokenizer, TokenRows, load_tokenizer, order_seed, pair_rows
from .model import JaxModelConfig, Params, forward
from .models import compute_dtype, load_model, save_student
from .optim import build_optimizer, lr_schedule
from .rationales_node import read_rationales
from .sharding import jit_train_step, mesh_from_parallelism, shard_batch, state_shardings
from .train_node import TrainJob, _resume, _train, _write_flops, _write_measured, stage_of
from .train_step import Objective, init_train_state, make_train_step

__all__ = ["TERMS", "TaskRows", "build_task_rows", "run_step_by_step_node", "select_fraction",
           "step_by_step_objective", "task_pairs", "task_weights", "unsupported_reason"]

# The name each task's CE is logged under (the torch backend's).
TERMS = {"predict": "label_ce", "explain": "rationale_ce", "single": "ce"}


def task_weights(variant: str, alpha: float) -> dict[str, float]:
    """The weight of each task's CE: multitask ``{predict: α, explain: 1 − α}``, single_task
    ``{single: 1}``."""
    if variant == "multitask":
        return {"predict": alpha, "explain": 1.0 - alpha}
    if variant == "single_task":
        return {"single": 1.0}
    raise ValueError(f"unknown step_by_step variant {variant!r}")


def select_fraction(rows: list[dict[str, Any]], fraction: float | None,
                    seed: int) -> list[dict[str, Any]]:
    """``max(1, round(f·N))`` rows with the torch trainer's seeded draw (all when None)."""
    import random

    from .data import derive_seed

    if fraction is None:
        return rows
    keep = max(1, round(fraction * len(rows)))
    return random.Random(derive_seed(seed, "fraction")).sample(rows, keep)


def task_pairs(stage: Any, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, tuple[str, str]]]:
    """The (prompt, target) pair of each task for every rationale row."""
    return [training_tasks(r, stage.variant, predict=stage.prefixes.predict,
                           explain=stage.prefixes.explain,
                           answer_format=stage.rationales.answer_format) for r in rows]


@dataclass
class TaskRows:
    """The tasks of each example side by side: ``tasks[k]`` holds task ``names[k]``'s rows
    (row ``i`` of every task is example ``i``). A batch is one `TokenRows` batch per task,
    concatenated along the sequence axis (``[b, K·seq_len]``)."""

    names: tuple[str, ...]
    tasks: tuple[TokenRows, ...]

    def __len__(self) -> int:
        return len(self.tasks[0])

    @property
    def seq_len(self) -> int:
        return self.tasks[0].seq_len

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        parts = [rows.batch(index) for rows in self.tasks]
        return {key: np.concatenate([p[key] for p in parts], axis=1) for key in parts[0]}


def _fits(prompt: list[int], bos_id: int | None, seq_len: int) -> bool:
    """`pair_rows` keeps a pair iff ``[bos] + prompt`` leaves a target inside ``seq_len + 1``."""
    return len(prompt) + (bos_id is not None) <= seq_len


def build_task_rows(pairs: Sequence[Mapping[str, tuple[str, str]]], tokenizer: JaxTokenizer,
                    seq_len: int) -> tuple[TaskRows, int]:
    """Tokenize each example's tasks (module doc). Returns the rows and the number of examples
    dropped because a prompt left no room for a target."""
    if not pairs:
        raise ValueError("no rationale rows to train on")
    names = tuple(pairs[0])
    prompts = {n: tokenizer.encode([p[n][0] for p in pairs]) for n in names}
    targets = {n: tokenizer.encode([p[n][1] for p in pairs]) for n in names}
    bos = tokenizer.bos_id
    keep = [i for i in range(len(pairs)) if all(_fits(prompts[n][i], bos, seq_len)
                                                 for n in names)]
    if not keep:
        raise ValueError(f"no example fits seq_len {seq_len} ({len(pairs)} examples); raise "
                         "seq_len")
    tasks = []
    for n in names:
        rows = pair_rows([prompts[n][i] for i in keep], [targets[n][i] for i in keep],
                         bos_id=bos, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                         seq_len=seq_len)
        if len(rows) != len(keep):  # pair_rows changed its rule; rows would misalign
            raise AssertionError(f"task {n}: {len(rows)} rows for {len(keep)} examples")
        tasks.append(rows)
    return TaskRows(names, tuple(tasks)), len(pairs) - len(keep)


def step_by_step_objective(config: JaxModelConfig, names: Sequence[str],
                           weights: Mapping[str, float], seq_len: int, *,
                           compute_dtype: Any = None, remat: bool = False) -> Objective:
    """``n_mb · Σ_k w_k · CE_k`` for a micro-batch of ``[b, K·seq_len]`` side-by-side task rows
    (module doc), with each task's mean CE ``CE_k`` as a part (scaled by ``n_mb`` too, so the
    step reports the target-weighted mean of the micro-batch values)."""
    run = [k for k, name in enumerate(names) if weights[name] > 0]

    def objective(params: Params, mb: Mapping[str, jax.Array], frozen: Any
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del frozen
        labels = mb["labels"]
        n_mb = jnp.sum(labels != losses.IGNORE_INDEX).astype(jnp.float32)
        total = jnp.zeros((), jnp.float32)
        parts = {}
        for k in run:  # one forward per task, as the official code's two passes
            cols = slice(k * seq_len, (k + 1) * seq_len)
            task_labels = labels[:, cols]
            logits = forward(params, config, mb["input_ids"][:, cols],
                             mb["attention_mask"][:, cols], compute_dtype=compute_dtype,
                             remat=remat)
            counted = task_labels != losses.IGNORE_INDEX
            terms = losses.cross_entropy_terms(logits, task_labels)
            ce = jnp.sum(jnp.where(counted, terms, 0.0)) / jnp.maximum(jnp.sum(counted), 1)
            total = total + weights[names[k]] * ce
            parts[TERMS[names[k]]] = ce * n_mb
        return total * n_mb, parts

    return objective


def _job(ctx: NodeContext) -> tuple[TrainJob, TaskRows]:
    stage = stage_of(ctx)
    config = ctx.node.config
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=ctx.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    student = load_model(config["student"], ctx=ctx, role="student", tokenizer=tokenizer,
                         trainable=True)
    rows = select_fraction(read_rationales(ctx), stage.train_fraction, config["seed"])
    data, dropped = build_task_rows(task_pairs(stage, rows), tokenizer, stage.seq_len)
    note = f"; {dropped} dropped: prompt longer than seq_len" if dropped else ""
    ctx.emit(Event("message", ctx.node.id, message=(
        f"training on {len(data)} examples × {len(data.names)} task(s){note}")))
    sampler = EpochSampler(len(data), order_seed(config["seed"], config["data"]))
    return TrainJob(ctx, stage, tokenizer, student, None, None, data, sampler), data


def unsupported_reason(config: Mapping[str, Any]) -> str | None:
    """Why a `step_by_step` train node of this node config cannot run here (None: it can):
    only an encoder-decoder (T5) student, which the decoder-only JAX model cannot be."""
    ref = config.get("student") or {}
    arch = ref.get("arch") or {}
    if arch.get("family") == "t5":
        return ("a T5 (encoder-decoder) student; the jax backend trains decoder-only students: "
                "run it with `--backend torch`")
    return None


def run_step_by_step_node(ctx: NodeContext) -> None:
    """Train the node's student on its rationales (module doc), resuming from the newest
    checkpoint; save it as a HF folder in `<node>/model`."""
    reason = unsupported_reason(ctx.node.config)
    if reason is not None:
        raise NotImplementedError(f"the jax backend cannot run `{ctx.node.id}`: {reason}")
    job, data = _job(ctx)
    stage, total = job.stage, job.stage.total_steps
    zero_stage = ctx.spec.hardware.parallelism.zero_stage
    mesh = mesh_from_parallelism(zero_stage=zero_stage)
    optimizer = build_optimizer(stage.optimizer, stage.schedule, total)
    objective = step_by_step_objective(
        job.student.config, data.names, task_weights(stage.variant, stage.alpha),
        data.seq_len, compute_dtype=compute_dtype(stage.precision), remat=stage.recompute)
    step_fn = make_train_step(objective, optimizer,
                              lr_fn=lr_schedule(stage.optimizer, stage.schedule, total))
    state = init_train_state(job.student.params, optimizer)
    shardings = state_shardings(state, mesh, zero_stage)
    state, progress = _resume(ctx, jax.device_get(state))
    state = jax.device_put(state, shardings)
    first = shard_batch(job.batch(progress.step), mesh)
    _write_flops(ctx, step_fn, state, first, None)
    compiled = jit_train_step(step_fn, shardings, mesh).lower(state, first, None).compile()
    state, progress = _train(job, compiled, state, None, mesh, progress)
    save_student(job.student, state.params, job.tokenizer, ctx.node_dir / "model")
    _write_measured(ctx, progress)
