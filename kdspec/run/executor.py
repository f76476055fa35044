"""Walk a plan: skip nodes that are done and unchanged, run the rest on a backend."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..plan.graph import Node, Plan
from ..spec import Spec
from .backend import Backend, NodeContext
from .events import Event
from .rundir import RunDir

NodeStatus = Literal["cached", "new", "changed", "resume"]


@dataclass
class NodeOutcome:
    node: str
    status: NodeStatus
    wall_seconds: float = 0.0


def node_status(run_dir: RunDir, node: Node) -> NodeStatus:
    """cached: done with this fingerprint; resume: started with it, not done; changed: the
    folder holds another fingerprint's work; new: never started."""
    if run_dir.is_done(node.id, node.fingerprint):
        return "cached"
    started = run_dir.started_fingerprint(node.id)
    if started is None:
        return "changed" if run_dir.done_record(node.id) else "new"
    return "resume" if started == node.fingerprint else "changed"


class MetricsSink:
    """Writes `metrics` events to metrics.jsonl and forwards every event to a display."""

    def __init__(self, run_dir: RunDir, display: Callable[[Event], None]):
        self.run_dir = run_dir
        self.display = display

    def __call__(self, event: Event) -> None:
        if event.kind == "metrics":
            self.run_dir.append_metrics({"node": event.node, "time": round(time.time(), 3),
                                         **event.values})
        self.display(event)


def execute(plan: Plan, spec: Spec, spec_dir: Path, run_dir: RunDir, backend: Backend,
            display: Callable[[Event], None],
            on_node: Callable[[Node, NodeStatus], None] = lambda n, s: None,
            run_report: Callable[[Plan, RunDir], None] | None = None) -> list[NodeOutcome]:
    """Run every node not already done. A node's folder is wiped when its fingerprint changed
    (what it held belongs to another config); `done` is written only after the node returns."""
    sink = MetricsSink(run_dir, display)
    outcomes = []
    for node in plan.nodes:
        status = node_status(run_dir, node)
        on_node(node, status)
        if status == "cached":
            outcomes.append(NodeOutcome(node.id, status))
            continue
        folder = run_dir.node_dir(node.id)
        if status == "changed" and folder.exists():
            shutil.rmtree(folder)
        run_dir.mark_started(node.id, node.fingerprint)
        started = time.perf_counter()
        if node.kind == "report":
            (run_report or (lambda p, r: None))(plan, run_dir)
        else:
            ctx = NodeContext(node, plan, spec, spec_dir, run_dir.root, folder, sink)
            backend.run_node(ctx)
        elapsed = time.perf_counter() - started
        run_dir.mark_done(node.id, node.fingerprint, elapsed)
        outcomes.append(NodeOutcome(node.id, status, elapsed))
    return outcomes
