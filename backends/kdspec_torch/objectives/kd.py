"""`kd`: word-level KD on the response tokens of prompt/response pairs (MiniLLM's baseline)."""

from __future__ import annotations

from .base import Setup
from .distill import Distill, build_distill

LAYOUT = "pairs"


def build(setup: Setup) -> Distill:
    return build_distill(setup, setup.stage.loss)
