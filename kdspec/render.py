"""Rich views of a plan for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from . import units
from .plan.export import totals
from .plan.graph import Plan


def plan_table(plan: Plan, statuses: dict[str, str] | None = None) -> Table:
    table = Table(title=f"plan: {plan.name}", title_justify="left")
    columns = ["node", "kind", "after", "FLOPs", "teacher", "mem/device", "storage", "wall",
               "dev-hours"]
    if statuses:
        columns.append("status")
    for name in columns:
        table.add_column(name, justify="right" if name in ("FLOPs", "teacher", "mem/device",
                                                           "storage", "wall", "dev-hours") else "left")
    for node in plan.nodes:
        e = node.estimate
        kind = node.kind if node.kind != "train" else f"train:{node.stage_kind}"
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
        details = getattr(node.estimate, "details", None) or {}
        if details:
            parts = ", ".join(f"{k}={_short(v)}" for k, v in details.items())
            console.print(f"  [dim]{node.id}: {parts}[/dim]", soft_wrap=True)


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
