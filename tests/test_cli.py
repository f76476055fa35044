"""The command line: exit codes, plan JSON shape, schema, report."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kdspec.cli import app

ROOT = Path(__file__).resolve().parents[1]
GEMMA = str(ROOT / "specs" / "papers" / "gemma2-2b-pretrain-kd.yaml")
runner = CliRunner()

ESTIMATE_KEYS = {"flops", "teacher_flops", "memory_per_device_bytes", "storage_bytes",
                 "wall_seconds", "device_hours"}


def test_plan_json_shape():
    result = runner.invoke(app, ["plan", GEMMA, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [n["id"] for n in plan["nodes"]] == ["pretrain_kd", "report"]
    node = plan["nodes"][0]
    assert {"id", "stage", "kind", "depends_on", "estimate"} <= set(node)
    assert set(node["estimate"]) == ESTIMATE_KEYS
    assert node["estimate"]["teacher_flops"] < node["estimate"]["flops"]
    assert set(plan["totals"]) == {"flops", "wall_seconds", "device_hours", "cost_usd"}
    assert plan["totals"]["cost_usd"] == plan["totals"]["device_hours"] * 1.20


def test_cost_is_null_without_a_price():
    result = runner.invoke(app, ["plan", GEMMA, "--json", "--set",
                                 "hardware.price_per_device_hour=null"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["cost_usd"] is None


def test_set_changes_the_estimate():
    base = json.loads(runner.invoke(app, ["plan", GEMMA, "--json"]).stdout)
    half = json.loads(runner.invoke(
        app, ["plan", GEMMA, "--json", "--set", "stages.pretrain_kd.tokens=1T"]).stdout)
    ratio = half["nodes"][0]["estimate"]["flops"] / base["nodes"][0]["estimate"]["flops"]
    assert abs(ratio - 0.5) < 1e-3


def test_plan_table_and_resolved():
    result = runner.invoke(app, ["plan", GEMMA])
    assert result.exit_code == 0, result.output
    assert "pretrain_kd" in result.stdout and "device-hours" in result.stdout
    resolved = runner.invoke(app, ["plan", GEMMA, "--resolved"])
    assert json.loads(resolved.stdout)["stages"][0]["tokens"] == 2 * 10**12


def test_bad_spec_exits_2_with_a_located_message(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("kdspec: 1\nname: x\nstages:\n  - name: a\n    kind: pretrian\n")
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    assert f"{spec}:5:" in result.stderr


def test_schema_command_prints_the_checked_in_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert result.stdout == (ROOT / "kdspec" / "schema" / "kdspec.schema.json").read_text()


def test_report_reads_eval_json(tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    (tmp_path / "eval").mkdir()
    rows = [{"model": "teacher", "dataset": "held_out", "metric": "perplexity", "value": 3.5},
            {"model": "student_kd", "dataset": "held_out", "metric": "perplexity", "value": 5.0}]
    (tmp_path / "eval" / "eval.json").write_text(json.dumps({"results": rows}))
    result = runner.invoke(app, ["report", str(tmp_path), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == rows
    table = runner.invoke(app, ["report", str(tmp_path)])
    assert "student_kd" in table.stdout and "perplexity" in table.stdout


def test_report_on_a_folder_that_is_no_run(tmp_path):
    assert runner.invoke(app, ["report", str(tmp_path)]).exit_code == 2


def test_unknown_backend_exits_2(tmp_path):
    result = runner.invoke(app, ["run", GEMMA, "--backend", "nope", "--run-dir",
                                 str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "no kdspec backend named `nope`" in result.stderr
