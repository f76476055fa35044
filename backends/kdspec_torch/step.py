"""One optimizer step's forward and backward passes over its micro-batches."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import PreTrainedModel

from .batches import Batch
from .objectives.base import Objective
from .runtime import autocast


def forward_backward(model: PreTrainedModel, objective: Objective, batches: list[Batch], *,
                     amp: torch.dtype | None, device: torch.device) -> dict[str, float]:
    """Accumulate the gradient of the step's loss, the mean over ALL its target tokens:

        L = Σ_m (n_m / N)·L_m,   N = Σ_m n_m,

    where `L_m` is micro-batch m's mean loss over its `n_m` target tokens. So the gradient is the
    same however the step is split into micro-batches (packed rows have equal n_m; prompt/
    response rows do not, and a plain mean of micro-batch means would weight them unequally).
    Returns the step's loss and the objective's terms, weighted the same way."""
    total = sum(batch.n_targets for batch in batches)
    logged: dict[str, float] = defaultdict(float)
    for batch in batches:
        weight = batch.n_targets / max(total, 1)
        with autocast(amp, device):
            loss, terms = objective.loss(model, batch.to(device))
        (loss * weight).backward()
        logged["loss"] += loss.item() * weight
        for name, value in terms.items():
            logged[name] += value * weight
    return dict(logged)
