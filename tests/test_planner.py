"""Planner: nodes, references, order, fingerprints and cross-stage checks (no estimates here)."""

from __future__ import annotations

import copy

import pytest

from kdspec.plan.planner import build_plan
from kdspec.spec import Spec

ARCH = {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
        "vocab_size": 100}


def make_spec(stages, **extra) -> dict:
    return {
        "kdspec": 1, "name": "t",
        "models": {"big": {"arch": {**ARCH, "n_layers": 4}}, "small": {"arch": ARCH}},
        "data": {"corpus": {"source": "builtin:hmm"}, "qa": {"source": "builtin:arithmetic"}},
        "stages": stages, **extra,
    }


def plan_of(raw: dict):
    return build_plan(Spec.model_validate(raw), estimate=False)


def train(name, kind="pretrain", **kw):
    return {"name": name, "kind": kind, "data": "corpus", "steps": 5, **kw}


PIPELINE = [
    train("teacher", student="big"),
    train("student_kd", "pretrain_kd", student="small", teacher="teacher"),
    {"name": "eval", "kind": "eval", "models": ["teacher", "student_kd"], "data": ["corpus"]},
]


def test_nodes_dependencies_and_order():
    plan = plan_of(make_spec(PIPELINE))
    assert [n.id for n in plan.nodes] == ["teacher", "student_kd", "eval", "report"]
    assert plan.node("student_kd").inputs == {"teacher": "teacher"}
    assert plan.node("eval").depends_on == ["teacher", "student_kd"]
    assert set(plan.node("report").depends_on) == {"teacher", "student_kd", "eval"}
    assert not plan.diagnostics


def test_student_defaults_to_previous_training_stage():
    plan = plan_of(make_spec([train("a", student="small"), train("b", "sft")]))
    assert plan.node("b").config["student"] == {"stage": "a"}
    assert plan.node("b").depends_on == ["a"]


def test_first_stage_without_student_is_an_error():
    plan = plan_of(make_spec([train("a")]))
    assert [d.path for d in plan.errors] == [("stages", 0, "student")]


def test_topk_cache_adds_a_teacher_logits_node():
    stages = copy.deepcopy(PIPELINE)
    stages[1]["teacher_cache"] = {"mode": "topk", "k": 8}
    plan = plan_of(make_spec(stages))
    node = plan.node("student_kd.teacher_logits")
    assert node.kind == "teacher_logits" and node.depends_on == ["teacher"]
    assert plan.node("student_kd").inputs["teacher_logits"] == node.id
    assert node.config["tokens"] == 5 * 8 * 256  # steps × batch × seq_len


@pytest.mark.parametrize("kind", ["minillm", "gkd"])
def test_cache_cannot_feed_an_on_policy_stage(kind):
    stages = [train("teacher", student="big"),
              train("polish", kind, student="small", teacher="teacher",
                    teacher_cache={"mode": "topk"})]
    plan = plan_of(make_spec(stages))
    assert [d.path for d in plan.errors] == [("stages", 1, "teacher_cache", "mode")]
    assert "on-policy" in plan.errors[0].message


def test_identical_rationale_requests_share_one_node():
    dss = {"kind": "step_by_step", "data": "qa", "steps": 5, "student": "small", "teacher": "big"}
    stages = [{"name": "dss_full", **dss}, {"name": "dss_half", "train_fraction": 0.5, **dss}]
    plan = plan_of(make_spec(stages))
    assert [n.id for n in plan.nodes if n.kind == "rationales"] == ["dss_full.rationales"]
    assert plan.node("dss_half").inputs["rationales"] == "dss_full.rationales"


def test_unknown_after_names_the_closest_stage():
    stages = copy.deepcopy(PIPELINE)
    stages[1]["after"] = ["teachr"]
    plan = plan_of(make_spec(stages))
    (error,) = plan.errors
    assert error.path == ("stages", 1, "after", 0)
    assert error.hint == "did you mean `teacher`?"


def test_cycle_is_reported():
    stages = [train("a", student="small", after=["b"]), train("b", student="small", after=["a"])]
    plan = plan_of(make_spec(stages))
    assert any("cycle" in d.message for d in plan.errors)


def test_unknown_model_and_data_references():
    stages = [train("a", student="smal", data="corpsu")]
    plan = plan_of(make_spec(stages))
    hints = {d.path: d.hint for d in plan.errors}
    assert hints[("stages", 0, "student")] == "did you mean `small`?"
    assert hints[("stages", 0, "data")] == "did you mean `corpus`?"


def test_vocabulary_mismatch_between_teacher_and_student():
    raw = make_spec(PIPELINE)
    raw["models"]["small"]["arch"]["vocab_size"] = 200
    plan = plan_of(raw)
    (error,) = plan.errors
    assert error.path == ("stages", 1, "teacher")
    assert "vocabulary (100)" in error.message and "(200)" in error.message


def test_tokenizer_mismatch_between_teacher_and_student():
    raw = make_spec(PIPELINE)
    raw["models"]["small"]["tokenizer"] = "builtin:bytes"
    plan = plan_of(raw)
    assert any("tokenizer" in d.message for d in plan.errors)


def test_labels_from_must_name_a_step_by_step_stage():
    stages = [train("a", student="small"), train("b", "sft", data="qa", labels_from="a")]
    plan = plan_of(make_spec(stages))
    assert [d.path for d in plan.errors] == [("stages", 1, "labels_from")]


def test_stage_and_model_names_share_one_namespace():
    plan = plan_of(make_spec([train("small", student="small")]))
    assert any("both a model and a stage" in d.message for d in plan.errors)


def test_fingerprints_change_downstream_only():
    base = plan_of(make_spec(PIPELINE))
    stages = copy.deepcopy(PIPELINE)
    stages[1]["optimizer"] = {"lr": 1e-3}
    changed = plan_of(make_spec(stages))
    prints = {n.id: (n.fingerprint, changed.node(n.id).fingerprint) for n in base.nodes}
    assert prints["teacher"][0] == prints["teacher"][1]
    for node in ("student_kd", "eval", "report"):
        assert prints[node][0] != prints[node][1]


def test_cosmetic_fields_keep_the_fingerprint():
    stages = copy.deepcopy(PIPELINE)
    stages[0]["description"] = "only words"
    stages[0]["log_every"] = 1
    assert plan_of(make_spec(stages)).node("teacher").fingerprint == plan_of(
        make_spec(PIPELINE)).node("teacher").fingerprint
