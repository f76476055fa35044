"""`eval`: evaluate models (the teacher beside the students) on held-out data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .common import StageBase
from .step_by_step import FewShotPrompt

Metric = Literal["perplexity", "rouge_l", "accuracy"]


class EvalPrompt(FewShotPrompt):
    """How `accuracy` prompts one model and reads its answer: e.g. `template: "predict:
    {input}"` for a step-by-step student, or a teacher's few-shot chain-of-thought prompt with
    the `answer_pattern` its rationales were parsed with."""

    template: str = Field(
        "{input}", description="Prompt for one record; `{input}` is replaced by its input."
    )
    answer_pattern: str | None = Field(
        None,
        description="Regex with a `label` group read out of the generation (as rationales are "
        "parsed); the prediction is that group, or empty when nothing matches. None: the whole "
        "generation is the prediction.",
    )


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
    prompts: dict[str, EvalPrompt] = Field(
        default_factory=dict,
        description="Per model (a name from `models`), how `accuracy` prompts it and reads its "
        "answer. Models not named here get the record's `prompt` (or `input`) and are judged "
        "on their whole generation.",
    )

    @model_validator(mode="after")
    def _prompts_name_models(self) -> EvalStage:
        unknown = [name for name in self.prompts if name not in self.models]
        if unknown:
            raise ValueError(f"`prompts` names {', '.join(unknown)}, not in `models` "
                             f"({', '.join(self.models)})")
        return self
