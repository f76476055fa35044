"""`sft`: CE on the response tokens of prompt/response pairs."""

from __future__ import annotations

from .base import Setup
from .ce import build as _build_ce

LAYOUT = "pairs"


def load_data(setup: Setup):
    """`labels_from`: the teacher's labels from a step_by_step stage's rationales artifact
    (decoder-only or T5 student); otherwise the data source's prompt/response pairs."""
    if setup.stage.labels_from:
        from ..step_by_step.objective import load_data as load_teacher_labels

        return load_teacher_labels(setup)
    from ..train_node import load_data as load_pairs

    return load_pairs(setup.ctx, setup.stage, LAYOUT, setup.tokenizer)


def build(setup: Setup):
    if setup.stage.labels_from:
        from ..step_by_step.objective import build as build_label_only

        return build_label_only(setup)
    return _build_ce(setup)
