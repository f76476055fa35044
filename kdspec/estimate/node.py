"""What every node estimate returns, and the phases (parts) it is assembled from.

Time model, per part: ``seconds = max(compute, bandwidth)`` where ``compute = FLOPs / (count ·
peak · mfu)`` and ``bandwidth`` is the bytes each device must stream from HBM (weights each
micro-batch, gradients, KV caches) over its bandwidth. Generation parts take the max per decode
step instead (``generation.py``). A node's wall time is the sum of its parts (they run one
after another); ``device_hours = wall_seconds · count / 3600``; ``cost_usd = device_hours ·
price`` when a price is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .arch import ArchDims
from .flops import AttentionCount, forward_flops, train_flops
from .generation import estimate_generation
from .hardware import Hardware
from .memory import MemoryEstimate, training_precision, weight_read_bytes
from .params import param_counts


@dataclass(frozen=True)
class NodeEstimate:
    """The estimate of one plan node.

    ``flops``: everything the node computes, teacher included (``teacher_flops`` is the
    teacher's share). ``memory_per_device_bytes`` = sum of ``memory_breakdown``.
    ``storage_bytes``: what the node writes to disk (checkpoints, caches, generated text).
    ``wall_seconds``: over all devices working together. ``details``: the parts and the
    assumptions, for ``kdspec plan`` to show.
    """

    flops: float
    teacher_flops: float
    memory_per_device_bytes: int
    memory_breakdown: dict[str, int]
    storage_bytes: int
    wall_seconds: float
    device_hours: float
    cost_usd: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def fits_in_memory(self) -> bool:
        return bool(self.details.get("fits_in_memory", True))


@dataclass(frozen=True)
class Part:
    """One phase of a node: FLOPs (``teacher_flops`` of them the teacher's) and seconds."""

    flops: float
    teacher_flops: float
    seconds: float
    compute_seconds: float
    bandwidth_seconds: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _timed(flops: float, teacher_flops: float, stream_bytes: float, hw: Hardware) -> Part:
    """A part whose FLOPs spread over all devices and each device streams ``stream_bytes``."""
    compute = flops / hw.achieved_flops
    bandwidth = stream_bytes / hw.accelerator.hbm_bandwidth
    return Part(flops, teacher_flops, max(compute, bandwidth), compute, bandwidth)


def _micro_batches_per_replica(tokens: float, seq_len: int, micro_batch: int, hw: Hardware
                               ) -> float:
    return tokens / (seq_len * micro_batch * hw.dp)


def train_part(
    model: ArchDims, *, tokens: float, seq_len: int, micro_batch: int, hardware: Hardware,
    dtype_bytes: int, recompute: bool = False, attention: AttentionCount = "dense",
    target_len: int | None = None,
) -> Part:
    """Forward + backward of a trained model over ``tokens`` (``train_flops``). Streams per
    micro-batch: the weights once per forward (twice with recomputation) and once in backward,
    and the gradient accumulators read and written."""
    precision = training_precision(dtype_bytes)
    n_params = param_counts(model).total
    tp = hardware.tensor_parallel
    grad_shards = tp * (hardware.dp if hardware.zero_stage >= 2 else 1)
    weight_reads = 3 if recompute else 2
    per_micro = (weight_reads * n_params * precision.weight_bytes / tp
                 + 2 * n_params * precision.grad_bytes / grad_shards)
    n_micro = _micro_batches_per_replica(tokens, seq_len, micro_batch, hardware)
    flops = train_flops(model, tokens, seq_len, recompute, target_len=target_len,
                        attention=attention)
    return _timed(flops, 0.0, n_micro * per_micro, hardware)


def forward_part(
    model: ArchDims, *, tokens: float, seq_len: int, micro_batch: int, hardware: Hardware,
    dtype_bytes: int, attention: AttentionCount = "dense", target_len: int | None = None,
    is_teacher: bool = False,
) -> Part:
    """A no-grad forward over ``tokens``; streams the weights once per micro-batch."""
    flops = forward_flops(model, tokens, seq_len, target_len=target_len, attention=attention)
    n_micro = _micro_batches_per_replica(tokens, seq_len, micro_batch, hardware)
    stream = n_micro * weight_read_bytes(model, dtype_bytes) / hardware.tensor_parallel
    return _timed(flops, flops if is_teacher else 0.0, stream, hardware)


def generation_part(
    models: Sequence[ArchDims], *, n_sequences: float, batch: int, prompt_len: int,
    new_tokens: int, hardware: Hardware, dtype_bytes: int, n_teachers: int = 0,
    attention: AttentionCount = "dense",
) -> Part:
    """``n_sequences`` generations in batches of ``batch``, the models in lockstep; the last
    ``n_teachers`` of ``models`` are teachers. Each data-parallel replica takes
    ``ceil(n_sequences / (batch · dp))`` batches one after another."""
    flops = teacher_flops = seconds = compute = bandwidth = 0.0
    rounds = math.ceil(n_sequences / (batch * hardware.dp)) if n_sequences > 0 else 0
    for i, model in enumerate(models):
        g = estimate_generation(
            model, batch=batch, prompt_tokens=prompt_len, new_tokens=new_tokens,
            accelerator=hardware.accelerator, mfu=hardware.mfu, dtype_bytes=dtype_bytes,
            tensor_parallel=hardware.tensor_parallel, attention=attention,
        )
        model_flops = g.flops * n_sequences / batch
        flops += model_flops
        if i >= len(models) - n_teachers:
            teacher_flops += model_flops
        seconds += rounds * g.seconds
        compute += rounds * g.compute_seconds
        bandwidth += rounds * g.bandwidth_seconds
    return Part(flops, teacher_flops, seconds, compute, bandwidth)


def finish(
    *, parts: dict[str, Part], memory: MemoryEstimate, storage_bytes: int, hardware: Hardware,
    details: dict[str, Any],
) -> NodeEstimate:
    """Sum the parts into a ``NodeEstimate`` with device-hours, cost and a memory check."""
    wall = sum(p.seconds for p in parts.values())
    device_hours = wall * hardware.count / 3600
    capacity = hardware.accelerator.memory_bytes
    return NodeEstimate(
        flops=sum(p.flops for p in parts.values()),
        teacher_flops=sum(p.teacher_flops for p in parts.values()),
        memory_per_device_bytes=memory.total,
        memory_breakdown=dict(memory.breakdown),
        storage_bytes=int(storage_bytes),
        wall_seconds=wall,
        device_hours=device_hours,
        cost_usd=hardware.cost_usd(device_hours),
        details={
            **details,
            "parts": {name: p.as_dict() for name, p in parts.items()},
            "accelerator": hardware.accelerator.name,
            "devices": hardware.count,
            "mfu": hardware.mfu,
            "device_memory_bytes": capacity,
            "fits_in_memory": memory.total <= capacity,
        },
    )
