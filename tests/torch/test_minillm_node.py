"""Tiny end-to-end runs of the on-policy stage kinds through the torch backend: `minillm`,
`gkd` and `seqkd` nodes train, save a model, and log their metrics."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from conftest import stage  # noqa: E402

pytestmark = pytest.mark.torch


def minillm_stage(**overrides):
    fields = dict(student="small", teacher="big", pretrain_data="corpus", steps=4, batch_size=4,
                  num_rollouts=8, ppo_epochs=1, max_prompt_length=8, max_length=16,
                  checkpoint_every=2)
    return stage("polish", "minillm", data="pairs", **{**fields, **overrides})


def test_minillm_node_trains_and_saves(make_run):
    run = make_run([minillm_stage()])
    run.run("polish")
    assert (run.model_dir("polish") / "config.json").exists()
    measured = json.loads((run.run_dir / "polish" / "measured.json").read_text())
    assert measured["steps"] == 4 and measured["rollouts"] == 16
    # FLOPs per step = one round's rollouts (8, measured on a chunk of 4) over its 2 steps
    # plus one step's passes
    assert measured["flops_per_step"] == pytest.approx(
        measured["rollout_flops_per_round"] / 2 + measured["step_flops"])
    assert measured["step_flops"] > 0 and measured["rollout_flops_per_round"] > 0
    metrics = run.metrics("polish")
    rounds = [m for m in metrics if "round" in m]
    steps = [m for m in metrics if "pg_loss" in m]
    assert [m["round"] for m in rounds] == [0, 1]
    assert [m["step"] for m in steps] == [2, 4]  # log_every 2
    assert all("pt_loss" in m and "ds_loss" in m for m in steps)
    checkpoints = sorted(p.name for p in (run.run_dir / "polish" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]


def test_minillm_without_pretrain_data(make_run):
    run = make_run([minillm_stage(pretrain_data=None, steps=2)])
    run.run("polish")
    steps = [m for m in run.metrics("polish") if "pg_loss" in m]
    assert steps and all("pt_loss" not in m for m in steps)


def test_gkd_node_trains_with_on_policy_batches(make_run):
    run = make_run([stage("gkd", "gkd", data="pairs", student="small", teacher="big", lmbda=1.0,
                          max_new_tokens=6, steps=2, batch_size=4, log_every=1)])
    run.run("gkd")
    assert (run.model_dir("gkd") / "config.json").exists()
    assert [m["on_policy"] for m in run.metrics("gkd")] == [1.0, 1.0]


def test_seqkd_node_trains_on_cached_teacher_answers(make_run):
    run = make_run([stage("seqkd", "seqkd", data="pairs", student="small", teacher="big",
                          generation={"max_new_tokens": 6, "temperature": 0}, steps=2,
                          batch_size=4)])
    run.run("seqkd")
    assert (run.model_dir("seqkd") / "config.json").exists()
    cache = run.run_dir / "seqkd" / "seqkd_generations.jsonl"
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == 96 and all(len(line["response_ids"]) <= 6 for line in lines)
