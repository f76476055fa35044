"""The plan: a DAG of typed nodes, each with its resolved config and fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..spec.errors import Diagnostic

NodeKind = Literal["teacher_logits", "rationales", "train", "eval", "report"]


@dataclass
class Node:
    """One unit of work. `config` is everything that determines its output (JSON-able);
    `inputs` maps a role (student, teacher, teacher_logits, rationales, ...) to a node id."""

    id: str
    kind: NodeKind
    stage: str | None
    stage_kind: str | None
    config: dict[str, Any]
    depends_on: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    estimate: Any = None  # kdspec.estimate.workloads.NodeEstimate, when estimated


@dataclass
class Plan:
    """Nodes in a valid execution order (dependencies first) plus what the checks found."""

    name: str
    nodes: list[Node]
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def node(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]

    def downstream(self, node_id: str) -> set[str]:
        """Every node that (transitively) depends on `node_id`."""
        found: set[str] = set()
        frontier = [node_id]
        while frontier:
            current = frontier.pop()
            for node in self.nodes:
                if current in node.depends_on and node.id not in found:
                    found.add(node.id)
                    frontier.append(node.id)
        return found
