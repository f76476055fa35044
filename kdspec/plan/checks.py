"""Checks that cross stages: teacher and student must share a vocabulary where logits meet."""

from __future__ import annotations

from typing import Any

from ..spec import Spec
from .archinfo import origin_dims, origin_tokenizer
from .graph import Plan
from .resolve import ModelOrigin, did_you_mean

# Stage kinds that compare teacher and student distributions token by token.
LOGIT_LEVEL_KINDS = ("pretrain_kd", "kd", "gkd", "minillm")


def _origin(entry: dict[str, Any] | None) -> ModelOrigin | None:
    if not entry:
        return None
    return ModelOrigin("stage", entry["stage"]) if "stage" in entry else ModelOrigin(
        "model", entry["model"])


def check_plan(plan: Plan, spec: Spec, builder: Any) -> None:
    _check_accelerator(builder, spec)
    for index, stage in enumerate(spec.stages):
        if stage.kind not in LOGIT_LEVEL_KINDS:
            continue
        node = plan.node(stage.name)
        teacher, student = _origin(node.config.get("teacher")), _origin(node.config.get("student"))
        if teacher is None or student is None:
            continue
        _check_tokenizers(builder, index, spec, teacher, student)
        _check_vocab(builder, index, spec, teacher, student)


def _check_accelerator(builder: Any, spec: Spec) -> None:
    from ..estimate.hardware import ACCELERATORS

    name = spec.hardware.accelerator
    if name not in ACCELERATORS:
        builder.error(("hardware", "accelerator"), f"unknown accelerator `{name}`",
                      did_you_mean(name, list(ACCELERATORS)))


def _check_tokenizers(builder: Any, index: int, spec: Spec, teacher: ModelOrigin,
                      student: ModelOrigin) -> None:
    t_tok, s_tok = origin_tokenizer(spec, teacher), origin_tokenizer(spec, student)
    if t_tok != s_tok:
        builder.error(("stages", index, "teacher"),
                      f"teacher tokenizer `{t_tok}` differs from student tokenizer `{s_tok}`: "
                      "token-level distillation needs one shared tokenizer",
                      "use seqkd or step_by_step across tokenizers")


def _check_vocab(builder: Any, index: int, spec: Spec, teacher: ModelOrigin,
                 student: ModelOrigin) -> None:
    t_dims = origin_dims(spec, teacher, builder.base_dir)
    s_dims = origin_dims(spec, student, builder.base_dir)
    if t_dims is None or s_dims is None:
        return  # unknowable before the weights are loaded; the backend checks again
    if t_dims.vocab_size != s_dims.vocab_size:
        builder.error(("stages", index, "teacher"),
                      f"teacher vocabulary ({t_dims.vocab_size}) differs from student "
                      f"vocabulary ({s_dims.vocab_size}): their logits cannot be compared")
