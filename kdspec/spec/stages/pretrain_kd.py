"""`pretrain_kd`: Gemma 2's pre-training distillation against a frozen teacher's distribution."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import KDLoss, TeacherCache, TeacherStage


class PretrainKDStage(TeacherStage):
    """Soft-target KD on a corpus (Gemma 2): L = Σ_t D(p_T(·|x_<t) ‖ q_S(·|x_<t)), forward KL by
    default, optionally mixed with the hard-label CE; the teacher runs online or comes from a
    cached top-K / sampled-K slice."""

    kind: Literal["pretrain_kd"] = Field(description="Stage kind.")
    loss: KDLoss = Field(default_factory=KDLoss, description="Distillation loss.")
    teacher_cache: TeacherCache = Field(
        default_factory=TeacherCache, description="Online teacher or a cached slice."
    )
