"""`pretrain_kd`: Gemma 2's pre-training distillation on packed documents."""

from __future__ import annotations

from .base import Setup
from .distill import Distill, build_distill

LAYOUT = "packed"


def build(setup: Setup) -> Distill:
    return build_distill(setup, setup.stage.loss)
