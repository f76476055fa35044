"""How long `kdspec plan` takes on the paper specs.

Two numbers per spec: a cold `kdspec plan --json` in a fresh process (what a user waits for,
interpreter start and imports included) and the in-process load + plan + estimate time (median of
repeats). Also `python -c pass` as the floor of any Python command on this machine.

    python benchmarks/plan_time.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs" / "papers").glob("*.yaml"))


def cold_seconds(args: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_seconds(path: Path, repeat: int) -> float:
    from kdspec.plan.planner import build_plan
    from kdspec.spec.loader import load_spec

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        loaded = load_spec(path)
        build_plan(loaded.spec, base_dir=path.parent, locate=loaded.locate)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    floor = cold_seconds([sys.executable, "-c", "pass"], args.repeat)
    print(f"python -c pass (floor): {floor * 1000:.0f} ms\n")
    print("| spec | cold `kdspec plan --json` | ratio to floor | load + plan in process |")
    print("|---|---:|---:|---:|")
    for path in SPECS:
        cold = cold_seconds([sys.executable, "-m", "kdspec.cli", "plan", str(path), "--json"],
                            max(3, args.repeat // 2))
        warm = warm_seconds(path, args.repeat)
        print(f"| {path.name} | {cold * 1000:.0f} ms | {cold / floor:.1f}× | "
              f"{warm * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
