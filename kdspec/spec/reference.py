"""docs/spec.md, generated from the spec models' field descriptions (a test keeps it current)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .base import parse_quantity
from .root import Spec
from .stages import STAGE_KINDS

STAGE_NAMES = {cls.__name__ for cls in STAGE_KINDS.values()}

HEADER = """# Spec reference (schema version 1)

Generated from the pydantic models by `python -m kdspec.spec.reference > docs/spec.md`;
`tests/test_schema.py` fails when this file is out of date. Counts marked *quantity* accept
suffixes: `2T`, `4M`, `1.5B` (powers of 1000) and `512Ki`, `4Mi` (powers of 1024).
"""


def _type_name(annotation: Any) -> str:
    """A readable type: `quantity`, `int or null`, `list of str`, `"cosine" / "linear"`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        if any(getattr(m, "func", None) is parse_quantity for m in args[1:]):
            return "quantity"
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        if all(isinstance(a, type) and a.__name__ in STAGE_NAMES for a in args):
            return "stage"
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " / ".join(f"`{a!r}`".replace("'", '"') for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of name to {_type_name(args[1])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "**required**"
    if isinstance(value, BaseModel):
        return "(object)"
    return f"`{value!r}`".replace("'", '"') if value is not None else "`null`"


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(m for m in _nested_models(arg) if m not in found)
    return found


def _model_section(title: str, model: type[BaseModel], seen: set[str]) -> list[str]:
    lines = [f"## {title}", ""]
    doc = (model.__doc__ or "").strip()
    if doc:
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    nested: list[type[BaseModel]] = []
    for name, field in model.model_fields.items():
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | "
                     f"{(field.description or '').replace('|', '/')} |")
        nested += [m for m in _nested_models(field.annotation)
                   if m.__name__ not in seen and m.__name__ not in STAGE_NAMES]
    lines.append("")
    for sub in nested:
        if sub.__name__ not in seen:
            seen.add(sub.__name__)
            lines += _model_section(sub.__name__, sub, seen)
    return lines



def render() -> str:
    seen = {"Spec"}
    lines = [HEADER, *_model_section("Spec (the file's root)", Spec, seen)]
    for kind, cls in STAGE_KINDS.items():
        lines += _model_section(f"Stage `kind: {kind}`", cls, seen)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
