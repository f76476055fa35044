"""Training objectives, one module per stage kind, imported only when a node needs one.

Each module defines `LAYOUT` (how its data is cut into rows: "packed" documents or prompt/
response "pairs", see `kdspec_torch.batches`) and `build(setup) -> Objective`; a module that
reads its rows from elsewhere (step_by_step: the rationales artifact) defines
`load_data(setup)`, which the train node calls instead of cutting the data source. Add a stage kind
by adding a module and a line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

OBJECTIVES: dict[str, str] = {
    "pretrain": "kdspec_torch.objectives.pretrain",
    "sft": "kdspec_torch.objectives.sft",
    "pretrain_kd": "kdspec_torch.objectives.pretrain_kd",
    "kd": "kdspec_torch.objectives.kd",
    "seqkd": "kdspec_torch.objectives.seqkd",
    "gkd": "kdspec_torch.objectives.gkd",
    "step_by_step": "kdspec_torch.step_by_step.objective",
}


def objective_module(stage_kind: str) -> ModuleType:
    if stage_kind not in OBJECTIVES:
        raise NotImplementedError(
            f"the torch backend has no `{stage_kind}` objective yet "
            f"(it trains: {', '.join(OBJECTIVES)})")
    return importlib.import_module(OBJECTIVES[stage_kind])
