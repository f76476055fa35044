"""The plan as JSON: the stable shape `kdspec plan --json` prints and run dirs store."""

from __future__ import annotations

from typing import Any

from .graph import Node, Plan

ESTIMATE_KEYS = ("flops", "teacher_flops", "memory_per_device_bytes", "storage_bytes",
                 "wall_seconds", "device_hours")


def _estimate_json(node: Node) -> dict[str, Any] | None:
    if node.estimate is None:
        return None
    return {key: getattr(node.estimate, key) for key in ESTIMATE_KEYS}


def totals(plan: Plan, price_per_device_hour: float | None) -> dict[str, Any]:
    estimates = [n.estimate for n in plan.nodes if n.estimate is not None]
    device_hours = sum(e.device_hours for e in estimates)
    return {
        "flops": sum(e.flops for e in estimates),
        "wall_seconds": sum(e.wall_seconds for e in estimates),
        "device_hours": device_hours,
        "cost_usd": None if price_per_device_hour is None else device_hours * price_per_device_hour,
    }


def plan_to_json(plan: Plan, price_per_device_hour: float | None) -> dict[str, Any]:
    """`nodes`: [{id, stage, kind, depends_on, fingerprint, estimate{...}, details}] and
    `totals`: {flops, wall_seconds, device_hours, cost_usd}; `flops` includes the teacher's."""
    nodes = []
    for node in plan.nodes:
        details = getattr(node.estimate, "details", None) if node.estimate else None
        nodes.append({
            "id": node.id, "stage": node.stage, "kind": node.kind,
            "stage_kind": node.stage_kind, "depends_on": list(node.depends_on),
            "fingerprint": node.fingerprint, "estimate": _estimate_json(node),
            "details": details or {},
        })
    return {
        "name": plan.name,
        "nodes": nodes,
        "totals": totals(plan, price_per_device_hour),
        "warnings": [d.format() for d in plan.warnings],
    }
