"""Training objectives, one module per stage kind, imported only when a node needs one.

Each module defines `LAYOUT` (how its data is cut into rows: "packed" documents or prompt/
response "pairs", see `kdspec_torch.batches`) and `build(setup) -> Objective`. Add a stage kind
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
}


def objective_module(stage_kind: str) -> ModuleType:
    if stage_kind not in OBJECTIVES:
        raise NotImplementedError(
            f"the torch backend has no `{stage_kind}` objective yet "
            f"(it trains: {', '.join(OBJECTIVES)})")
    return importlib.import_module(OBJECTIVES[stage_kind])
