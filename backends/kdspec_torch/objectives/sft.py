"""`sft`: CE on the response tokens of prompt/response pairs."""

from __future__ import annotations

from .base import Setup
from .ce import CrossEntropy
from .ce import build as _build_ce

LAYOUT = "pairs"


def build(setup: Setup) -> CrossEntropy:
    if getattr(setup.stage, "labels_from", None):
        raise NotImplementedError(
            f"sft stage `{setup.stage.name}`: `labels_from` (teacher labels from a step_by_step "
            "stage) is not supported by the torch backend yet")
    return _build_ce(setup)
