"""Few-shot chain-of-thought prompts, answer parsing, gold filtering and the training tasks.

Pure Python (no torch), shared by the rationales node, the training objective and evaluation.

**Prompt.** Each demonstration is written as ``template`` (``{input}`` replaced by its question)
followed by ``answer_format`` (``{rationale}`` and ``{label}`` replaced), demonstrations are
separated by a blank line, and the question's own ``template`` comes last::

    Q: Jack had 8 pens and gave 3 away. How many pens does Jack have now?
    A: Jack starts with 8 pens. He gives away 3, so 8 - 3 = 5. The answer is 5.

    Q: <input>
    A:

Placeholders are replaced literally, so braces elsewhere (JSON in a question) are kept. An HTTP
(chat) teacher gets the same text as turns: each demonstration's question as a user message and
its answer as the assistant's reply, then the question.

**Parsing** (`FewShot.parse`). A completion model keeps writing the next demonstration after its
answer, so the generation is first cut where it starts a new question: at the first occurrence of
the template's text before ``{input}`` (``Q:`` above), as the official code cuts its teacher
outputs at ``Q:``. Then ``answer_pattern`` is searched; its first match gives the label (the
``label`` group, stripped) and the text before the match is the rationale (stripped). Failures
are named: ``no_answer`` (no match), ``empty_label`` (nothing left after the accuracy metric's
normalisation, e.g. ``"."``), ``empty_rationale``. (The official code
keeps an unparsable output as rationale ``" "``; kdspec drops it and counts it.)

**Gold filter.** A parsed label agrees with a gold label when they are equal after the accuracy
metric's normalisation (`kdspec.metrics.exact_match`: case, spacing and trailing punctuation
ignored, numbers compared as numbers).

**Tasks** (`training_tasks`), one (prompt, target) pair per task and example:

* multitask: ``predict`` = (predict prefix + input, label) and ``explain`` = (explain prefix +
  input, rationale), as the official code's ``task_prefix`` model;
* single_task: ``single`` = (predict prefix + input, answer_format filled in, stripped);
* label_only (an ``sft`` stage with ``labels_from``): ``label`` = (input, label), the official
  ``standard`` model (no prefix).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdspec.metrics import exact_match, normalize_answer

__all__ = [
    "Demo",
    "FewShot",
    "Parse",
    "agrees_with_gold",
    "load_demonstrations",
    "training_tasks",
]

DEMO_SEPARATOR = "\n\n"
Variant = Literal["multitask", "single_task", "label_only"]


@dataclass(frozen=True)
class Demo:
    """One few-shot example."""

    input: str
    rationale: str
    label: str


@dataclass(frozen=True)
class Parse:
    """A parsed generation: `failure` is None when both parts were found."""

    rationale: str
    label: str
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def load_demonstrations(value: Sequence[Mapping[str, Any]] | str, spec_dir: Path) -> list[Demo]:
    """Inline demonstrations, or a JSONL file (one `{input, rationale, label}` per line)
    relative to the spec's folder. A bad line is reported with its file and line number."""
    if not isinstance(value, str):
        return [Demo(str(d["input"]), str(d["rationale"]), str(d["label"])) for d in value]
    path = Path(value).expanduser()
    path = path if path.is_absolute() else spec_dir / path
    if not path.is_file():
        raise FileNotFoundError(f"demonstrations file {path} does not exist (relative paths "
                                "resolve against the spec's folder)")
    demos = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            demos.append(Demo(*(str(record[k]) for k in ("input", "rationale", "label"))))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: expected a JSON object with input, rationale "
                             f"and label ({type(err).__name__}: {err})") from err
    return demos


