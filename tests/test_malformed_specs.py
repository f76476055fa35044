"""Golden tests: every malformed spec in tests/malformed/ fails with exactly the expected text.

A case is `NAME.yaml` (plus `NAME.set`, one `--set` per line, when it needs overrides) and its
expected diagnostics `NAME.expected`, with file names relative to tests/malformed/. Files whose
name starts with `_` are bases that cases extend. tests/malformed/plan/ holds specs that load but
that the planner must refuse (cross-stage problems); see the README there.

Regenerate the expected files after an intended change of wording with
`UPDATE_GOLDEN=1 pytest tests/test_malformed_specs.py`, and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdspec.spec.errors import SpecError
from kdspec.spec.loader import load_spec

HERE = Path(__file__).parent / "malformed"
CASES = sorted(p.stem for p in HERE.glob("*.yaml") if not p.name.startswith("_"))
PLAN_CASES = sorted(p.name for p in (HERE / "plan").glob("*.yaml"))
UPDATE = bool(os.environ.get("UPDATE_GOLDEN"))


def _overrides(name: str) -> list[str]:
    file = HERE / f"{name}.set"
    if not file.exists():
        return []
    return [line for line in file.read_text().splitlines() if line and not line.startswith("#")]


def _check_golden(name: str, got: str) -> None:
    expected = HERE / f"{name}.expected"
    got = got.rstrip("\n") + "\n"
    if UPDATE:
        expected.write_text(got)
    assert expected.exists(), f"no {expected.name}; run with UPDATE_GOLDEN=1 and review it"
    assert got == expected.read_text()


def _loader_text(name: str) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec(f"{name}.yaml", _overrides(name))
    return str(caught.value)


def _cli_app():
    """The lead's typer app if it has a `validate` command, else None."""
    try:
        import typer.main

        from kdspec.cli import app
    except ImportError:
        return None
    commands = getattr(typer.main.get_command(app), "commands", {})
    return app if "validate" in commands else None


@pytest.fixture
def in_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(HERE)  # so that file names in messages are relative to tests/malformed/


@pytest.mark.parametrize("name", CASES)
def test_loader_golden(name: str, in_corpus: None) -> None:
    _check_golden(name, _loader_text(name))


@pytest.mark.parametrize("name", CASES)
def test_cli_validate_golden(name: str, in_corpus: None) -> None:
    app = _cli_app()
    if app is None:
        pytest.skip("kdspec.cli has no `validate` command yet")
    from typer.testing import CliRunner

    args = ["validate", f"{name}.yaml"]
    for override in _overrides(name):
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.rstrip("\n") + "\n" == (HERE / f"{name}.expected").read_text()


def test_corpus_is_large_enough_and_complete() -> None:
    assert len(CASES) >= 30
    missing = [n for n in CASES if not (HERE / f"{n}.expected").exists()]
    assert UPDATE or not missing, f"cases without an expected file: {missing}"
    orphans = [p.name for p in HERE.glob("*.expected") if p.stem not in CASES]
    orphans += [p.name for p in HERE.glob("*.set") if p.stem not in CASES]
    assert not orphans, f"expected/set files without a case: {orphans}"


@pytest.mark.parametrize("name", CASES)
def test_every_diagnostic_points_into_a_file(name: str, in_corpus: None) -> None:
    """Each diagnostic names a line and column that exist in the file it names."""
    with pytest.raises(SpecError) as caught:
        load_spec(f"{name}.yaml", _overrides(name))
    assert caught.value.diagnostics
    for diagnostic in caught.value.diagnostics:
        loc = diagnostic.location
        if name == "extends_missing":
            assert loc is not None and loc.file == "extends_missing.yaml"
            continue
        assert loc is not None, diagnostic.format()
        text = loc.file.removeprefix("--set '")[:-1] if loc.file.startswith("--set") else None
        lines = [text] if text is not None else (HERE / loc.file).read_text().split("\n")
        assert 1 <= loc.line <= len(lines), diagnostic.format()
        assert 1 <= loc.col <= len(lines[loc.line - 1]) + 1, diagnostic.format()


@pytest.mark.parametrize("name", PLAN_CASES)
def test_planner_cases_pass_the_loader(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cross-stage cases are valid to the loader: only the planner can refuse them."""
    monkeypatch.chdir(HERE / "plan")
    load_spec(name)
