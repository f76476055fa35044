"""The JSON Schema and docs/spec.md are generated from the models and must stay current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdspec.spec.reference import render
from kdspec.spec.schema import schema_json, spec_schema

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "kdspec" / "schema" / "kdspec.schema.json"
REGENERATE = ("python -c \"from kdspec.spec.schema import schema_json; "
              "open('kdspec/schema/kdspec.schema.json','w').write(schema_json())\"")


def test_checked_in_schema_is_current():
    assert CHECKED_IN.read_text() == schema_json(), f"regenerate with: {REGENERATE}"


def test_spec_reference_doc_is_current():
    doc = (ROOT / "docs" / "spec.md").read_text()
    assert doc == render(), "regenerate: python -m kdspec.spec.reference > docs/spec.md"


def test_schema_is_valid_draft7_and_accepts_every_shipped_spec():
    jsonschema = pytest.importorskip("jsonschema")
    schema = spec_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    specs = sorted((ROOT / "specs").rglob("*.yaml"))
    assert specs
    for path in specs:
        data = yaml.safe_load(path.read_text())
        errors = [e.message for e in validator.iter_errors(data)]
        assert not errors, f"{path}: {errors}"


def test_schema_rejects_an_unknown_key():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(spec_schema())
    bad = {"kdspec": 1, "name": "x", "stages": [], "colour": "red"}
    assert any("colour" in e.message for e in validator.iter_errors(bad))


def test_every_field_has_a_description():
    def walk(node, path):
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                assert "description" in prop or "$ref" in prop or "allOf" in prop, \
                    f"{path}.{name} has no description"
            for key, value in node.items():
                walk(value, f"{path}.{key}")
    walk(json.loads(schema_json()), "schema")
