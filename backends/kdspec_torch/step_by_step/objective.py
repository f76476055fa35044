"""The `step_by_step` objective, its single-task variant, and label-only SFT on teacher labels.

Every example of the rationales artifact becomes one (prompt, target) pair per task
(`prompts.training_tasks`), and a micro-batch holds the same examples in every task. The loss of
a micro-batch is

    multitask:    L = α·CE_predict + (1 − α)·CE_explain
    single_task:  L = CE_single
    label-only:   L = CE_label   (an `sft` stage with `labels_from`)

where each ``CE_task = −(1/|T|) Σ_{t∈T} log q(y_t | prompt, y_<t)`` is the mean over that task's
target tokens T in the micro-batch (the target and its eos; never the prompt or padding), as the
official code's ``alpha * pred_outputs.loss + (1 - alpha) * expl_outputs.loss`` with two forward
passes, one per task. A task with weight 0 is not run.

Layouts, by the student:

* decoder-only (causal LM): ``[bos] + prompt + target + [eos]`` rows, right-padded, cut to
  ``seq_len + 1`` tokens (`batches.pair_rows`); an example whose prompt leaves no room for a
  target token in some task is dropped from every task;
* encoder-decoder (T5): the encoder reads ``prompt[:seq_len - 1] + [eos]``, the decoder predicts
  ``(target + [eos])[:seq_len]`` from the shifted labels (``decoder_start`` first).

The trainer weights micro-batches by their share of the step's target tokens (both tasks' counted
here), so with ``grad_accum: 1`` a step's loss is exactly the formula over its batch; with
micro-batches it is their target-weighted mean.

`train_fraction` keeps ``max(1, round(f·N))`` examples of the artifact, drawn with the same seeded
draw as the trainer's, so a `step_by_step` and an `sft` stage on one artifact keep the same
examples.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdspec.run.events import Event
from kdspec.spec.stages.sft import SFTStage
from kdspec.spec.stages.step_by_step import StepByStepStage

from ..batches import IGNORE_INDEX, Batch, TokenData, encode, pair_rows
from ..losses import cross_entropy_loss
from ..objectives.base import Objective, Setup
from ..runtime import derive_seed
from .prompts import Variant, training_tasks
from .rationales_node import read_rationales

__all__ = ["LAYOUT", "StepByStepLoss", "TaskBatch", "TaskData", "build", "build_task_data",
           "load_data", "select_fraction", "task_weights", "variant_of", "weighted_task_loss"]

LAYOUT = "tasks"
# The name each task's CE is logged under.
TERMS = {"predict": "label_ce", "explain": "rationale_ce", "single": "ce", "label": "ce"}


@dataclass
class Seq2SeqBatch(Batch):
    """An encoder-decoder micro-batch: `input_ids`/`attention_mask` feed the encoder, `labels`
    are the decoder's targets (IGNORE_INDEX past each target's eos)."""

    @property
    def n_tokens(self) -> int:
        """Tokens the model reads: encoder tokens plus decoder positions (padding excluded)."""
        return super().n_tokens + self.n_targets

    def to(self, device: torch.device) -> Seq2SeqBatch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Seq2SeqBatch(self.input_ids.to(device), self.labels.to(device), mask, self.index)


@dataclass
class TaskBatch:
    """The same examples in every task: `tasks[name]` is that task's micro-batch."""

    tasks: dict[str, Batch]
    index: Tensor

    @property
    def n_targets(self) -> int:
        return sum(b.n_targets for b in self.tasks.values())

    @property
    def n_tokens(self) -> int:
        return sum(b.n_tokens for b in self.tasks.values())

    def to(self, device: torch.device) -> TaskBatch:
        return TaskBatch({name: b.to(device) for name, b in self.tasks.items()}, self.index)


class Seq2SeqRows:
    """Encoder inputs and decoder labels, padded to the longest; a batch trims to its own."""

    def __init__(self, sources: list[list[int]], targets: list[list[int]], pad_id: int):
        self.source_len = torch.tensor([len(s) for s in sources])
        self.target_len = torch.tensor([len(t) for t in targets])
        self.sources = _pad(sources, pad_id)
        self.targets = _pad(targets, IGNORE_INDEX)

    def __len__(self) -> int:
        return self.sources.shape[0]

    def batch(self, index: Tensor) -> Seq2SeqBatch:
        source_len, target_len = self.source_len[index], self.target_len[index]
        ids = self.sources[index, : int(source_len.max())]
        mask = (torch.arange(ids.shape[1]) < source_len[:, None]).long()
        labels = self.targets[index, : int(target_len.max())]
        return Seq2SeqBatch(ids, labels, mask, index)


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class TaskData:
    """One row per example in every task (`tasks[name]` has `batch(index)`)."""

    tasks: dict[str, TokenData | Seq2SeqRows]

    def __len__(self) -> int:
        return len(next(iter(self.tasks.values()))) if self.tasks else 0

    def batch(self, index: Tensor) -> TaskBatch:
        return TaskBatch({name: rows.batch(index) for name, rows in self.tasks.items()}, index)


def _fits_causal(prompt: list[int], bos_id: int | None, seq_len: int) -> bool:
    """`pair_rows` keeps a pair iff `[bos] + prompt` leaves a target inside `seq_len + 1`."""
    return len(prompt) + (bos_id is not None) <= seq_len


