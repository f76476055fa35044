"""The report node: report.md with the eval table and estimated vs measured cost."""

from __future__ import annotations

from ..plan.graph import Plan
from .rundir import RunDir, atomic_write_text
from .results import collect_results, pivot


def write_report(plan: Plan, run_dir: RunDir) -> None:
    rows = collect_results(run_dir.root)
    models, columns, values = pivot(rows)
    lines = [f"# {plan.name}", "", "## Evaluation", ""]
    if columns:
        lines.append("| model | " + " | ".join(f"{d} {m}" for d, m in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for model in models:
            cells = [values.get((model, c)) for c in columns]
            lines.append(f"| {model} | " + " | ".join(
                "-" if v is None else f"{v:.4g}" for v in cells) + " |")
    atomic_write_text(run_dir.root / "report.md", "\n".join(lines) + "\n")
