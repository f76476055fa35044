"""The spec's JSON Schema, in draft-7 form so that editors (YAML language servers) can use it."""

from __future__ import annotations

import json
from typing import Any

from .root import Spec

DRAFT7 = "http://json-schema.org/draft-07/schema#"


def _to_draft7(node: Any) -> Any:
    """pydantic emits draft 2020-12: move `$defs` to `definitions` and drop the OpenAPI-only
    `discriminator` keyword (the `kind` const in each branch already selects the branch)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "discriminator":
                continue
            if key == "$ref" and isinstance(value, str):
                value = value.replace("#/$defs/", "#/definitions/")
            out["definitions" if key == "$defs" else key] = _to_draft7(value)
        return out
    if isinstance(node, list):
        return [_to_draft7(item) for item in node]
    return node


def spec_schema() -> dict[str, Any]:
    schema = _to_draft7(Spec.model_json_schema())
    schema["properties"]["extends"] = {
        "type": "string", "description": "A base spec file this one extends (merged first).",
    }
    return {"$schema": DRAFT7, "title": "kdspec spec (schema version 1)", **schema}


def schema_json() -> str:
    return json.dumps(spec_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
