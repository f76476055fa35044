"""`kd`: word-level KD on prompt/response data (the MiniLLM paper's KD baseline)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import KDLoss, TeacherStage


def _kd_default_loss() -> KDLoss:
    # MiniLLM's KD baseline mixes LM loss and KD loss half and half (kd_ratio 0.5).
    return KDLoss(hard_label_weight=0.5)


class KDStage(TeacherStage):
    """Token-level KD on the response tokens of prompt/response pairs:
    L = (1-w)·s·D(p_T ‖ q_S) + w·CE(response), w = loss.hard_label_weight (0.5 by default)."""

    kind: Literal["kd"] = Field(description="Stage kind.")
    loss: KDLoss = Field(default_factory=_kd_default_loss, description="Distillation loss.")
