"""Data parallelism and FSDP/ZeRO sharding through a ``jax.sharding.Mesh``.

The mesh has two axes, ``("data", "fsdp")``. Every batch is split over both (each device gets
``micro_batch / n_devices`` rows); parameters and optimizer states are replicated over ``data``
and split over ``fsdp``. XLA's partitioner inserts the collectives (all-reduce of gradients over
``data``; all-gather of weights before use and reduce-scatter of gradients over ``fsdp``), so the
train step is the single-device function, unchanged.

From the spec's ``hardware.parallelism`` (:func:`mesh_from_parallelism`): ``zero_stage 0`` puts
all ``data`` devices on the ``data`` axis (pure data parallelism); ``zero_stage ≥ 1`` puts them
on ``fsdp``. Stage 1 and 2 shard the optimizer states (under XLA, gradients are reduce-scattered
to wherever the update needs them, so 1 and 2 coincide), stage 3 the parameters as well.

Sharding rule for one array: its largest dimension divisible by the ``fsdp`` size (excluding
the stacked layer axis of ``layers/*``, which ``lax.scan`` walks) is split; vectors (norm
scales, biases) and arrays with no divisible dimension stay replicated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .train_step import TrainState

__all__ = [
    "AXES",
    "batch_sharding",
    "fsdp_partition_spec",
    "jit_train_step",
    "make_mesh",
    "mesh_from_parallelism",
    "replicated",
    "shard_batch",
    "state_shardings",
    "tree_shardings",
]

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the rows of a micro-batch are split over every device


def make_mesh(data: int = 1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``data × fsdp`` mesh over the first ``data · fsdp`` of ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or fsdp < 1:
        raise ValueError(f"mesh axes must be ≥ 1, got data={data}, fsdp={fsdp}")
    if data * fsdp > len(devices):
        raise ValueError(
            f"a {data} × {fsdp} (data × fsdp) mesh needs {data * fsdp} devices, "
            f"{len(devices)} available"
        )
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, AXES)


def mesh_from_parallelism(
    *,
    data: int | None = None,
    zero_stage: int = 0,
    tensor: int = 1,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """The mesh for a spec's ``hardware.parallelism``: ``data`` devices (default: all
    available), on the ``fsdp`` axis when ``zero_stage ≥ 1``, else on the ``data`` axis."""
    if tensor != 1:
        raise ValueError(
            f"hardware.parallelism.tensor = {tensor}: the JAX backend has no tensor "
            "parallelism; set tensor: 1 (use zero_stage: 3 to shard the weights instead)"
        )
    if not 0 <= zero_stage <= 3:
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    devices = list(jax.devices() if devices is None else devices)
    n = data or len(devices)
    return make_mesh(1, n, devices) if zero_stage >= 1 else make_mesh(n, 1, devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_partition_spec(path: tuple[Any, ...], shape: tuple[int, ...], fsdp_size: int) -> P:
    """The ``PartitionSpec`` of one parameter-shaped array (see the module docstring)."""
    first = 1 if any(getattr(k, "key", None) == "layers" for k in path) else 0
    if fsdp_size == 1 or len(shape) - first < 2:
        return P()
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    return P(*("fsdp" if a == axis else None for a in range(len(shape))))


def tree_shardings(tree: Any, mesh: Mesh, *, shard: bool) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or shape structs): FSDP-split by
    :func:`fsdp_partition_spec` when ``shard``, else replicated."""
    fsdp_size = mesh.shape["fsdp"]

    def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        if not shard:
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_partition_spec(path, tuple(np.shape(leaf)), fsdp_size))

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def state_shardings(state: TrainState, mesh: Mesh, zero_stage: int) -> TrainState:
    """Shardings of a train state (or its ``jax.eval_shape``): optimizer states split over
    ``fsdp`` from ZeRO stage 1, parameters from stage 3; the step counter replicated."""
    return TrainState(
        params=tree_shardings(state.params, mesh, shard=zero_stage >= 3),
        opt_state=tree_shardings(state.opt_state, mesh, shard=zero_stage >= 1),
        step=replicated(mesh),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """For ``[grad_accum, micro_batch, ...]`` arrays: micro-batch rows split over all devices."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a ``[grad_accum, micro_batch, ...]`` batch on the mesh."""
    n = mesh.devices.size
    out = {}
    for name, array in batch.items():
        if array.shape[1] % n:
            raise ValueError(
                f"micro-batch of {array.shape[1]} rows ({name}) does not split over {n} "
                "devices; make batch_size / grad_accum a multiple of the device count"
            )
        out[name] = jax.device_put(array, batch_sharding(mesh))
    return out


def jit_train_step(
    step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    shardings: TrainState,
    mesh: Mesh,
    *,
    donate: bool = True,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``jax.jit`` a train step so that the new state keeps ``shardings`` and the metrics
    come back replicated. Put the inputs in place first (``jax.device_put(state, shardings)``,
    :func:`shard_batch`); ``donate`` reuses the old state's buffers for the new one, which
    deletes them, and with them any array ``device_put`` aliased into that state (keep a host
    copy of what you still need)."""
    return jax.jit(
        step,
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
