"""report.md: the eval table, a loss-curve PNG per training node, estimated vs measured cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdspec import units
from kdspec.plan.graph import Node, Plan
from kdspec.run.report import (
    cost_row,
    latest_history,
    loss_terms,
    planned_steps,
    render_report,
    write_report,
)
from kdspec.run.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan() -> Plan:
    teacher = Node("teacher", "train", "teacher", "pretrain",
                   {"stage": {"kind": "pretrain", "steps": 10, "batch_size": 4, "seq_len": 64}})
    student = Node("student_kd", "train", "student_kd", "pretrain_kd",
                   {"stage": {"kind": "pretrain_kd", "tokens": 1000, "steps": None,
                              "batch_size": 4, "seq_len": 64}})
    evaluate = Node("eval", "eval", "eval", "eval", {"stage": {"kind": "eval"}})
    report = Node("report", "report", None, None, {"name": "demo"})
    return Plan("demo", [teacher, student, evaluate, report])


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def _metrics(node: str, steps, loss0: float, **extra) -> list[dict]:
    return [{"node": node, "time": 0.0, "step": s, "tokens": 256 * s, "loss": loss0 / s,
             "lr": 1e-3, "tokens_per_s": 500.0, "grad_norm": 1.0, **extra} for s in steps]


@pytest.fixture
def run_dir(tmp_path: Path) -> RunDir:
    root = tmp_path / "run"
    _write(root / "plan.json", {"name": "demo", "nodes": [
        {"id": "teacher", "estimate": {"flops": 1e12, "wall_seconds": 100.0}, "details": {}},
        {"id": "student_kd", "estimate": {"flops": 2e11, "wall_seconds": 50.0}, "details": {}},
        {"id": "eval", "estimate": None, "details": {}},
    ]})
    _write(root / "teacher" / "measured.json", {"flops_per_step": 1.1e11, "flop_steps": 2,
                                                "steps": 10, "wall_seconds": 120.0,
                                                "tokens_per_s": 512.0})
    _write(root / "teacher" / "done", {"fingerprint": "f", "wall_seconds": 130.5})
    _write(root / "eval" / "eval.json", {"results": [
        {"model": "teacher", "dataset": "heldout", "metric": "perplexity", "value": 3.5},
        {"model": "student_kd", "dataset": "heldout", "metric": "perplexity", "value": 5.25},
        {"model": "teacher", "dataset": "qa", "metric": "accuracy", "value": 0.75},
    ]})
    records = (_metrics("teacher", range(1, 11), 8.0)
               + _metrics("student_kd", [1, 2, 3, 4], 99.0)  # a replaced run: must not show
               + _metrics("student_kd", [1, 2, 3], 6.0, kd=0.5, ce=2.0))
    lines = [json.dumps(r) for r in records]
    _write(root / "metrics.jsonl", "\n".join(lines) + '\n{"node": "teacher", "st')  # torn line
    return RunDir(root)


def test_latest_history_drops_replaced_runs_and_resume_duplicates():
    def rec(step):
        return {"node": "a", "step": step}

    # A resume from the step-2 checkpoint after steps 3 and 4 were logged, then a rerun of a
    # changed node from step 1: only the last run is kept, each step once.
    records = [rec(1), rec(2), rec(3), rec(4), rec(3), rec(4), rec(5), {"node": "b", "step": 9}]
    assert [r["step"] for r in latest_history(records, "a")] == [1, 2, 3, 4, 5]
    records += [rec(1), rec(2)]
    assert [r["step"] for r in latest_history(records, "a")] == [1, 2]
    assert latest_history(records, "missing") == []


def test_loss_terms_put_loss_first_and_skip_bookkeeping():
    history = _metrics("n", [1], 1.0, kd=0.5, ce=2.0, done=True)
    assert loss_terms(history) == ["loss", "kd", "ce"]


def test_planned_steps():
    plan = _plan()
    assert planned_steps(plan.node("teacher")) == 10
    assert planned_steps(plan.node("student_kd")) == 4  # ceil(1000 / (4 · 64))
    assert planned_steps(Node("x", "train", "x", "pretrain", {})) is None


def test_cost_row_ratios_by_hand():
    row = cost_row(_plan().node("teacher"), {"flops": 1e12, "wall_seconds": 100.0},
                   {"flops_per_step": 1.1e11, "steps": 10, "wall_seconds": 120.0,
                    "tokens_per_s": 512.0}, {"wall_seconds": 130.5})
    assert row["est_flops_per_step"] == pytest.approx(1e11)
    assert row["flops_per_step"] == pytest.approx(1.1e11)
    assert row["train_wall_seconds"] == 120.0 and row["node_wall_seconds"] == 130.5
    empty = cost_row(_plan().node("teacher"), None, None, None)
    assert empty["est_flops_per_step"] is None and empty["flops_per_step"] is None


def test_report_has_the_eval_table_plots_and_cost_table(run_dir):
    write_report(_plan(), run_dir)
    text = (run_dir.root / "report.md").read_text()
    assert text.startswith("# demo\n")
    assert "| model | heldout perplexity | qa accuracy |" in text
    assert "| teacher | 3.5 | 0.75 |" in text
    assert "| student_kd | 5.25 | - |" in text
    for node in ("teacher", "student_kd"):
        png = run_dir.root / "plots" / f"loss_{node}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"![{node} loss](plots/loss_{node}.png)" in text
    assert "Final logged step 10: loss 0.8." in text
    assert "Final logged step 3: loss 2." in text  # the latest run's 6/3, not the old 99/4
    # est. 1e12 / 10 steps = 1e11 per step; measured 1.1e11 -> 1.10; wall 120 s / 100 s -> 1.20.
    f, d = units.flops, units.duration
    assert (f"| teacher | 10 | {f(1e11)} | {f(1.1e11)} | 1.10 | {d(100)} | {d(120)} | 1.20 | "
            f"{d(130.5)} | 512 |") in text
    # Not trained yet / no measurement: estimates only (2e11 over ceil(1000 / 256) = 4 steps).
    assert f"| student_kd | 4 | {f(5e10)} | - | - | {d(50)} | - | - | - | - |" in text


def test_report_without_matplotlib_notes_the_skip(run_dir, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                 "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    text = render_report(_plan(), run_dir)
    assert "Loss curves skipped: matplotlib is not installed" in text
    assert text.count("Loss curves skipped") == 1
    assert not (run_dir.root / "plots").exists()
    assert "| teacher | 3.5 | 0.75 |" in text and "Final logged step 10" in text


def test_report_of_an_empty_run(tmp_path):
    plan = Plan("empty", [Node("report", "report", None, None, {})])
    text = render_report(plan, RunDir(tmp_path))
    assert "No evaluation results." in text and text.count("No training stages.") == 2


def test_the_report_module_does_not_import_matplotlib():
    code = ("import sys, kdspec.run.report, kdspec.run.session; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
