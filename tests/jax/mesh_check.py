"""Run the same train steps on one device and on meshes of 4 host devices; print JSON.

Run as a script in a fresh process: the device count is fixed when jax initialises, so the
parent test sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` in this process's
environment before anything imports jax.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from kdspec.spec.stages.common import OptimizerConfig, ScheduleConfig
from kdspec_jax.model import JaxModelConfig, init_params
from kdspec_jax.optim import build_optimizer
from kdspec_jax.sharding import (
    jit_train_step,
    make_mesh,
    shard_batch,
    state_shardings,
)
from kdspec_jax.train_step import (
    ce_objective,
    init_train_state,
    make_train_step,
    split_micro_batches,
)

CONFIG = JaxModelConfig(
    model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=4,
)
STEPS = 2
# (data, fsdp, zero_stage): pure data parallel, FSDP with sharded weights, and a 2 × 2 hybrid
# with only the optimizer states sharded.
LAYOUTS = [(4, 1, 0), (1, 4, 3), (2, 2, 1)]


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (8, 13))
    labels = tokens[:, 1:].copy()
    labels[:3, :5] = -100  # uneven targets per row: per-device means would not be the mean
    return split_micro_batches({"input_ids": tokens[:, :-1], "labels": labels}, 2)


def _run(step, state, batch) -> tuple[list[float], dict]:  # noqa: ANN001
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def _sharded_fraction(params: dict) -> float:
    """The fraction of the weights one device holds (1 = replicated)."""
    q = params["layers"]["q_proj"]
    return q.addressable_shards[0].data.size / q.size


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    opt = build_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1), ScheduleConfig(), STEPS)
    step_fn = make_train_step(ce_objective(CONFIG), opt)
    # On the host: device_put may alias a device array into the new state, which the donating
    # sharded step then deletes, and the next layout would find the weights gone.
    params = jax.device_get(init_params(CONFIG, jax.random.key(0)))
    batch = _batch()

    one = jax.devices()[0]
    single = jax.device_put(init_train_state(params, opt), one)
    losses, state = _run(jax.jit(step_fn), single, jax.device_put(batch, one))
    results = {"single": {"losses": losses, "params": _flat(state.params)}}

    for data, fsdp, zero in LAYOUTS:
        mesh = make_mesh(data, fsdp)
        start = init_train_state(params, opt)
        shardings = state_shardings(start, mesh, zero)
        state0 = jax.device_put(start, shardings)
        losses, state = _run(jit_train_step(step_fn, shardings, mesh), state0,
                             shard_batch(batch, mesh))
        mu = state.opt_state[1][0].mu["layers"]["q_proj"]  # (clip, (adam, ...)) chain
        results[f"{data}x{fsdp}/zero{zero}"] = {
            "losses": losses,
            "params": _flat(state.params),
            "param_fraction": _sharded_fraction(state.params),
            "moment_fraction": mu.addressable_shards[0].data.size / mu.size,
        }
    json.dump(results, sys.stdout)


def _flat(params: dict) -> list[float]:
    leaves = jax.tree_util.tree_leaves(jax.device_get(params))
    return np.concatenate([np.ravel(x) for x in leaves]).tolist()


if __name__ == "__main__":
    main()
