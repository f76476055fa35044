"""`step_by_step`: Distilling Step-by-Step (Hsieh et al. 2023): teacher rationales + multi-task SFT."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import Fraction, StrictModel
from .common import GenerationConfig, TrainStage


class Demonstration(StrictModel):
    """One few-shot chain-of-thought example."""

    input: str = Field(description="The question.")
    rationale: str = Field(description="The reasoning.")
    label: str = Field(description="The answer.")


class HTTPTeacher(StrictModel):
    """An OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted APIs)."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="Model name sent in the request.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (never written anywhere)."
    )
    max_concurrency: int = Field(8, gt=0, description="Requests in flight at most.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/timeouts, with backoff.")


def _greedy() -> GenerationConfig:
    return GenerationConfig(temperature=0.0, max_new_tokens=64)


class RationaleConfig(StrictModel):
    """How the teacher is prompted and its answers parsed."""

    http: HTTPTeacher | None = Field(
        None, description="Use an HTTP endpoint as the teacher instead of the stage's `teacher`."
    )
    template: str = Field(
        "Q: {input}\nA:",
        description="Prompt for one question; `{input}` is replaced. Demonstrations are "
        "rendered with the same template followed by ` {rationale} The answer is {label}.`",
    )
    demonstrations: list[Demonstration] | str = Field(
        default_factory=list,
        description="Few-shot examples inline, or a JSONL file next to the spec.",
    )
    answer_pattern: str = Field(
        r"The answer is\s*(?P<label>.+?)\s*\.?\s*$",
        description="Regex with a `label` group; the text before the match is the rationale.",
    )
    generation: GenerationConfig = Field(default_factory=_greedy, description="Sampling.")
    filter_gold: bool = Field(
        True, description="Drop rationales whose label disagrees with the data's gold label."
    )


class Prefixes(StrictModel):
    predict: str = Field("predict: ", description="Task prefix for label prediction.")
    explain: str = Field("explain: ", description="Task prefix for rationale generation.")


class StepByStepStage(TrainStage):
    """Multi-task training on teacher rationales: L = α·CE(label | predict: x) +
    (1-α)·CE(rationale | explain: x), loss on target tokens only (α = 0.5 as in the official
    code). `variant: single_task` trains one target `rationale + label` instead."""

    kind: Literal["step_by_step"] = Field(description="Stage kind.")
    teacher: str | None = Field(
        None, description="Local teacher model (a model name or an earlier stage's name)."
    )
    rationales: RationaleConfig = Field(
        default_factory=RationaleConfig, description="Rationale extraction."
    )
    alpha: Fraction = Field(0.5, description="Weight of the label loss.")
    prefixes: Prefixes = Field(default_factory=Prefixes, description="Task prefixes.")
    variant: Literal["multitask", "single_task"] = Field(
        "multitask", description="multitask (the paper's method) or single_task (one target)."
    )
    train_fraction: float | None = Field(
        None, gt=0, le=1, description="Use this fraction of the training records."
    )

    @model_validator(mode="after")
    def _one_teacher(self) -> StepByStepStage:
        if (self.teacher is None) == (self.rationales.http is None):
            raise ValueError("give exactly one teacher: `teacher` or `rationales.http`")
        return self
