"""The rationales node with a local teacher: batched generation in prompt order, seeded sampling,
resume from the partial file, and the node's accounting when nothing parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import TEACHER_ARCH, TinyRun  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from kdspec.plan.planner import build_plan  # noqa: E402
from kdspec.spec import Spec  # noqa: E402
from kdspec.spec.models import ArchConfig  # noqa: E402
from kdspec_torch.generate import Sampling, generate_text  # noqa: E402
from kdspec_torch.models import arch_config  # noqa: E402
from kdspec_torch.step_by_step import local_teacher  # noqa: E402
from kdspec_torch.step_by_step.rationales_node import run_rationales_node  # noqa: E402
from kdspec_torch.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = ["Question: Tom has 3 apples.", "Question: Anna", "Question: Ben has 2 pens and 4",
           "Question: Mia has", "Question: Sam gives away 5 cards. How many?"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tokenizer = load_tokenizer("builtin:words", spec_dir=Path("."),
                               work_dir=tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    config = arch_config(ArchConfig.model_validate(TEACHER_ARCH), tokenizer)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def test_greedy_answers_follow_prompt_order(teacher, tmp_path: Path) -> None:
    model, tokenizer = teacher
    sampling = Sampling(max_new_tokens=6)
    got = local_teacher.generate_answers(model, tokenizer, PROMPTS, sampling, seed=0,
                                         batch_size=2, partial=tmp_path / "partial.jsonl")
    assert got == [generate_text(model, tokenizer, [p], sampling)[0] for p in PROMPTS]
    chunks = [json.loads(line) for line in (tmp_path / "partial.jsonl").read_text().splitlines()]
    assert [len(c["index"]) for c in chunks] == [2, 2, 1]
    assert sorted(i for c in chunks for i in c["index"]) == list(range(5))


def test_a_resumed_generation_redoes_only_missing_chunks(teacher, tmp_path: Path,
                                                         monkeypatch) -> None:
    model, tokenizer = teacher
    sampling = Sampling(max_new_tokens=6, temperature=1.0)
    partial = tmp_path / "partial.jsonl"
    first = local_teacher.generate_answers(model, tokenizer, PROMPTS, sampling, seed=7,
                                           batch_size=2, partial=partial)
    lines = partial.read_text().splitlines()
    partial.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    calls = []
    real = local_teacher.generate_text

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(local_teacher, "generate_text", counting)
    again = local_teacher.generate_answers(model, tokenizer, PROMPTS, sampling, seed=7,
                                           batch_size=2, partial=partial)
    assert calls == [2, 1]  # chunk 0 was complete; the torn chunk 1 and chunk 2 are redone
    assert again == first  # chunk c samples from a generator seeded by (seed, c)
    other = local_teacher.generate_answers(model, tokenizer, PROMPTS, sampling, seed=8,
                                           batch_size=2, partial=tmp_path / "other.jsonl")
    assert other != first


def test_prompt_budget_leaves_room_for_the_answer(teacher) -> None:
    model, _ = teacher
    assert local_teacher.prompt_budget(model, 16) == TEACHER_ARCH["max_seq_len"] - 16
    with pytest.raises(ValueError, match="leaves no room"):
        local_teacher.prompt_budget(model, TEACHER_ARCH["max_seq_len"])


def test_node_reports_a_teacher_whose_text_never_parses(tmp_path: Path) -> None:
    """An untrained teacher writes no "So the answer is N": every example is dropped and
    counted, and the node fails with the counts rather than handing an empty dataset on."""
    spec = Spec.model_validate({
        "kdspec": 1, "name": "local", "tokenizer": "builtin:words",
        "models": {"big": {"arch": TEACHER_ARCH}, "small": {"arch": TEACHER_ARCH}},
        "data": {"arith": {"source": "builtin:arithmetic", "n": 6}},
        "stages": [{"name": "dss", "kind": "step_by_step", "student": "small", "teacher": "big",
                    "data": "arith", "steps": 1,
                    "rationales": {"template": "Question: {input}",
                                   "answer_format": " {rationale} So the answer is {label}.",
                                   "answer_pattern": r"So the answer is (?P<label>\d+)",
                                   "demonstrations": [{"input": "Tom has 2 pens.",
                                                       "rationale": "2 + 2 = 4.",
                                                       "label": "4"}],
                                   "generation": {"max_new_tokens": 8}}}],
    })
    (tmp_path / "run").mkdir()
    run = TinyRun(spec, build_plan(spec, base_dir=tmp_path, estimate=False), tmp_path,
                  tmp_path / "run")
    with pytest.raises(ValueError, match="no rationale survived .*kept 0 of 6 examples"):
        run_rationales_node(run.ctx("dss.rationales"))
    node = tmp_path / "run" / "dss.rationales"
    stats = json.loads((node / "stats.json").read_text())
    assert (stats["examples"], stats["kept"], stats["unparsed"]) == (6, 0, 6)
    assert stats["teacher_accuracy"] == 0.0 and stats["with_gold"] == 6
    dropped = [json.loads(line) for line in (node / "dropped.jsonl").read_text().splitlines()]
    assert [d["reason"] for d in dropped] == ["no_answer"] * 6
    assert all(isinstance(d["raw"], str) for d in dropped)
    assert (node / "rationales.jsonl").read_text() == ""
    progress = [e for e in run.events if e.kind == "progress"]
    assert progress[-1].step == progress[-1].total == 6
