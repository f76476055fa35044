"""The README's quickstart runs end to end and distillation shows its value (slow: ~3-8 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_and_kd_beats_scratch(tmp_path):
    run_dir = tmp_path / "quickstart"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "kdspec.cli"]
    subprocess.run([*cli, "run", "specs/quickstart.yaml", "--run-dir", str(run_dir)],
                   cwd=ROOT, env=env, check=True, timeout=1200)
    report = subprocess.run([*cli, "report", str(run_dir), "--json"], cwd=ROOT, env=env,
                            check=True, capture_output=True, text=True)
    rows = json.loads(report.stdout)
    ppl = {r["model"]: r["value"] for r in rows if r["metric"] == "perplexity"}
    assert set(ppl) >= {"teacher", "student_scratch", "student_kd"}
    assert ppl["teacher"] < ppl["student_kd"] < ppl["student_scratch"]
    assert (run_dir / "report.md").exists()
    # A rerun finds every node done and unchanged.
    again = subprocess.run([*cli, "run", "specs/quickstart.yaml", "--run-dir", str(run_dir)],
                           cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert again.stdout.count("cached") >= 4
