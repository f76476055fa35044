"""Topological order of plan nodes, keeping spec order among independent nodes."""

from __future__ import annotations

from .graph import Node


def topological_order(nodes: dict[str, Node]) -> tuple[list[Node], list[str] | None]:
    """Kahn's algorithm. Returns (ordered nodes, None), or ([], a cycle as a list of ids)."""
    remaining = {nid: [d for d in n.depends_on if d in nodes] for nid, n in nodes.items()}
    ordered: list[Node] = []
    while remaining:
        ready = [nid for nid, deps in remaining.items() if not deps]
        if not ready:
            return [], _find_cycle(remaining)
        for nid in ready:  # dict order = insertion (spec) order
            ordered.append(nodes[nid])
            del remaining[nid]
        for deps in remaining.values():
            deps[:] = [d for d in deps if d not in ready]
    return ordered, None


def _find_cycle(graph: dict[str, list[str]]) -> list[str]:
    """Walk dependencies from any node until one repeats; that loop is a cycle."""
    path: list[str] = []
    current = next(iter(graph))
    while current not in path:
        path.append(current)
        current = graph[current][0]
    return path[path.index(current):]