def build_task_data(pairs: Sequence[Mapping[str, tuple[str, str]]],
                    tokenizer: PreTrainedTokenizerBase, seq_len: int, *,
                    encoder_decoder: bool) -> tuple[TaskData, int]:
    """Tokenize each example's tasks (module doc for the layouts). Returns the data and the
    number of examples dropped because a prompt left no room for a target."""
    names = list(pairs[0]) if pairs else []
    prompts = {n: encode(tokenizer, [p[n][0] for p in pairs]) for n in names}
    targets = {n: encode(tokenizer, [p[n][1] for p in pairs]) for n in names}
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if encoder_decoder:
        tasks: dict[str, TokenData | Seq2SeqRows] = {
            n: Seq2SeqRows([p[: seq_len - 1] + [eos] for p in prompts[n]],
                           [(t + [eos])[:seq_len] for t in targets[n]], pad)
            for n in names}
        return TaskData(tasks), 0
    keep = [i for i in range(len(pairs))
            if all(_fits_causal(prompts[n][i], bos, seq_len) for n in names)]
    tasks = {}
    for n in names:
        rows = pair_rows([prompts[n][i] for i in keep], [targets[n][i] for i in keep],
                         bos_id=bos, eos_id=eos, pad_id=pad, seq_len=seq_len)
        if len(rows) != len(keep):  # pair_rows changed its rule; rows would misalign
            raise AssertionError(f"task {n}: {len(rows)} rows for {len(keep)} examples")
        tasks[n] = rows
    return TaskData(tasks), len(pairs) - len(keep)


def task_weights(variant: Variant, alpha: float) -> dict[str, float]:
    """The weight of each task's CE in the loss."""
    if variant == "multitask":
        return {"predict": alpha, "explain": 1.0 - alpha}
    return {"single" if variant == "single_task" else "label": 1.0}


def weighted_task_loss(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``L = Σ_task w_task · CE_task`` (multitask: ``α·CE_predict + (1 − α)·CE_explain``)."""
    return sum((weights[name] * loss for name, loss in losses.items()),
               start=torch.zeros((), device=next(iter(losses.values())).device))


def task_cross_entropy(model: PreTrainedModel, batch: Batch) -> Tensor:
    """Mean CE over one task's target tokens, for a causal LM or an encoder-decoder."""
    if model.config.is_encoder_decoder:
        decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=batch.labels)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       decoder_input_ids=decoder_ids, use_cache=False).logits
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       use_cache=False).logits
    return cross_entropy_loss(logits, batch.labels, ignore_index=IGNORE_INDEX)


class StepByStepLoss(Objective):
    """``L = Σ_task w_task · CE_task`` over a TaskBatch (module doc); logs each task's CE."""

    def __init__(self, weights: Mapping[str, float]):
        self.weights = dict(weights)

    def loss(self, model: PreTrainedModel, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        losses = {name: task_cross_entropy(model, batch.tasks[name])
                  for name, weight in self.weights.items() if weight > 0}
        return weighted_task_loss(losses, self.weights), \
            {TERMS[name]: loss.item() for name, loss in losses.items()}


def variant_of(stage: Any) -> Variant:
    if isinstance(stage, StepByStepStage):
        return stage.variant
    if isinstance(stage, SFTStage) and stage.labels_from:
        return "label_only"
    raise TypeError(f"stage `{stage.name}` ({stage.kind}) does not train on rationales")


def select_fraction(rows: list[dict[str, Any]], fraction: float | None,
                    seed: int) -> list[dict[str, Any]]:
    """``max(1, round(f·N))`` rows drawn with the trainer's seeded draw (all when None)."""
    if fraction is None:
        return rows
    keep = max(1, round(fraction * len(rows)))
    return random.Random(derive_seed(seed, "fraction")).sample(rows, keep)


def _pairs(stage: Any, rows: list[dict[str, Any]]) -> list[dict[str, tuple[str, str]]]:
    variant = variant_of(stage)
    if variant == "label_only":
        return [training_tasks(r, variant) for r in rows]
    return [training_tasks(r, variant, predict=stage.prefixes.predict,
                           explain=stage.prefixes.explain,
                           answer_format=stage.rationales.answer_format) for r in rows]


def load_data(setup: Setup) -> TaskData:
    """The stage's training rows from its rationales input (module doc)."""
    ctx, stage = setup.ctx, setup.stage
    rows = select_fraction(read_rationales(ctx), stage.train_fraction, setup.config["seed"])
    data, dropped = build_task_data(_pairs(stage, rows), setup.tokenizer, stage.seq_len,
                                    encoder_decoder=setup.student.config.is_encoder_decoder)
    if len(data) == 0:
        raise ValueError(f"stage `{stage.name}`: no example fits seq_len {stage.seq_len} "
                         f"({len(rows)} examples); raise seq_len")
    note = f"; {dropped} dropped: prompt longer than seq_len" if dropped else ""
    ctx.emit(Event("message", ctx.node.id,
                   message=f"training on {len(data)} examples × {len(data.tasks)} task(s){note}"))
    return data


def build(setup: Setup) -> StepByStepLoss:
    stage = setup.stage
    return StepByStepLoss(task_weights(variant_of(stage), getattr(stage, "alpha", 1.0)))
