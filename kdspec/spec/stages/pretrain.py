"""`pretrain`: plain next-token cross-entropy (a from-scratch baseline, or to train a teacher)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import TrainStage


class PretrainStage(TrainStage):
    """Next-token cross-entropy on a text corpus: L = −(1/N) Σ_t log q(x_t | x_<t)."""

    kind: Literal["pretrain"] = Field(description="Stage kind.")
