"""Evaluation results of a run: every eval node's `eval.json`, as rows and as a table.

`eval.json` holds `{"results": [{"model", "dataset", "metric", "value"}, ...]}`; `model` is the
stage name that produced the model (or the `models:` name it came from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table


def collect_results(run_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(run_dir).glob("*/eval.json")):
        try:
            rows.extend(json.loads(path.read_text()).get("results", []))
        except (OSError, ValueError):
            continue
    return rows


def pivot(rows: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, str]], dict]:
    """models (in first-seen order), (dataset, metric) columns, and {(model, col): value}."""
    models: list[str] = []
    columns: list[tuple[str, str]] = []
    values: dict[tuple[str, tuple[str, str]], float] = {}
    for row in rows:
        column = (row["dataset"], row["metric"])
        if row["model"] not in models:
            models.append(row["model"])
        if column not in columns:
            columns.append(column)
        values[(row["model"], column)] = row["value"]
    return models, columns, values


def results_table(rows: list[dict[str, Any]]) -> Table:
    models, columns, values = pivot(rows)
    table = Table(title="evaluation", title_justify="left")
    table.add_column("model")
    for dataset, metric in columns:
        table.add_column(f"{dataset}\n{metric}", justify="right")
    for model in models:
        cells = [values.get((model, c)) for c in columns]
        table.add_row(model, *("-" if v is None else f"{v:.4g}" for v in cells))
    return table
