"""The report node: ``report.md`` in the run directory.

Three sections, each read from files the run left behind (so a report can be rebuilt from a run
directory at any time):

* **Evaluation**: every eval node's ``eval.json``, one row per model, one column per
  (dataset, metric).
* **Training loss**: one PNG per training node, ``plots/loss_<node>.png``, from
  ``metrics.jsonl``: the loss and its logged terms (``ce``, ``kd``, ...) against the optimizer
  step. matplotlib is imported only here, with the Agg canvas (no display needed); without it
  the plots are skipped with a note.
* **Cost**: per training node, estimated (``plan.json``: ``nodes[i].estimate``) against measured
  (``<node>/measured.json`` from the training engine, ``<node>/done``) FLOPs per optimizer step
  and wall time, with ``ratio = measured / estimated``. Estimated FLOPs per step are the node's
  estimated FLOPs (teacher forward included when the teacher runs online) over its optimizer
  steps; measured ones are ``torch.utils.flop_counter`` counts over the first steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .. import units
from ..plan.graph import Node, Plan
from .results import collect_results, pivot
from .rundir import RunDir, atomic_write_text

# metrics.jsonl keys that are not loss terms.
NOT_LOSS = frozenset({"node", "time", "step", "tokens", "lr", "tokens_per_s", "grad_norm"})
PLOTS = "plots"


def write_report(plan: Plan, run_dir: RunDir) -> None:
    atomic_write_text(run_dir.root / "report.md", render_report(plan, run_dir))


def render_report(plan: Plan, run_dir: RunDir) -> str:
    train = [node for node in plan.nodes if node.kind == "train"]
    lines = [f"# {plan.name}", ""]
    lines += eval_section(collect_results(run_dir.root))
    lines += loss_section(train, run_dir)
    lines += cost_section(train, run_dir)
    return "\n".join(lines) + "\n"


# ---- evaluation ---------------------------------------------------------------------------------

def eval_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Evaluation", ""]
    models, columns, values = pivot(rows)
    if not columns:
        return [*lines, "No evaluation results.", ""]
    lines.append("| model | " + " | ".join(f"{d} {m}" for d, m in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for model in models:
        cells = [values.get((model, c)) for c in columns]
        lines.append(f"| {model} | " + " | ".join(
            "-" if v is None else f"{v:.4g}" for v in cells) + " |")
    lines += ["", "perplexity: lower is better; rouge_l and accuracy: fractions in [0, 1], "
              "higher is better.", ""]
    return lines


# ---- training loss ------------------------------------------------------------------------------

def latest_history(records: list[dict[str, Any]], node: str) -> list[dict[str, Any]]:
    """The node's records from its latest run, in step order.

    Walking back from the last record, a record is kept only if its step is below every step
    kept so far. That drops a replaced run's records (a changed node reruns from step 1 and
    metrics.jsonl only appends) and the steps logged twice around a resume (logged after the
    last checkpoint, then again after resuming from it)."""
    kept: list[dict[str, Any]] = []
    for record in reversed(records):
        if record.get("node") != node or not isinstance(record.get("step"), (int, float)):
            continue
        if not kept or record["step"] < kept[-1]["step"]:
            kept.append(record)
    return kept[::-1]


def loss_terms(history: list[dict[str, Any]]) -> list[str]:
    """`loss` first, then every other numeric key that is not bookkeeping, in first-seen order."""
    names: list[str] = []
    for record in history:
        for key, value in record.items():
            if key not in NOT_LOSS and key not in names and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                names.append(key)
    return sorted(names, key=lambda name: name != "loss")


def plot_loss(history: list[dict[str, Any]], title: str, path: Path) -> None:
    """One PNG: each loss term against the optimizer step. Raises ImportError without
    matplotlib (imported here so that the core never imports it otherwise)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in loss_terms(history):
        points = [(r["step"], r[name]) for r in history if isinstance(r.get(name), (int, float))]
        axes.plot([p[0] for p in points], [p[1] for p in points], label=name,
                  linewidth=2.0 if name == "loss" else 1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per target token")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)


def loss_section(train: list[Node], run_dir: RunDir) -> list[str]:
    lines = ["## Training loss", ""]
    if not train:
        return [*lines, "No training stages.", ""]
    records = run_dir.read_metrics()
    plotting = True
    for node in train:
        history = latest_history(records, node.id)
        lines += [f"### {node.id} ({node.stage_kind})", ""]
        if not history:
            lines += ["No logged steps.", ""]
            continue
        path = run_dir.root / PLOTS / f"loss_{node.id}.png"
        if plotting:
            try:
                plot_loss(history, f"{node.id} ({node.stage_kind})", path)
                lines += [f"![{node.id} loss]({PLOTS}/{path.name})", ""]
            except ImportError:
                plotting = False
                lines += ["Loss curves skipped: matplotlib is not installed "
                          "(`pip install matplotlib`; a rerun of `kdspec run` rewrites this "
                          "report).", ""]
        final = history[-1]
        lines += [f"Final logged step {final['step']}: loss {final.get('loss', math.nan):.4g}.",
                  ""]
    return lines


# ---- cost ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def planned_steps(node: Node) -> int | None:
    """Optimizer steps of a train node, from its stage config: `steps`, or
    ceil(tokens / (batch_size · seq_len))."""
    stage = node.config.get("stage") or {}
    if stage.get("steps"):
        return int(stage["steps"])
    try:
        return max(1, math.ceil(stage["tokens"] / (stage["batch_size"] * stage["seq_len"])))
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _ratio(measured: float | None, estimated: float | None) -> str:
    if measured is None or not estimated:
        return "-"
    return f"{measured / estimated:.2f}"


def cost_row(node: Node, estimate: dict[str, Any] | None, measured: dict[str, Any] | None,
             done: dict[str, Any] | None) -> dict[str, float | int | None]:
    """The numbers of one cost-table row (None where unknown)."""
    estimate, measured, done = estimate or {}, measured or {}, done or {}
    steps = planned_steps(node) or measured.get("steps")
    est_flops = estimate.get("flops")
    return {
        "steps": steps,
        "est_flops_per_step": est_flops / steps if est_flops is not None and steps else None,
        "flops_per_step": measured.get("flops_per_step"),
        "est_wall_seconds": estimate.get("wall_seconds"),
        "train_wall_seconds": measured.get("wall_seconds"),
        "node_wall_seconds": done.get("wall_seconds"),
        "tokens_per_s": measured.get("tokens_per_s"),
    }


def cost_section(train: list[Node], run_dir: RunDir) -> list[str]:
    lines = ["## Estimated vs measured cost", ""]
    if not train:
        return [*lines, "No training stages.", ""]
    plan_json = _read_json(run_dir.root / "plan.json") or {}
    estimates = {n.get("id"): n.get("estimate") for n in plan_json.get("nodes", [])}
    lines += ["| node | steps | est. FLOPs/step | measured FLOPs/step | ratio | est. wall | "
              "measured wall (train loop) | ratio | node wall | tokens/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for node in train:
        folder = run_dir.node_dir(node.id)
        row = cost_row(node, estimates.get(node.id), _read_json(folder / "measured.json"),
                       run_dir.done_record(node.id))
        tps = row["tokens_per_s"]
        lines.append(" | ".join([
            f"| {node.id}", "-" if row["steps"] is None else str(row["steps"]),
            units.flops(row["est_flops_per_step"]), units.flops(row["flops_per_step"]),
            _ratio(row["flops_per_step"], row["est_flops_per_step"]),
            units.duration(row["est_wall_seconds"]), units.duration(row["train_wall_seconds"]),
            _ratio(row["train_wall_seconds"], row["est_wall_seconds"]),
            units.duration(row["node_wall_seconds"]),
            "-" if tps is None else f"{tps:,.0f}",
        ]) + " |")
    lines += ["", "ratio = measured / estimated. Estimated wall time assumes the spec's "
              "`hardware` (accelerator, MFU); measured FLOPs come from "
              "`torch.utils.flop_counter` over the first steps; the node wall time includes "
              "loading and saving (last attempt only).", ""]
    return lines
