"""`sft`: supervised fine-tuning, CE on the response tokens of prompt/response pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import TrainStage


class SFTStage(TrainStage):
    """Cross-entropy on response tokens only: L = −(1/|R|) Σ_{t∈R} log q(y_t | prompt, y_<t)."""

    kind: Literal["sft"] = Field(description="Stage kind.")
    labels_from: str | None = Field(
        None,
        description="Train on the labels a `step_by_step` stage's teacher wrote (its rationales "
        "node) instead of the data's responses: the label-only baseline of Hsieh et al.",
    )
    train_fraction: float | None = Field(
        None, gt=0, le=1, description="Use this fraction of the training records."
    )
