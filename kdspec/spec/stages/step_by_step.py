"""`step_by_step`: Distilling Step-by-Step (Hsieh et al. 2023): rationales + multi-task SFT."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

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


class FewShotPrompt(StrictModel):
    """A few-shot chain-of-thought prompt and how an answer is read out of a generation.

    The prompt is each demonstration as `template` + `answer_format`, then `template` for the
    question; `{input}`, `{rationale}` and `{label}` are replaced literally (other braces are
    kept as written)."""

    template: str = Field(
        "Q: {input}\nA:",
        description="Prompt for one question; `{input}` is replaced by the record's input.",
    )
    demonstrations: list[Demonstration] | str = Field(
        default_factory=list,
        description="Few-shot examples inline, or a JSONL file (input, rationale, label per "
        "line) relative to the spec file.",
    )
    answer_format: str = Field(
        " {rationale} The answer is {label}.",
        description="How a demonstration's answer follows its `template`; the teacher imitates "
        "it, so `answer_pattern` must read it back.",
    )
    answer_pattern: str = Field(
        r"The answer is\s*(?P<label>.+?)\s*\.?\s*$",
        description="Regex with a `label` group, searched in the generation (cut where it starts "
        "a new question, i.e. at the text of `template` before `{input}`); the text before the "
        "match is the rationale.",
    )

    @field_validator("template")
    @classmethod
    def _has_input(cls, value: str) -> str:
        if "{input}" not in value:
            raise ValueError("the template needs an `{input}` placeholder for the question")
        return value

    @field_validator("answer_format")
    @classmethod
    def _has_answer(cls, value: str) -> str:
        missing = [p for p in ("{rationale}", "{label}") if p not in value]
        if missing:
            raise ValueError(f"answer_format needs the placeholder(s) {', '.join(missing)}")
        return value

    @field_validator("answer_pattern")
    @classmethod
    def _label_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as err:
            raise ValueError(f"answer_pattern is not a valid regular expression: {err}") from err
        if "label" not in compiled.groupindex:
            raise ValueError("answer_pattern needs a named group `(?P<label>...)`")
        return value


class RationaleConfig(FewShotPrompt):
    """Where rationales come from, how the teacher is prompted and its answers parsed."""

    source: Literal["teacher", "data"] = Field(
        "teacher",
        description="teacher = generate with the stage's `teacher` (or `http`); data = use the "
        "data's own `rationale` and `label` fields (human rationales: no teacher runs).",
    )
    http: HTTPTeacher | None = Field(
        None, description="Use an HTTP endpoint as the teacher instead of the stage's `teacher`."
    )
    generation: GenerationConfig = Field(default_factory=_greedy, description="Sampling.")
    filter_gold: bool = Field(
        True, description="Drop rationales whose label disagrees with the data's gold label "
        "(compared after the accuracy metric's normalisation)."
    )


class Prefixes(StrictModel):
    """Task prefixes prepended to the input (the official code's `predict: ` / `explain: `)."""

    predict: str = Field("predict: ", description="Task prefix for label prediction.")
    explain: str = Field("explain: ", description="Task prefix for rationale generation.")


class StepByStepStage(TrainStage):
    """Multi-task training on teacher rationales: L = α·CE(label | predict: x) +
    (1-α)·CE(rationale | explain: x), loss on target tokens only (α = 0.5 as in the official
    code). `variant: single_task` trains one target, `answer_format` filled with the rationale
    and label, after `predict: x`."""

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
        if self.rationales.source == "data":
            if self.teacher is not None or self.rationales.http is not None:
                raise ValueError("`rationales.source: data` uses the data's own rationales; "
                                 "drop `teacher` and `rationales.http`")
        elif self.teacher is not None and self.rationales.http is not None:
            raise ValueError("give exactly one teacher: `teacher` or `rationales.http`")
        elif self.teacher is None and self.rationales.http is None:
            raise ValueError("give a teacher: `teacher` or `rationales.http` (or "
                             "`rationales.source: data` to train on the data's own rationales)")
        return self
