"""Measured training FLOPs: `torch.utils.flop_counter` over a few real optimizer steps.

The CPU scaled-dot-product-attention kernel counts as 0 FLOPs in FlopCounterMode, so the
student (and an online teacher) are switched to eager attention while counting, then back. The
count covers every matmul of the forward and backward passes (student forward + backward,
teacher forward, the LM heads); element-wise ops (softmax, norms, the optimizer) are not
counted, as in the analytic estimate. Gradients and RNG streams are left as they were.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedModel

from .batches import Batch
from .objectives.base import Objective
from .runtime import preserved_rng
from .step import forward_backward

FLOP_STEPS = 2


def measure_flops(model: PreTrainedModel, objective: Objective, steps: list[list[Batch]], *,
                  amp: torch.dtype | None, device: torch.device) -> dict[str, Any]:
    """FLOPs per optimizer step, averaged over `steps` (each a list of micro-batches)."""
    models = [model] + ([objective.teacher] if objective.teacher is not None else [])
    previous = [m.config._attn_implementation for m in models]
    started = time.perf_counter()
    with preserved_rng():
        try:
            for m in models:
                m.set_attn_implementation("eager")
            with FlopCounterMode(display=False) as counter:
                for batches in steps:
                    forward_backward(model, objective, batches, amp=amp, device=device)
        finally:
            model.zero_grad(set_to_none=True)
            for m, impl in zip(models, previous, strict=True):
                m.set_attn_implementation(impl)
    return {"flops_per_step": counter.get_total_flops() / len(steps), "flop_steps": len(steps),
            "flop_seconds": round(time.perf_counter() - started, 3),
            "attn_implementation": "eager"}
