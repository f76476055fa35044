"""Attach a compute estimate to every plan node, and warn when a node cannot fit in memory."""

from __future__ import annotations

from typing import Any

from ..estimate.hardware import ACCELERATORS, Hardware
from ..spec import Spec
from .archinfo import origin_dims
from .checks import _origin
from .graph import Node, Plan

_GIB = 2**30


def hardware_of(spec: Spec) -> Hardware:
    hw = spec.hardware
    return Hardware(
        accelerator=ACCELERATORS[hw.accelerator], count=hw.count, mfu=hw.mfu,
        price_per_device_hour=hw.price_per_device_hour, data_parallel=hw.data_parallel,
        zero_stage=hw.parallelism.zero_stage, tensor_parallel=hw.parallelism.tensor,
    )


def dtype_bytes(spec: Spec) -> int:
    return 4 if spec.hardware.accelerator == "cpu" else 2


def estimate_plan(plan: Plan, spec: Spec, builder: Any) -> None:
    if spec.hardware.accelerator not in ACCELERATORS:
        return  # reported by checks.check_plan
    hardware = hardware_of(spec)
    for node in plan.nodes:
        dims: dict[str, Any] = {
            role: origin_dims(spec, _origin(node.config.get(role)), builder.base_dir)
            if node.config.get(role) else None for role in ("student", "teacher")}
        dims["base_dir"] = builder.base_dir
        node.estimate = _estimate_node(node, spec, hardware, dims)
        _check_memory(node, spec, hardware, builder)


def _estimate_node(node: Node, spec: Spec, hardware: Hardware, dims: dict) -> Any:
    from .workload_map import ESTIMATORS

    estimator = ESTIMATORS.get(node.kind if node.kind != "train" else node.stage_kind)
    if estimator is None:
        return None
    return estimator(node, spec, hardware, dims, dtype_bytes(spec))


def _check_memory(node: Node, spec: Spec, hardware: Hardware, builder: Any) -> None:
    estimate = node.estimate
    if estimate is None or not estimate.memory_per_device_bytes:
        return
    capacity = hardware.accelerator.memory_bytes
    if estimate.memory_per_device_bytes > capacity:
        index = next((i for i, s in enumerate(spec.stages) if s.name == node.stage), None)
        top = sorted(estimate.memory_breakdown.items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{k} {v / _GIB:.1f}" for k, v in top)
        builder.error(
            ("stages", index) if index is not None else ("hardware",),
            f"node `{node.id}` needs about {estimate.memory_per_device_bytes / _GIB:.1f} GiB per "
            f"device but a {spec.hardware.accelerator} has {capacity / _GIB:.1f} GiB "
            f"(largest: {parts} GiB)",
            "shard with parallelism.zero_stage, add devices, recompute activations, or cut "
            "batch_size / seq_len",
            severity="warning",
        )
