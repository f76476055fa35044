"""What every objective shares: its build context, its interface, and the student's outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdspec.run.backend import NodeContext
from kdspec.spec.stages.common import TrainStage

from ..batches import Batch


@dataclass
class Setup:
    """What an objective may need to build itself: the node, its stage, and the student."""

    ctx: NodeContext
    stage: TrainStage
    tokenizer: PreTrainedTokenizerBase
    student: PreTrainedModel
    device: torch.device

    @property
    def config(self) -> dict[str, Any]:
        return self.ctx.node.config


class Objective:
    """A training loss. `loss(model, batch)` returns the mean loss over the batch's target
    tokens (labels != IGNORE_INDEX) and named float terms to log. The trainer weights each
    micro-batch by its share of the step's target tokens, so a step's loss is the mean over all
    its target tokens whatever the micro-batching. `teacher` is a frozen model the objective
    runs (switched to eager attention with the student when FLOPs are measured)."""

    teacher: PreTrainedModel | None = None

    def loss(self, model: PreTrainedModel, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


def require_causal(model: PreTrainedModel, stage: TrainStage) -> None:
    if model.config.is_encoder_decoder:
        raise NotImplementedError(
            f"stage `{stage.name}` ({stage.kind}) trains decoder-only models; "
            f"{model.config.model_type} is an encoder-decoder (supported: llama, qwen2, gemma2, "
            "gpt2)")


def logits(model: PreTrainedModel, batch: Batch) -> Tensor:
    """`[batch, seq, vocab]` next-token logits."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 use_cache=False).logits


def hidden_states(model: PreTrainedModel, batch: Batch) -> Tensor:
    """The final (normed) hidden states `[batch, seq, hidden]`, without the LM head."""
    return model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            use_cache=False).last_hidden_state


def head_problem(model: PreTrainedModel) -> str | None:
    """Why the LM head is not a plain bias-free projection of the final hidden states (which a
    loss that applies the head itself, like the chunked loss, needs); None when it is."""
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        return f"{model.config.model_type}'s LM head has a bias"
    if getattr(model.config, "final_logit_softcapping", None):
        return f"{model.config.model_type} soft-caps its final logits after the head"
    return None


def head_weight(model: PreTrainedModel) -> Tensor:
    """The `[vocab, hidden]` output projection, for losses that apply the head themselves."""
    problem = head_problem(model)
    if problem:
        raise ValueError(f"{problem}, which the chunked loss cannot apply; use loss.chunked: off")
    return model.get_output_embeddings().weight
