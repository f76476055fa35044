"""The backend protocol and its discovery through the `kdspec.backends` entry-point group."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from ..plan.graph import Node, Plan
from ..spec import Spec
from .events import Event

ENTRY_POINT_GROUP = "kdspec.backends"


@dataclass
class NodeContext:
    """Everything a backend needs to run one node."""

    node: Node
    plan: Plan
    spec: Spec
    spec_dir: Path  # relative paths in the spec resolve against this
    run_dir: Path
    node_dir: Path  # the node's own folder: artifacts, checkpoints/
    emit: Callable[[Event], None]

    def input_dir(self, role: str) -> Path | None:
        """The folder of the node that fills `role` (student, teacher, teacher_logits, ...)."""
        node_id = self.node.inputs.get(role)
        return self.run_dir / node_id if node_id else None

    def model_dir(self, role: str) -> Path | None:
        """An earlier stage's saved model (`save_pretrained` folder) that fills `role`."""
        folder = self.input_dir(role)
        return folder / "model" if folder else None

    @property
    def checkpoint_dir(self) -> Path:
        return self.node_dir / "checkpoints"


class Backend(Protocol):
    """A backend runs plan nodes. It must be resumable: if `ctx.checkpoint_dir` holds a
    checkpoint, continue from it. It must not write a `done` marker (the executor does)."""

    name: str

    def supports(self, node: Node) -> bool: ...

    def run_node(self, ctx: NodeContext) -> None: ...


class BackendNotFound(LookupError):
    pass


def available_backends() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_backend(name: str) -> Backend:
    """Import a backend only when a run needs it (`kdspec plan` never does)."""
    found = available_backends()
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise BackendNotFound(f"no kdspec backend named `{name}` (installed: {known})")
    try:
        factory = found[name].load()  # type: ignore[attr-defined]
    except ImportError as err:
        raise BackendNotFound(
            f"the `{name}` backend is installed but cannot be imported ({err}); install its "
            f"dependencies: pip install 'kdspec[{name}]'"
        ) from err
    return factory()
