"""The spec DSL: pydantic models (one module per stage kind) and the YAML loader."""

from .root import SCHEMA_VERSION, Spec

__all__ = ["SCHEMA_VERSION", "Spec"]
