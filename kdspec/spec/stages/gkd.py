"""`gkd`: generalised KD (Agarwal et al. 2023), on-policy with probability lambda."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import Fraction, PositiveFloat
from .common import TeacherCache, TeacherStage


class GKDStage(TeacherStage):
    """Each step, with probability `lmbda` the responses are the student's own samples, otherwise
    the dataset's; the loss is JSD_β(p_T, q_S) per response token (TRL's GKD conventions)."""

    kind: Literal["gkd"] = Field(description="Stage kind.")
    teacher_cache: TeacherCache = Field(
        default_factory=TeacherCache,
        description="Must stay `online`: an on-policy stage scores the student's own samples, "
        "which no cache of the teacher over fixed data holds.",
    )
    lmbda: Fraction = Field(0.5, description="Fraction of on-policy (student-generated) batches.")
    beta: Fraction = Field(
        0.5, description="JSD mixture weight; 0 = forward KL, 1 = reverse KL (special-cased)."
    )
    temperature: PositiveFloat = Field(
        0.9, description="Sampling temperature of the on-policy (and seq_kd) samples. The loss "
        "is at temperature 1, as in TRL's GKDTrainer (whose compute_loss does not pass it on)."
    )
    max_new_tokens: int = Field(128, gt=0, description="Tokens per on-policy sample.")
    seq_kd: bool = Field(False, description="Use teacher generations for the off-policy batches.")
