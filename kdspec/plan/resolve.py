"""Resolve what a stage's references point at: named models, earlier stages' outputs, data."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..spec import Spec
from ..spec.models import ModelDef
from ..spec.stages import TrainStage


@dataclass(frozen=True)
class ModelOrigin:
    """Where a model comes from: a `models:` entry, or the output of a training stage."""

    kind: Literal["model", "stage"]
    name: str


class ResolveError(ValueError):
    """A reference that names nothing; `hint` proposes the closest valid name."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def closest(name: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(name: str, candidates: list[str]) -> str | None:
    best = closest(name, candidates)
    if best:
        return f"did you mean `{best}`?"
    return f"valid: {', '.join(sorted(candidates))}" if candidates else None


def train_stage_names(spec: Spec) -> list[str]:
    return [s.name for s in spec.stages if isinstance(s, TrainStage)]


def resolve_model(spec: Spec, ref: str, used_by: int | None = None) -> ModelOrigin:
    """A stage name resolves to that stage's output model, else a name from `models`.
    `used_by` (a stage index) must come after the stage whose output it uses."""
    if ref in train_stage_names(spec) and ref not in spec.models:  # a clash is reported apart
        index = next(i for i, s in enumerate(spec.stages) if s.name == ref)
        if used_by is not None and index >= used_by:
            raise ResolveError(
                f"stage `{ref}` runs after this stage; its output does not exist yet",
                "move it earlier in `stages`")
        return ModelOrigin("stage", ref)
    if ref in spec.models:
        return ModelOrigin("model", ref)
    if any(s.name == ref for s in spec.stages):
        raise ResolveError(f"stage `{ref}` is an eval stage and produces no model")
    candidates = list(spec.models) + train_stage_names(spec)
    raise ResolveError(f"no model or training stage named `{ref}`", did_you_mean(ref, candidates))


def default_student(spec: Spec, index: int) -> str | None:
    """A training stage's student defaults to the previous training stage's output."""
    for stage in reversed(spec.stages[:index]):
        if isinstance(stage, TrainStage):
            return stage.name
    return None


def student_ref(spec: Spec, index: int) -> str | None:
    stage = spec.stages[index]
    return stage.student if stage.student is not None else default_student(spec, index)


def root_model(spec: Spec, origin: ModelOrigin) -> ModelDef | None:
    """Follow stage outputs back to the `models:` entry the chain started from."""
    seen: set[str] = set()
    while origin.kind == "stage":
        if origin.name in seen:
            return None
        seen.add(origin.name)
        index = next(i for i, s in enumerate(spec.stages) if s.name == origin.name)
        ref = student_ref(spec, index)
        if ref is None:
            return None
        try:
            origin = resolve_model(spec, ref)
        except ResolveError:
            return None
    return spec.models.get(origin.name)


def local_hf_config(model: ModelDef, base_dir: Path) -> dict | None:
    """The config.json of a local `source:` folder, if there is one to read."""
    if model.source is None or model.source.startswith("hf:"):
        return None
    path = (base_dir / model.source / "config.json").expanduser()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tokenizer_of(spec: Spec, model: ModelDef | None) -> str:
    return (model.tokenizer if model and model.tokenizer else None) or spec.tokenizer
