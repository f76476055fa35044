"""`kdspec run`: prepare the run directory, pick the backend, execute, report."""

from __future__ import annotations

import traceback
from pathlib import Path

from rich.console import Console

from ..plan.export import plan_to_json
from ..plan.graph import Plan
from ..spec.loader import LoadedSpec
from .backend import BackendNotFound, load_backend
from .executor import execute
from .progress import ProgressDisplay
from .rundir import RunDir, atomic_write_json

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _record_inputs(loaded: LoadedSpec, plan: Plan, run_dir: RunDir) -> None:
    atomic_write_json(run_dir.root / "spec.resolved.json", {
        "spec": loaded.spec.model_dump(mode="json"),
        "source": str(loaded.path),
        "overrides": list(loaded.overrides),
    })
    atomic_write_json(run_dir.root / "plan.json",
                      plan_to_json(plan, loaded.spec.hardware.price_per_device_hour))


def run_session(loaded: LoadedSpec, plan: Plan, run_dir_path: Path | None,
                backend_name: str | None, out: Console, err: Console) -> int:
    run_dir = RunDir(run_dir_path or Path("runs") / loaded.spec.name)
    name = backend_name or loaded.spec.backend
    try:
        backend = load_backend(name)
    except BackendNotFound as error:
        err.print(str(error), markup=False)
        return 2
    unsupported = [n.id for n in plan.nodes if n.kind != "report" and not backend.supports(n)]
    if unsupported:
        err.print(f"the {name} backend cannot run: {', '.join(unsupported)}", markup=False)
        return 2
    _record_inputs(loaded, plan, run_dir)
    out.print(f"run directory: {run_dir.root}  backend: {name}")

    def announce(node, status):
        label = {"cached": "[green]cached[/green] (done, unchanged)", "new": "new",
                 "changed": "[yellow]changed[/yellow] (rerun)",
                 "resume": "[cyan]resuming[/cyan]"}[status]
        out.print(f"• {node.id}: {label}")

    from .report import write_report

    try:
        with ProgressDisplay(out) as display:
            execute(plan, loaded.spec, loaded.path.parent, run_dir, backend, display,
                    on_node=announce, run_report=write_report)
    except KeyboardInterrupt:
        err.print("interrupted: rerun the same command to resume from the last checkpoint")
        return EXIT_INTERRUPTED
    except Exception as error:  # a failed node: say which and why, keep the trace in the run dir
        (run_dir.root / "error.log").write_text(traceback.format_exc())
        err.print(f"run failed: {type(error).__name__}: {error}", markup=False)
        err.print(f"(traceback in {run_dir.root / 'error.log'}; rerun to resume)", markup=False)
        return EXIT_FAILED
    out.print(f"done: {run_dir.root / 'report.md'}")
    return 0
