"""A rich progress display fed by backend events: one bar per node with loss, tokens/s, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .events import Event

_SHOWN = ("loss", "tokens_per_s", "lr")


def _fmt(values: dict) -> str:
    parts = []
    for key in _SHOWN:
        if key in values and isinstance(values[key], (int, float)):
            value = values[key]
            parts.append(f"{key}={value:.4g}" if key != "tokens_per_s" else f"{value:,.0f} tok/s")
    return " ".join(parts)


class ProgressDisplay:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.fields[node]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> ProgressDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: Event) -> None:
        if event.kind == "start":
            self.tasks[event.node] = self.progress.add_task(
                "", total=event.total, completed=event.step, node=event.node, info="")
        elif event.kind == "progress" and event.node in self.tasks:
            self.progress.update(self.tasks[event.node], completed=event.step,
                                 info=_fmt(event.values))
        elif event.kind == "message":
            self.progress.console.print(f"[dim]{event.node}:[/dim] {event.message}",
                                        highlight=False)
