"""`eval`: evaluate models (the teacher beside the students) on held-out data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import StageBase

Metric = Literal["perplexity", "rouge_l", "accuracy"]


class EvalStage(StageBase):
    """Held-out perplexity, ROUGE-L of greedy generations, exact-match accuracy."""

    kind: Literal["eval"] = Field(description="Stage kind.")
    models: list[str] = Field(
        min_length=1, description="Models to evaluate: stage names or names from `models`."
    )
    data: list[str] = Field(min_length=1, description="Data sources to evaluate on.")
    metrics: list[Metric] = Field(
        default_factory=lambda: ["perplexity"], min_length=1, description="Metrics to compute."
    )
    seq_len: int = Field(256, gt=0, description="Tokens per sequence for perplexity.")
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass.")
    max_examples: int | None = Field(None, gt=0, description="Evaluate at most this many.")
    max_new_tokens: int = Field(64, gt=0, description="Generation length for rouge_l/accuracy.")
