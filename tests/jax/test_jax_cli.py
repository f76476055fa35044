"""`kdspec run --backend jax` on a tiny spec with every stage kind the JAX backend runs: the run
completes through the CLI, its report has the torch run's rows, and a rerun is all cached."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ARCH = {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
        "max_seq_len": 64}
TRAIN = {"steps": 3, "batch_size": 4, "seq_len": 32, "log_every": 1}
SPEC = {
    "kdspec": 1, "name": "tiny_cli", "seed": 0, "tokenizer": "builtin:words",
    "models": {"small": {"arch": ARCH}},
    "data": {"corpus": {"source": "builtin:hmm", "n": 40},
             "tasks": {"source": "builtin:instructions", "n": 24},
             "held_out": {"source": "builtin:hmm", "split": "eval", "n": 8}},
    "stages": [
        {"name": "teacher", "kind": "pretrain", "student": "small", "data": "corpus", **TRAIN},
        {"name": "distilled", "kind": "pretrain_kd", "teacher": "teacher", "student": "small",
         "data": "corpus", "teacher_cache": {"mode": "topk", "k": 8}, **TRAIN},
        {"name": "tuned", "kind": "sft", "data": "tasks", **TRAIN},
        {"name": "kd_tuned", "kind": "kd", "teacher": "tuned", "student": "distilled",
         "data": "tasks", **TRAIN},
        {"name": "eval", "kind": "eval", "models": ["teacher", "distilled", "kd_tuned"],
         "data": ["held_out", "tasks"], "metrics": ["perplexity"], "seq_len": 32,
         "batch_size": 4, "max_examples": 8},
    ],
}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdspec.cli", *args], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_cli_runs_a_spec_on_jax_with_the_torch_runs_rows(tmp_path: Path) -> None:
    pytest.importorskip("kdspec_torch.backend")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for backend in ("jax", "torch"):
        run_dir = tmp_path / backend
        _cli("run", str(spec), "--backend", backend, "--run-dir", str(run_dir), env=env)
        report = _cli("report", str(run_dir), "--json", env=env)
        rows[backend] = json.loads(report.stdout)
        assert (run_dir / "report.md").exists()
    keys = {b: [(r["model"], r["dataset"], r["metric"]) for r in rows[b]] for b in rows}
    assert keys["jax"] == keys["torch"] and len(keys["jax"]) == 6
    for r in rows["jax"]:
        assert math.isfinite(r["value"]) and r["value"] > 1
    again = _cli("run", str(spec), "--backend", "jax", "--run-dir", str(tmp_path / "jax"),
                 env=env)
    assert again.stdout.count("cached") == 7  # 5 stages, the teacher_logits node, the report
