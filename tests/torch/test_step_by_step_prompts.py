"""Few-shot prompts, parsing of teacher outputs (well-formed and malformed), the gold filter and
the training tasks of Distilling Step-by-Step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdspec.spec.stages.eval import EvalPrompt
from kdspec.spec.stages.step_by_step import RationaleConfig
from kdspec_torch.step_by_step.prompts import (
    Demo,
    FewShot,
    agrees_with_gold,
    load_demonstrations,
    training_tasks,
)
from kdspec_torch.step_by_step.rationales_node import extract

DEMOS = (
    Demo("Jack had 8 pens and gave 3 away. How many pens?", "Jack gives away 3, so 8 - 3 = 5.",
         "5"),
    Demo("Ann has 2 bags of 4 {odd} cards. How many?", "2 * 4 = 8.", "8"),
)
PROMPT = FewShot("Q: {input}\nA:", DEMOS)  # the spec's defaults for everything else


def test_render_writes_demonstrations_then_the_question() -> None:
    assert PROMPT.render("What is 1 + 1?") == (
        "Q: Jack had 8 pens and gave 3 away. How many pens?\n"
        "A: Jack gives away 3, so 8 - 3 = 5. The answer is 5.\n\n"
        "Q: Ann has 2 bags of 4 {odd} cards. How many?\n"  # braces are kept as written
        "A: 2 * 4 = 8. The answer is 8.\n\n"
        "Q: What is 1 + 1?\nA:"
    )
    assert FewShot("Q: {input}\nA:").render("x") == "Q: x\nA:"


def test_chat_messages_alternate_demonstrations() -> None:
    assert PROMPT.messages("What is 1 + 1?") == [
        {"role": "user", "content": "Q: Jack had 8 pens and gave 3 away. How many pens?\nA:"},
        {"role": "assistant", "content": "Jack gives away 3, so 8 - 3 = 5. The answer is 5."},
        {"role": "user", "content": "Q: Ann has 2 bags of 4 {odd} cards. How many?\nA:"},
        {"role": "assistant", "content": "2 * 4 = 8. The answer is 8."},
        {"role": "user", "content": "Q: What is 1 + 1?\nA:"},
    ]


def test_spec_defaults_match_the_parser_defaults() -> None:
    spec = RationaleConfig()
    fewshot = FewShot.from_config(spec.model_dump(mode="json"), Path("."))
    assert (fewshot.template, fewshot.answer_format, fewshot.answer_pattern) == (
        FewShot("Q: {input}\nA:").template, FewShot("").answer_format,
        FewShot("").answer_pattern)


@pytest.mark.parametrize(("text", "rationale", "label", "failure"), [
    (" 1 + 1 = 2. The answer is 2.", "1 + 1 = 2.", "2", None),
    ("1 + 1 = 2. The answer is 2", "1 + 1 = 2.", "2", None),
    # the teacher goes on with a new demonstration: cut at the next "Q:"
    ("1 + 1 = 2. The answer is 2.\n\nQ: Tom has 3 pens. A: The answer is 9.", "1 + 1 = 2.", "2",
     None),
    ("one and one make two. The answer is   two.  \n", "one and one make two.", "two", None),
    # malformed outputs
    ("1 + 1 = 2, I think.", "", "", "no_answer"),
    ("", "", "", "no_answer"),
    ("Q: another question? The answer is 4.", "", "", "no_answer"),  # nothing before the cut
    ("1 + 1 = 2. The answer is .", "1 + 1 = 2.", "", "empty_label"),  # punctuation only
    ("1 + 1 = 2. The answer is", "", "", "no_answer"),
    ("The answer is 2.", "", "2", "empty_rationale"),
    ("the answer is 2.", "", "", "no_answer"),  # the pattern is case-sensitive
])
def test_parse(text: str, rationale: str, label: str, failure: str | None) -> None:
    parsed = PROMPT.parse(text)
    assert (parsed.rationale, parsed.label, parsed.failure) == (rationale, label, failure)
    assert parsed.ok == (failure is None)


def test_parse_with_a_custom_pattern_takes_the_first_match() -> None:
    fewshot = FewShot("Question: {input}", answer_format=" {rationale} So the answer is {label}.",
                      answer_pattern=r"So the answer is\s*(?P<label>-?[0-9]+)")
    parsed = fewshot.parse("3 + 5 = 8. So the answer is 8. So the answer is 9.")
    assert (parsed.rationale, parsed.label) == ("3 + 5 = 8.", "8")
    assert fewshot.parse("3 + 5 = 8. So the answer is eight.").failure == "no_answer"
    assert fewshot.parse("x. So the answer is -3").label == "-3"


def test_prediction_reads_the_label_or_the_whole_generation() -> None:
    assert PROMPT.prediction("2 + 2 = 4. The answer is 4.") == "4"
    assert PROMPT.prediction("The answer is 4.") == "4"  # no rationale needed to score
    assert PROMPT.prediction("4") == ""
    plain = FewShot.from_config(EvalPrompt(template="predict: {input}").model_dump(), Path("."))
    assert plain.answer_pattern is None
    assert plain.render("2 + 2?") == "predict: 2 + 2?"
    assert plain.prediction("  4 ") == "4"
    with pytest.raises(ValueError, match="no answer_pattern"):
        plain.parse("4")


def test_demonstrations_must_parse_back() -> None:
    PROMPT.check_demonstrations()
    mismatched = FewShot("Q: {input}\nA:", DEMOS, answer_format=" {rationale} So it is {label}.")
    with pytest.raises(ValueError, match="demonstration 0 .* does not parse back"):
        mismatched.check_demonstrations()
    # A rationale holding the question marker would be cut short by the parser.
    bad = FewShot("Q: {input}\nA:", (Demo("x", "Q: why? 2 + 2 = 4.", "4"),))
    with pytest.raises(ValueError, match="demonstration 0"):
        bad.check_demonstrations()


def test_demonstrations_from_a_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps({"input": "a", "rationale": "b", "label": 3}) + "\n\n")
    assert load_demonstrations("demos.jsonl", tmp_path) == [Demo("a", "b", "3")]
    assert load_demonstrations([{"input": "a", "rationale": "b", "label": "c"}], tmp_path) == [
        Demo("a", "b", "c")]
    path.write_text('{"input": "a", "rationale": "b", "label": "c"}\n{"input": "a"}\n')
    with pytest.raises(ValueError, match=r"demos\.jsonl:2: expected a JSON object"):
        load_demonstrations("demos.jsonl", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_demonstrations("missing.jsonl", tmp_path)


def test_gold_agreement_uses_the_accuracy_normalisation() -> None:
    assert agrees_with_gold("8", "8") and agrees_with_gold("8.0", "8")
    assert agrees_with_gold("1,000", "1000") and agrees_with_gold("Yes.", "yes")
    assert not agrees_with_gold("9", "8") and not agrees_with_gold("", "8")


def test_training_tasks_of_each_variant() -> None:
    record = {"input": "2 + 2?", "rationale": "2 + 2 = 4.", "label": "4"}
    assert training_tasks(record, "multitask") == {
        "predict": ("predict: 2 + 2?", "4"), "explain": ("explain: 2 + 2?", "2 + 2 = 4.")}
    assert training_tasks(record, "multitask", predict="P ", explain="E ") == {
        "predict": ("P 2 + 2?", "4"), "explain": ("E 2 + 2?", "2 + 2 = 4.")}
    assert training_tasks(record, "single_task") == {
        "single": ("predict: 2 + 2?", "2 + 2 = 4. The answer is 4.")}
    assert training_tasks(record, "label_only") == {"label": ("2 + 2?", "4")}


def test_extract_counts_what_it_drops() -> None:
    records = [{"input": f"q{i}", "label": str(i)} for i in range(6)] + [{"input": "q6"}]
    raws = [
        "0 = 0. The answer is 0.",  # kept
        "1 = 1. The answer is 7.",  # disagrees with gold
        "no answer here",  # unparsed
        None,  # request failed
        "The answer is 4.",  # empty rationale: unparsed, but the label is right
        "5 = 5. The answer is 5.0",  # kept (numbers compared as numbers)
        "6. The answer is 6.",  # no gold label: kept, not scored
    ]
    result = extract(records, raws, PROMPT, filter_gold=True)
    assert [r["index"] for r in result.rows] == [0, 5, 6]
    assert result.rows[1] == {"index": 5, "input": "q5", "raw": raws[5], "gold": "5",
                              "rationale": "5 = 5.", "label": "5.0"}
    assert result.rows[2]["gold"] is None
    assert {d["index"]: d["reason"] for d in result.dropped} == {
        1: "disagrees_with_gold", 2: "no_answer", 3: "request_failed", 4: "empty_rationale"}
    assert result.stats == {
        "examples": 7, "kept": 3, "failed_requests": 1, "unparsed": 2,
        "unparsed_by_reason": {"empty_rationale": 1, "no_answer": 1},
        "disagrees_with_gold": 1, "filter_gold": True, "with_gold": 6,
        "teacher_accuracy": 3 / 6,  # records 0, 4 and 5
    }
    unfiltered = extract(records, raws, PROMPT, filter_gold=False)
    assert [r["index"] for r in unfiltered.rows] == [0, 1, 5, 6]
    assert unfiltered.stats["disagrees_with_gold"] == 0


@pytest.mark.parametrize(("rationales", "stage", "message"), [
    ({"template": "Question:"}, {}, "needs an `{input}` placeholder"),
    ({"answer_format": "{rationale}"}, {}, r"needs the placeholder\(s\) \{label\}"),
    ({"answer_pattern": "The answer is (.+)"}, {}, "named group `\\(\\?P<label>"),
    ({"answer_pattern": "The answer is (?P<label>"}, {}, "not a valid regular expression"),
    ({"source": "data"}, {"teacher": "big"}, "drop `teacher` and `rationales.http`"),
    ({}, {"teacher": None}, "give a teacher: .*`rationales.source: data`"),
])
def test_spec_checks_the_prompt_settings(rationales: dict, stage: dict, message: str) -> None:
    from pydantic import ValidationError

    from kdspec.spec.stages.step_by_step import StepByStepStage

    fields = {"name": "s", "kind": "step_by_step", "data": "d", "steps": 1, "teacher": "big",
              "rationales": rationales, **stage}
    with pytest.raises(ValidationError, match=message):
        StepByStepStage.model_validate(fields)


def test_eval_prompts_must_name_evaluated_models() -> None:
    from pydantic import ValidationError

    from kdspec.spec.stages.eval import EvalStage

    stage = {"name": "e", "kind": "eval", "models": ["a"], "data": ["d"]}
    assert EvalStage.model_validate({**stage, "prompts": {"a": {}}}).prompts["a"].template == \
        "{input}"
    with pytest.raises(ValidationError, match="`prompts` names b, not in `models`"):
        EvalStage.model_validate({**stage, "prompts": {"b": {}}})
