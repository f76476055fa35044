"""Rich views of a plan for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from . import units
from .plan.export import totals
from .plan.graph import Plan


def plan_table(plan: Plan, statuses: dict[str, str] | None = None) -> Table:
    table = Table(title=f"plan: {plan.name}", title_justify="left")
    columns = ["node", "kind", "after", "FLOP", "teacher", "mem/dev", "disk", "wall", "dev-h"]
    if statuses:
        columns.append("status")
    for name in columns:
        table.add_column(name, justify="left" if name in ("node", "kind", "after") else "right",
                         overflow="fold")
    for node in plan.nodes:
        e = node.estimate
        kind = node.kind if node.kind != "train" else node.stage_kind
        row = [node.id, kind, ", ".join(node.depends_on) or "-",
               units.flops(e.flops if e else None), units.flops(e.teacher_flops if e else None),
               units.nbytes(e.memory_per_device_bytes if e else None),
               units.nbytes(e.storage_bytes if e else None),
               units.duration(e.wall_seconds if e else None),
               units.hours(e.device_hours if e else None)]
        if statuses:
            row.append(statuses.get(node.id, ""))
        table.add_row(*row)
    return table


def print_plan(console: Console, plan: Plan, price: float | None, hardware: str,
               statuses: dict[str, str] | None = None) -> None:
    console.print(plan_table(plan, statuses))
    t = totals(plan, price)
    cost = f"${t['cost_usd']:,.0f}" if t["cost_usd"] is not None else "n/a (no price)"
    console.print(
        f"[bold]total[/bold] {units.flops(t['flops'])} · wall {units.duration(t['wall_seconds'])}"
        f" · {units.hours(t['device_hours'])} device-hours on {hardware} · cost {cost}"
    )
    for node in plan.nodes:
        line = _parts_line(getattr(node.estimate, "details", None) or {})
        if line:
            console.print(f"  [dim]{node.id}:[/dim] {line}", soft_wrap=True, highlight=False)
    console.print("[dim]  (kind = train stage kind; --json gives every assumption)[/dim]")


def _parts_line(details: dict) -> str:
    """`student_train 5.2e22 FLOP 15 d · teacher_forward ...`, plus remote-teacher calls."""
    parts = details.get("parts") or {}
    if "train" in details:  # a node of two phases (train + generation)
        parts = {**(details["train"].get("parts") or {}),
                 **(details["generation"].get("parts") or {})}
    text = " · ".join(f"{name} {units.flops(p['flops'])} FLOP {units.duration(p['seconds'])}"
                      for name, p in parts.items())
    if details.get("remote"):
        text = (f"remote teacher: {details['calls']:,} calls, {details['prompt_tokens']:,} "
                f"prompt + {details['completion_tokens']:,} completion tokens")
    return text
