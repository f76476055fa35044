"""The root of a spec file (schema version 1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Name, StrictModel
from .data import DataSource
from .hardware import HardwareSpec
from .models import ModelDef
from .stages import Stage

SCHEMA_VERSION = 1


class Spec(StrictModel):
    """A whole distillation pipeline: models, data, hardware, and an ordered list of stages."""

    kdspec: Literal[1] = Field(description="Schema version of this file; must be 1.")
    name: Name = Field(description="Pipeline name; the default run directory is runs/<name>/.")
    description: str = Field("", description="Free text.")
    seed: int = Field(0, ge=0, description="Seed for data order, initialisation and sampling.")
    backend: str = Field("torch", description="Backend that runs the stages: torch or jax.")
    tokenizer: str = Field(
        "builtin:words",
        description="`builtin:words` (covers the builtin datasets), `builtin:bytes`, a local "
        "tokenizer folder, or `hf:ID`.",
    )
    models: dict[Name, ModelDef] = Field(
        default_factory=dict, description="Named models the stages start from."
    )
    data: dict[Name, DataSource] = Field(default_factory=dict, description="Named data sources.")
    hardware: HardwareSpec = Field(
        default_factory=HardwareSpec, description="Accelerators to estimate for."
    )
    stages: list[Stage] = Field(min_length=1, description="The pipeline, in order.")
