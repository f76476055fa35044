"""`seqkd`: sequence-level KD, fine-tuning on the teacher's generated responses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import GenerationConfig, TeacherStage


def _greedy() -> GenerationConfig:
    return GenerationConfig(temperature=0.0, max_new_tokens=64)


class SeqKDStage(TeacherStage):
    """Kim & Rush 2016: the teacher answers each prompt; the student is trained with CE on those
    answers (L = −Σ_t log q(ŷ_t | prompt, ŷ_<t), ŷ ~ teacher)."""

    kind: Literal["seqkd"] = Field(description="Stage kind.")
    generation: GenerationConfig = Field(
        default_factory=_greedy, description="How the teacher generates the targets."
    )
