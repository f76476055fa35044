"""Pre-training KD tokens/s: online teacher vs a cached top-K / sampled-K teacher slice.

Runs benchmarks/specs/kd_throughput.yaml (one `kdspec run`: a 4-layer d256 teacher, a 2-layer d64
student, 40 steps of 8 × 256 tokens per variant, the same batches for all three) and reads each
train node's train-loop tokens/s from `measured.json` and each cache node's wall time from `done`.

    OMP_NUM_THREADS=1 python benchmarks/kd_throughput.py [--run-dir /tmp/kd-throughput]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "benchmarks" / "specs" / "kd_throughput.yaml"
VARIANTS = ("kd_online", "kd_topk", "kd_sampled")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/kd-throughput"))
    args = parser.parse_args()
    shutil.rmtree(args.run_dir, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "kdspec.cli", "run", str(SPEC), "--run-dir",
                    str(args.run_dir)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    base = read(args.run_dir / "kd_online" / "measured.json")["tokens_per_s"]
    print("| student node | teacher | train-loop tokens/s | vs online | cache build (s) |")
    print("|---|---|---:|---:|---:|")
    for node in VARIANTS:
        rate = read(args.run_dir / node / "measured.json")["tokens_per_s"]
        cache = args.run_dir / f"{node}.teacher_logits" / "done"
        build = f"{read(cache)['wall_seconds']:.1f}" if cache.exists() else "-"
        teacher = {"kd_online": "online", "kd_topk": "top-64 cache",
                   "kd_sampled": "sampled-64 cache"}[node]
        print(f"| {node} | {teacher} | {rate:,.0f} | {rate / base:.2f}× | {build} |")


if __name__ == "__main__":
    main()