@dataclass(frozen=True)
class FewShot:
    """A few-shot prompt and its answer reader (module doc); built from a spec `FewShotPrompt`
    (`RationaleConfig`, `EvalPrompt`) dump with `from_config`."""

    template: str
    demonstrations: tuple[Demo, ...] = ()
    answer_format: str = " {rationale} The answer is {label}."
    answer_pattern: str | None = r"The answer is\s*(?P<label>.+?)\s*\.?\s*$"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], spec_dir: Path) -> FewShot:
        demos = load_demonstrations(config.get("demonstrations") or [], spec_dir)
        return cls(config["template"], tuple(demos), config["answer_format"],
                   config.get("answer_pattern"))

    @property
    def stop(self) -> str:
        """The text that opens a question: the template before `{input}`, stripped."""
        return self.template.split("{input}", 1)[0].strip()

    def question(self, input_text: str) -> str:
        return self.template.replace("{input}", input_text)

    def answer(self, rationale: str, label: str) -> str:
        return self.answer_format.replace("{rationale}", rationale).replace("{label}", label)

    def render(self, input_text: str) -> str:
        """The whole prompt for one question: demonstrations, then the question."""
        shots = [self.question(d.input) + self.answer(d.rationale, d.label)
                 for d in self.demonstrations]
        return DEMO_SEPARATOR.join([*shots, self.question(input_text)])

    def messages(self, input_text: str) -> list[dict[str, str]]:
        """The prompt as chat turns (demonstrations as user/assistant pairs)."""
        turns = []
        for d in self.demonstrations:
            answer = self.answer(d.rationale, d.label).strip()
            turns.append({"role": "user", "content": self.question(d.input).strip()})
            turns.append({"role": "assistant", "content": answer})
        turns.append({"role": "user", "content": self.question(input_text).strip()})
        return turns

    def cut(self, text: str) -> str:
        """The generation up to where it starts a new question."""
        stop = self.stop
        return text.split(stop, 1)[0] if stop else text

    def parse(self, text: str) -> Parse:
        """Rationale and label of a generation (module doc)."""
        if self.answer_pattern is None:
            raise ValueError("this prompt has no answer_pattern to parse with")
        text = self.cut(text)
        match = re.search(self.answer_pattern, text)
        if match is None:
            return Parse("", "", "no_answer")
        label = (match.group("label") or "").strip()
        rationale = text[: match.start()].strip()
        if not normalize_answer(label):  # nothing, or punctuation only
            return Parse(rationale, "", "empty_label")
        if not rationale:
            return Parse("", label, "empty_rationale")
        return Parse(rationale, label)

    def prediction(self, text: str) -> str:
        """The answer a generation gives, for accuracy: the whole (stripped) generation without
        an answer_pattern, else the pattern's label (empty when it does not match)."""
        if self.answer_pattern is None:
            return text.strip()
        match = re.search(self.answer_pattern, self.cut(text))
        return (match.group("label") or "").strip() if match else ""

    def check_demonstrations(self) -> None:
        """Every demonstration's answer must parse back to its own rationale and label: else the
        teacher, imitating them, would write answers the parser cannot read."""
        for i, d in enumerate(self.demonstrations):
            got = self.parse(self.answer(d.rationale, d.label))
            if not got.ok or got.rationale != d.rationale.strip() or \
                    not exact_match(got.label, d.label):
                raise ValueError(
                    f"demonstration {i} ({d.input[:40]!r}...) does not parse back with "
                    f"answer_pattern {self.answer_pattern!r} after answer_format "
                    f"{self.answer_format!r}: got rationale {got.rationale!r}, label "
                    f"{got.label!r} ({got.failure or 'mismatch'}); make the two agree")


def agrees_with_gold(label: str, gold: str) -> bool:
    """The gold filter's test: equal under the accuracy metric's normalisation."""
    return exact_match(label, gold)


def training_tasks(record: Mapping[str, Any], variant: Variant, *, predict: str = "predict: ",
                   explain: str = "explain: ",
                   answer_format: str = " {rationale} The answer is {label}.",
                   ) -> dict[str, tuple[str, str]]:
    """The (prompt, target) pair of each task for one `{input, rationale, label}` record."""
    text, label = str(record["input"]), str(record["label"])
    if variant == "label_only":
        return {"label": (text, label)}
    rationale = str(record["rationale"])
    if variant == "single_task":
        target = answer_format.replace("{rationale}", rationale).replace("{label}", label)
        return {"single": (predict + text, target.strip())}
    return {"predict": (predict + text, label), "explain": (explain + text, rationale)}
