"""Stage kinds: one module each; `Stage` is their union, discriminated on `kind`."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .common import StageBase, TeacherStage, TrainStage
from .eval import EvalStage
from .gkd import GKDStage
from .kd import KDStage
from .minillm import MiniLLMStage
from .pretrain import PretrainStage
from .pretrain_kd import PretrainKDStage
from .seqkd import SeqKDStage
from .sft import SFTStage
from .step_by_step import StepByStepStage

STAGE_KINDS: dict[str, type[StageBase]] = {
    "pretrain": PretrainStage,
    "pretrain_kd": PretrainKDStage,
    "sft": SFTStage,
    "step_by_step": StepByStepStage,
    "minillm": MiniLLMStage,
    "kd": KDStage,
    "seqkd": SeqKDStage,
    "gkd": GKDStage,
    "eval": EvalStage,
}

Stage = Annotated[
    Union[  # noqa: UP007 - pydantic discriminated unions read clearer this way
        PretrainStage, PretrainKDStage, SFTStage, StepByStepStage, MiniLLMStage,
        KDStage, SeqKDStage, GKDStage, EvalStage,
    ],
    Field(discriminator="kind"),
]

__all__ = ["STAGE_KINDS", "Stage", "StageBase", "TrainStage", "TeacherStage", "EvalStage"]
