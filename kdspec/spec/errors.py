"""Located diagnostics: every problem with a spec names file:line:col and the key path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

KeyPath = tuple[str | int, ...]


def format_path(path: KeyPath) -> str:
    """``("stages", 2, "after", 0)`` -> ``stages[2].after[0]``; the empty path is ``<root>``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


@dataclass(frozen=True)
class Location:
    file: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a spec. `hint` says how to fix it (e.g. the closest valid key)."""

    message: str
    path: KeyPath = ()
    location: Location | None = None
    hint: str | None = None
    severity: Literal["error", "warning"] = "error"

    def format(self) -> str:
        where = f"{self.location}: " if self.location else ""
        text = f"{where}{self.severity}: {format_path(self.path)}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


@dataclass
class SpecError(Exception):
    """A spec that cannot be used; carries every diagnostic found, not just the first."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(d.format() for d in self.diagnostics)
