"""Token-level distillation against a frozen teacher: the `pretrain_kd` and `kd` objective.

    L = (1 − w)·s·D_T(p_T ‖ q_S) + w·CE(labels)

averaged over the target tokens, with `w = loss.hard_label_weight`, `s = T²` when
`loss.scale_by_t2` (else 1), and `D` the divergence `loss.divergence` (forward KL, reverse KL,
or generalised JSD(β)) between `softmax(logits / T)` of teacher and student. The teacher is a
model run online (frozen, eval mode, no grad) or a cached top-K / sampled-K slice; a slice
defines forward KL only.

Two computations of the same value: plain (full `[tokens, vocab]` logits and
`kdspec_torch.losses`), or chunked (`chunked_kd_loss` on the final hidden states and the head
weight, never building the logits). `loss.chunked: auto` picks chunked when a micro-batch's
`tokens × vocab ≥ CHUNKED_AUTO_ELEMENTS` (2^27: 512 MiB per fp32 copy of the logits), the
estimator's rule (`kdspec.estimate.memory.chunked_by_default`), so `kdspec plan` prices it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kdspec.estimate.memory import CHUNKED_AUTO_ELEMENTS, chunked_by_default
from kdspec.spec.stages.common import KDLoss

from ..batches import IGNORE_INDEX, Batch
from ..chunked_loss import chunked_kd_loss
from ..losses import cross_entropy_loss, divergence, sparse_divergence
from ..teacher_cache import CacheReader
from .base import (
    Objective,
    Setup,
    head_problem,
    head_weight,
    hidden_states,
    logits,
    require_causal,
)

CHUNK_AUTO_ELEMENTS = CHUNKED_AUTO_ELEMENTS  # the name this module exported first


def use_chunked(setting: str, tokens: int, vocab: int, *, capable: bool = True) -> bool:
    """Whether `loss.chunked` (`on`/`off`/`auto`) selects the chunked loss for a micro-batch of
    `tokens` tokens. `auto` never picks it for models it cannot serve (`capable` False: a head
    bias or a final-logit soft cap); `on` then fails with the reason when the loss runs."""
    if setting == "auto":
        return capable and chunked_by_default(tokens, vocab)
    return setting == "on"


class Distill(Objective):
    """The KD loss above, for an online `teacher` model or a `cache` of teacher slices."""

    def __init__(self, loss: KDLoss, *, chunked: bool, teacher: PreTrainedModel | None = None,
                 cache: CacheReader | None = None):
        if (teacher is None) == (cache is None):
            raise ValueError("give exactly one of an online teacher or a teacher cache")
        if cache is not None and loss.divergence != "forward_kl":
            raise ValueError(
                f"divergence {loss.divergence!r} needs the teacher's full distribution; a "
                "cached top-K / sampled-K teacher supports forward_kl only (use an online "
                "teacher)")
        self.config, self.chunked, self.teacher, self.cache = loss, chunked, teacher, cache
        self.soft_scale = loss.temperature**2 if loss.scale_by_t2 else 1.0

    def loss(self, model: PreTrainedModel, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        if self.chunked:
            return self._chunked(model, batch), {}
        return self._plain(model, batch)

    def _plain(self, model: PreTrainedModel, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        student = logits(model, batch)
        mask = batch.labels != IGNORE_INDEX
        if self.cache is not None:
            ids, probs = self.cache.get(batch.index, student.device)
            soft = sparse_divergence(cfg.divergence, student, ids, probs,
                                     temperature=cfg.temperature, mask=mask)
        else:
            with torch.no_grad():
                teacher = logits(self.teacher, batch)
            soft = divergence(cfg.divergence, student, teacher, beta=cfg.beta,
                              temperature=cfg.temperature, mask=mask)
        ce = cross_entropy_loss(student, batch.labels, ignore_index=IGNORE_INDEX)
        w = cfg.hard_label_weight
        total = (1 - w) * self.soft_scale * soft + w * ce
        return total, {"kd": soft.item(), "ce": ce.item()}

    def _chunked(self, model: PreTrainedModel, batch: Batch) -> Tensor:
        cfg = self.config
        teacher: dict[str, object] = {}
        if self.cache is not None:
            teacher["teacher_topk"] = self.cache.get(batch.index, batch.input_ids.device)
        else:
            with torch.no_grad():
                teacher["teacher_hidden"] = hidden_states(self.teacher, batch)
            teacher["teacher_head_weight"] = head_weight(self.teacher)
        return chunked_kd_loss(
            hidden_states(model, batch), head_weight(model), **teacher,
            divergence=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature,
            labels=batch.labels, hard_label_weight=cfg.hard_label_weight,
            ignore_index=IGNORE_INDEX, soft_scale=self.soft_scale)


def micro_batch_tokens(setup: Setup) -> int:
    stage = setup.stage
    return stage.batch_size // stage.grad_accum * stage.seq_len


def check_vocab(student: PreTrainedModel, teacher_vocab: int) -> None:
    vocab = student.get_output_embeddings().weight.shape[0]
    if vocab != teacher_vocab:
        raise ValueError(f"teacher vocabulary ({teacher_vocab}) != student vocabulary ({vocab}): "
                         "token-level KD needs one shared tokenizer")


def build_distill(setup: Setup, loss: KDLoss) -> Distill:
    """An online or cached-teacher Distill objective for a `pretrain_kd` or `kd` stage."""
    from ..models import load_model

    require_causal(setup.student, setup.stage)
    vocab = setup.student.get_output_embeddings().weight.shape[0]
    tokens = micro_batch_tokens(setup)
    cache_dir = setup.ctx.input_dir("teacher_logits")
    if cache_dir is not None:
        cache = CacheReader.open(cache_dir / "cache", expect=setup.ctx.plan.node(
            setup.ctx.node.inputs["teacher_logits"]))
        check_vocab(setup.student, cache.vocab_size)
        capable = head_problem(setup.student) is None
        return Distill(loss, chunked=use_chunked(loss.chunked, tokens, vocab, capable=capable),
                       cache=cache)
    teacher = load_model(setup.config["teacher"], ctx=setup.ctx, role="teacher",
                         tokenizer=setup.tokenizer, dev=setup.device, trainable=False)
    check_vocab(setup.student, teacher.get_output_embeddings().weight.shape[0])
    capable = head_problem(setup.student) is None and head_problem(teacher) is None
    return Distill(loss, chunked=use_chunked(loss.chunked, tokens, vocab, capable=capable),
                   teacher=teacher)
