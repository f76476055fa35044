"""`gkd`: generalised KD (Agarwal et al., ICLR 2024), following TRL's `GKDTrainer` (1.16).

For each micro-batch of prompt/response pairs, draw `u ~ U[0, 1)` from Python's `random` (as
TRL does; the trainer seeds it and checkpoints its state):

* `u ≤ lmbda`: on-policy. The student samples a completion of each row's prompt (`[bos] +
  prompt`) at `temperature`, top-k 0, top-p 1, at most `max_new_tokens` tokens, stopping at eos;
* else, with `seq_kd`: the teacher samples the completions the same way;
* else: the dataset's responses.

The loss is the generalised JSD per completion token (its eos included, padding and prompt
excluded), averaged over those tokens:

    JSD_β(p_T, q_S) = β·KL(p_T ‖ m) + (1 − β)·KL(q_S ‖ m),   m = β·p_T + (1 − β)·q_S,

with β = 0 meaning KL(p_T ‖ q_S) and β = 1 meaning KL(q_S ‖ p_T) (`losses.generalized_jsd`).
Both distributions are at temperature 1: TRL's `compute_loss` does not pass its sampling
temperature to the loss (only its optional Liger kernel did). Generated rows are cut to
`seq_len + 1` tokens like the data rows. Sampling runs with the student in eval mode.

The trainer weights micro-batches by their *dataset* target counts, so with `grad_accum > 1`
an on-policy micro-batch counts as many tokens as the pairs it replaced (exact when
`grad_accum = 1`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kdspec.spec.stages.gkd import GKDStage

from ..batches import IGNORE_INDEX, Batch, TokenData
from ..generate import Generation, Sampling, generate, left_pad
from ..losses import generalized_jsd
from .base import Objective, Setup, logits, require_causal
from .distill import check_vocab

LAYOUT = "pairs"

__all__ = ["GKD", "LAYOUT", "build", "completion_batch", "row_prompts"]


def row_prompts(batch: Batch) -> list[list[int]]:
    """Each row's prompt tokens (`[bos] + prompt`): the tokens up to and including the one
    that predicts the first target (pair rows have one contiguous response)."""
    targets = batch.labels != IGNORE_INDEX
    if not bool(targets.any(dim=1).all()):
        raise ValueError("every pair row needs at least one target token")
    first = targets.int().argmax(dim=1)
    return [batch.input_ids[row, : int(j) + 1].tolist() for row, j in enumerate(first)]


def completion_batch(prompts: list[list[int]], completions: list[list[int]], *, seq_len: int,
                     pad_id: int, index: Tensor) -> Batch:
    """Rows `prompt + completion` cut to `seq_len + 1` tokens and right-padded; the targets
    are the completion tokens (its eos included when it has one)."""
    width = seq_len + 1
    rows, targets, lengths = [], [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        row = (prompt + completion)[:width]
        target = ([False] * len(prompt) + [True] * len(completion))[:width]
        rows.append(row + [pad_id] * (width - len(row)))
        targets.append(target + [False] * (width - len(row)))
        lengths.append(len(row))
    data = TokenData(torch.tensor(rows), torch.tensor(targets), torch.tensor(lengths))
    batch = data.batch(torch.arange(len(rows)))
    return Batch(batch.input_ids, batch.labels, batch.attention_mask, index)


def _completions(gen: Generation) -> list[list[int]]:
    """Each row's generated tokens up to and including its eos."""
    return [gen.tokens[row, :n].tolist() for row, n in enumerate(gen.lengths.tolist())]


class GKD(Objective):
    """The GKD objective of the module docstring, against an online `teacher`."""

    def __init__(self, stage: GKDStage, teacher: PreTrainedModel, *, pad_id: int, eos_id: int,
                 coin: Callable[[], float] = random.random):
        self.stage, self.teacher = stage, teacher
        self.pad_id, self.eos_id, self.coin = pad_id, eos_id, coin
        self.sampling = Sampling(max_new_tokens=stage.max_new_tokens,
                                 temperature=stage.temperature)

    def source(self) -> str:
        """Where this micro-batch's responses come from: student, teacher or data."""
        if self.coin() <= self.stage.lmbda:
            return "student"
        return "teacher" if self.stage.seq_kd else "data"

    def sample(self, model: PreTrainedModel, batch: Batch) -> Batch:
        """`batch` with its responses replaced by `model`'s samples."""
        prompts = row_prompts(batch)
        ids, mask = left_pad(prompts, self.pad_id)
        device = batch.input_ids.device
        was_training = model.training
        model.eval()
        try:
            gen = generate(model, ids.to(device), mask.to(device), self.sampling,
                           eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        finally:
            model.train(was_training)
        out = completion_batch(prompts, _completions(gen), seq_len=self.stage.seq_len,
                               pad_id=self.pad_id, index=batch.index)
        return out.to(device)

    def loss(self, model: PreTrainedModel, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        source = self.source()
        if source != "data":
            batch = self.sample(model if source == "student" else self.teacher, batch)
        student = logits(model, batch)
        with torch.no_grad():
            teacher = logits(self.teacher, batch)
        jsd = generalized_jsd(student, teacher, beta=self.stage.beta,
                              mask=batch.labels != IGNORE_INDEX)
        return jsd, {"jsd": jsd.item(), "on_policy": float(source == "student")}


def build(setup: Setup) -> GKD:
    from ..models import load_model

    require_causal(setup.student, setup.stage)
    teacher = load_model(setup.config["teacher"], ctx=setup.ctx, role="teacher",
                         tokenizer=setup.tokenizer, dev=setup.device, trainable=False)
    check_vocab(setup.student, teacher.get_output_embeddings().weight.shape[0])
    return GKD(setup.stage, teacher, pad_id=setup.tokenizer.pad_token_id,
               eos_id=setup.tokenizer.eos_token_id)
