"""Events a backend emits while it runs a node; the executor logs and displays them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["start", "progress", "metrics", "message"]


@dataclass
class Event:
    """`start` announces `total` steps; `progress` moves the bar to `step` (values shown);
    `metrics` is one logged step (written to metrics.jsonl); `message` is a line for the user."""

    kind: EventKind
    node: str
    step: int = 0
    total: int | None = None
    values: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    unit: str = "step"
