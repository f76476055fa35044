"""Next-token cross-entropy on the target tokens: the `pretrain` and `sft` objective."""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedModel

from ..batches import IGNORE_INDEX, Batch
from ..losses import cross_entropy_loss
from .base import Objective, Setup, logits, require_causal


class CrossEntropy(Objective):
    """L = −(1/|T|) Σ_{t∈T} log q(y_t | x_<t) over the target positions T."""

    def loss(self, model: PreTrainedModel, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        loss = cross_entropy_loss(logits(model, batch), batch.labels, ignore_index=IGNORE_INDEX)
        return loss, {"ce": loss.item()}


def build(setup: Setup) -> CrossEntropy:
    require_causal(setup.student, setup.stage)
    return CrossEntropy()
