"""The `kdspec` command line: validate, plan, schema, run, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .spec.errors import SpecError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Declarative LLM distillation pipelines: validate, plan (with compute estimates), run.",
)
# Piped output has no terminal width; tables of estimates need more than rich's default 80.
out = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

EXIT_BAD_SPEC = 2

SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional here
    typer.Option("--set", help="Override an existing key: --set stages.student_kd.tokens=4M"),
]


def _fail(error: SpecError) -> None:
    err.print(str(error), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_SPEC)


def _load_and_plan(spec_path: Path, overrides: list[str] | None, estimate: bool = True):
    from .plan.planner import build_plan
    from .spec.loader import load_spec

    try:
        loaded = load_spec(spec_path, overrides or [])
    except SpecError as error:
        _fail(error)
    plan = build_plan(loaded.spec, base_dir=loaded.path.parent, locate=loaded.locate,
                      estimate=estimate)
    if plan.errors:
        _fail(SpecError(plan.diagnostics))
    return loaded, plan


def _print_warnings(plan) -> None:
    for warning in plan.warnings:
        err.print(warning.format(), markup=False, highlight=False, soft_wrap=True)


@app.command()
def validate(
    specs: Annotated[list[Path], typer.Argument(help="Spec files to check.")],
    set_: SetOption = None,
) -> None:
    """Check specs (schema and cross-stage references); exit 2 if any is invalid."""
    failed = False
    for spec_path in specs:
        try:
            _load_and_plan(spec_path, set_, estimate=False)
        except typer.Exit:
            failed = True
            continue
        out.print(f"{spec_path}: ok")
    if failed:
        raise typer.Exit(EXIT_BAD_SPEC)


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="The spec file.")],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    resolved: Annotated[bool, typer.Option("--resolved", help="Print the merged spec.")] = False,
    run_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Show which nodes a run in this folder would skip (default runs/<name>).")] = None,
) -> None:
    """Resolve a spec into its stage graph and estimate each node's cost (a dry run)."""
    loaded, the_plan = _load_and_plan(spec, set_)
    if resolved:
        out.print_json(data=loaded.spec.model_dump(mode="json"))
        return
    price = loaded.spec.hardware.price_per_device_hour
    if as_json:
        from .plan.export import plan_to_json

        sys.stdout.write(json.dumps(plan_to_json(the_plan, price), indent=2) + "\n")
        _print_warnings(the_plan)
        return
    from .render import print_plan
    from .run.executor import node_status
    from .run.rundir import RunDir

    folder = RunDir(run_dir or Path("runs") / loaded.spec.name)
    statuses = ({n.id: node_status(folder, n) for n in the_plan.nodes}
                if folder.root.exists() else None)
    print_plan(out, the_plan, price, loaded.spec.hardware.accelerator, statuses)
    _print_warnings(the_plan)


@app.command()
def schema(
    output: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the spec's JSON Schema (draft-7 compatible) for editors."""
    from .spec.schema import schema_json

    text = schema_json()
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="The spec file.")],
    set_: SetOption = None,
    run_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Run directory (default runs/<spec name>).")] = None,
    backend: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Backend (default: the spec's `backend`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only.")] = False,
) -> None:
    """Execute the plan; rerunning skips finished nodes and resumes an interrupted one."""
    if dry_run:
        plan(spec, set_, as_json=False, resolved=False, run_dir=run_dir)
        return
    from .run.session import run_session

    loaded, the_plan = _load_and_plan(spec, set_)
    _print_warnings(the_plan)
    code = run_session(loaded, the_plan, run_dir, backend, out, err)
    raise typer.Exit(code)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {model, dataset, metric, "
                                                         "value} rows as JSON.")] = False,
) -> None:
    """Print the evaluation table of a run."""
    from .run.results import collect_results, results_table

    rows = collect_results(run_dir)
    if not rows and not (run_dir / "plan.json").exists():
        err.print(f"{run_dir} is not a kdspec run directory (no plan.json)")
        raise typer.Exit(EXIT_BAD_SPEC)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        out.print(results_table(rows))


@app.command()
def accelerators() -> None:
    """List the accelerator catalog used by estimates."""
    from rich.table import Table

    from . import units
    from .estimate.hardware import ACCELERATORS

    table = Table("name", "dense bf16 peak", "memory", "HBM bandwidth")
    for name, acc in sorted(ACCELERATORS.items()):
        table.add_row(name, f"{acc.peak_flops / 1e12:.0f} TFLOP/s", units.nbytes(acc.memory_bytes),
                      f"{acc.hbm_bandwidth / 1e12:.2f} TB/s")
    out.print(table)


@app.command()
def presets() -> None:
    """List the built-in model presets and their parameter counts."""
    from rich.table import Table

    from .estimate.params import param_counts
    from .estimate.presets import PRESETS

    table = Table("preset", "family", "layers", "d_model", "vocab", "params")
    for name, dims in PRESETS.items():
        table.add_row(name, dims.family, str(dims.n_layers), str(dims.d_model),
                      str(dims.vocab_size), f"{param_counts(dims).total:,}")
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
