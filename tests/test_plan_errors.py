"""Golden tests for cross-stage problems: specs that load but that the planner refuses.

Each tests/malformed/plan/NAME.yaml has NAME.expected, the exact stderr of `kdspec validate`
(file names relative to tests/malformed/plan/). `UPDATE_GOLDEN=1` rewrites them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdspec.cli import app

HERE = Path(__file__).parent / "malformed" / "plan"
CASES = sorted(p.stem for p in HERE.glob("*.yaml"))


@pytest.mark.parametrize("name", CASES)
def test_planner_refuses_with_a_located_message(name, monkeypatch):
    monkeypatch.chdir(HERE)
    result = CliRunner().invoke(app, ["validate", f"{name}.yaml"])
    assert result.exit_code == 2, result.output
    expected = HERE / f"{name}.expected"
    if os.environ.get("UPDATE_GOLDEN"):
        expected.write_text(result.stderr)
    assert result.stderr == expected.read_text()
    assert result.stderr.startswith(f"{name}.yaml:")
