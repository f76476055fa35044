"""Meshes and sharding rules; the train step on 4 host devices equals the 1-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.tree_util import DictKey

from kdspec_jax.sharding import fsdp_partition_spec, make_mesh, mesh_from_parallelism

HERE = Path(__file__).parent


def test_partition_rule() -> None:
    layers = (DictKey("layers"), DictKey("q_proj"))
    # Stacked [L, out, in]: never the layer axis; the largest divisible dim.
    assert fsdp_partition_spec(layers, (4, 32, 16), 4) == P(None, "fsdp", None)
    assert fsdp_partition_spec(layers, (4, 6, 16), 4) == P(None, None, "fsdp")
    assert fsdp_partition_spec(layers, (4, 6, 6), 4) == P()  # nothing divides: replicated
    assert fsdp_partition_spec((DictKey("layers"), DictKey("attn_norm")), (8, 16), 4) == P()
    assert fsdp_partition_spec((DictKey("embed_tokens"),), (64, 16), 4) == P("fsdp", None)
    assert fsdp_partition_spec((DictKey("norm"),), (16,), 4) == P()
    assert fsdp_partition_spec((DictKey("embed_tokens"),), (64, 16), 1) == P()


def test_mesh_from_parallelism() -> None:
    mesh = mesh_from_parallelism(zero_stage=0)
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.shape == {"data": jax.device_count(), "fsdp": 1}
    assert mesh_from_parallelism(zero_stage=3).shape == {"data": 1, "fsdp": jax.device_count()}
    with pytest.raises(ValueError, match="no tensor parallelism"):
        mesh_from_parallelism(tensor=2)
    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh(8, 8)


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    """One subprocess (the device count is fixed when jax starts) runs every layout."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(HERE / "mesh_check.py")], env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_four_devices_give_the_one_device_loss_and_params(mesh_results: dict) -> None:
    single = mesh_results["single"]
    assert single["losses"][1] < single["losses"][0]  # the steps did something
    layouts = {k: v for k, v in mesh_results.items() if k != "single"}
    assert set(layouts) == {"4x1/zero0", "1x4/zero3", "2x2/zero1"}
    for layout, got in layouts.items():
        np.testing.assert_allclose(got["losses"], single["losses"], rtol=1e-6, err_msg=layout)
        np.testing.assert_allclose(got["params"], single["params"], atol=1e-6, err_msg=layout)


def test_zero_stages_shard_what_they_say(mesh_results: dict) -> None:
    assert mesh_results["4x1/zero0"]["param_fraction"] == 1.0
    assert mesh_results["4x1/zero0"]["moment_fraction"] == 1.0
    assert mesh_results["1x4/zero3"]["param_fraction"] == 0.25
    assert mesh_results["1x4/zero3"]["moment_fraction"] == 0.25
    assert mesh_results["2x2/zero1"]["param_fraction"] == 1.0  # weights stay replicated
    assert mesh_results["2x2/zero1"]["moment_fraction"] == 0.5  # Adam moments split over fsdp
