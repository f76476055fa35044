"""Builtin datasets, the HMM entropy floor and the source readers."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from kdspec.data import (
    DataError,
    arithmetic,
    check_fields,
    hmm,
    load_builtin,
    load_records,
    parse_source,
)
from kdspec.data import _random as rnd
from kdspec.data.builtin import BUILTIN, FIELDS
from kdspec.data.hmm import HiddenMarkovModel, cross_entropy
from kdspec.data.sources import parse_hf, text_documents

# --------------------------------------------------------------------------------------------
# builtin datasets: determinism, splits, fields


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_is_deterministic_and_prefix_stable(name: str) -> None:
    a = load_builtin(name, split="train", n=20, seed=3)
    assert a == load_builtin(name, split="train", n=20, seed=3)
    assert load_builtin(name, split="train", n=7, seed=3) == a[:7]
    assert a != load_builtin(name, split="train", n=20, seed=4)
    assert all(set(r) == set(FIELDS[name]) for r in a)
    assert all(isinstance(v, str) for r in a for v in r.values())


def test_builtin_golden_records() -> None:
    # Pins the generators' output: a change here changes every cached artifact built on them.
    assert load_builtin("arithmetic", split="train", n=1, seed=0)[0] == {
        "input": "Lily has 4 balloons and buys 16 more. How many balloons does Lily have now?",
        "rationale": "Lily starts with 4 balloons. She buys 16 more, so 4 + 16 = 20.",
        "label": "20",
    }
    assert load_builtin("instructions", split="train", n=1, seed=0)[0] == {
        "prompt": "Repeat the word key 11 times.",
        "response": "key key key key key key key key key key key",
    }
    doc = load_builtin("hmm", split="train", n=1, seed=0)[0]["text"].split()
    assert len(doc) == hmm.DOC_TOKENS
    assert doc[:6] == ["kile", "zefu", "sapa", "pidu", "nata", "nemi"]


@pytest.mark.parametrize(("name", "key"), [("arithmetic", "input"), ("instructions", "prompt")])
def test_template_splits_are_disjoint_by_hash(name: str, key: str) -> None:
    train = load_builtin(name, split="train", n=1500, seed=0)
    evals = load_builtin(name, split="eval", n=300, seed=0)
    assert {r[key] for r in train}.isdisjoint(r[key] for r in evals)
    assert all(rnd.split_of(r[key]) == "train" for r in train)
    assert all(rnd.split_of(r[key]) == "eval" for r in evals)


def test_hmm_splits_are_disjoint() -> None:
    train = {r["text"] for r in load_builtin("hmm", split="train", n=40, seed=0)}
    evals = {r["text"] for r in load_builtin("hmm", split="eval", n=40, seed=0)}
    assert len(train) == len(evals) == 40 and train.isdisjoint(evals)


def _arithmetic_kind(question: str) -> str:
    return next(k for k, p in _QUESTION_PATTERNS.items() if p.fullmatch(question))


def test_splits_share_one_distribution() -> None:
    # Same template mix in train and eval: the hash partition does not favour any template.
    train = Counter(
        _arithmetic_kind(r["input"]) for r in load_builtin("arithmetic", split="train", n=2000)
    )
    evals = Counter(
        _arithmetic_kind(r["input"]) for r in load_builtin("arithmetic", split="eval", n=2000)
    )
    for kind in _QUESTION_PATTERNS:
        assert abs(train[kind] - evals[kind]) / 2000 < 0.05, (kind, train, evals)


def test_builtin_errors() -> None:
    with pytest.raises(DataError, match="unknown split 'test'; builtin datasets have train, eval"):
        load_builtin("hmm", split="test", n=1)
    with pytest.raises(DataError, match="did you mean 'arithmetic'"):
        load_builtin("arithmetc", split="train", n=1)
    with pytest.raises(DataError, match="n must be >= 0"):
        load_builtin("instructions", split="train", n=-1)


# --------------------------------------------------------------------------------------------
# arithmetic: the labels and rationales are right

_NAME, _OBJ = r"(?P<name>[A-Z][a-z]+)", r"(?P<obj>[a-z]+)"
_QUESTION_PATTERNS = {
    "add": re.compile(
        rf"{_NAME} has (?P<a>\d+) {_OBJ} and buys (?P<b>\d+) more\. "
        r"How many (?P=obj) does (?P=name) have now\?"
    ),
    "sub": re.compile(
        rf"{_NAME} has (?P<a>\d+) {_OBJ} and gives away (?P<b>\d+)\. "
        r"How many (?P=obj) does (?P=name) have left\?"
    ),
    "mul": re.compile(
        rf"{_NAME} has (?P<a>\d+) boxes with (?P<b>\d+) {_OBJ} in each box\. "
        r"How many (?P=obj) does (?P=name) have\?"
    ),
    "two": re.compile(
        rf"{_NAME} has (?P<a>\d+) {_OBJ}\. (?:He|She) buys (?P<b>\d+) more and then gives away "
        r"(?P<c>\d+)\. How many (?P=obj) does (?P=name) have now\?"
    ),
}
_ANSWER = {
    "add": lambda a, b, c: a + b,
    "sub": lambda a, b, c: a - b,
    "mul": lambda a, b, c: a * b,
    "two": lambda a, b, c: a + b - c,
}
_EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def test_arithmetic_labels_and_rationales_are_correct() -> None:
    records = load_builtin("arithmetic", split="train", n=400, seed=1)
    records += load_builtin("arithmetic", split="eval", n=100, seed=1)
    kinds = Counter()
    for r in records:
        kind = _arithmetic_kind(r["input"])
        kinds[kind] += 1
        m = _QUESTION_PATTERNS[kind].fullmatch(r["input"])
        a, b, c = (int(m.group(g)) if g in m.groupdict() else 0 for g in "abc")
        answer = _ANSWER[kind](a, b, c)
        assert r["label"] == str(answer)
        assert 0 <= answer <= arithmetic.NUMBER_MAX
        equations = _EQUATION.findall(r["rationale"])
        assert equations, r["rationale"]
        for x, op, y, z in equations:  # every step of the rationale is true arithmetic
            assert _OPS[op](int(x), int(y)) == int(z)
        assert equations[-1][3] == r["label"]  # and the last step is the answer
        assert r["rationale"].startswith(m.group("name") + " ")
    assert set(kinds) == set(_QUESTION_PATTERNS)


# --------------------------------------------------------------------------------------------
# instructions: each response is the one correct answer

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _expected_response(prompt: str) -> str:
    """An independent solver for the six instruction tasks."""
    if m := re.fullmatch(r"Reverse the order of these words: ([a-z ]+)\.", prompt):
        return " ".join(reversed(m.group(1).split()))
    if m := re.fullmatch(r"Sort these numbers from smallest to largest: ([\d ]+)\.", prompt):
        return " ".join(map(str, sorted(int(x) for x in m.group(1).split())))
    if m := re.fullmatch(r"Repeat the word ([a-z]+) (\d+) times\.", prompt):
        return " ".join([m.group(1)] * int(m.group(2)))
    if m := re.fullmatch(
        r"Write the (\d+) letters that come after ([a-z]) in the alphabet\.", prompt
    ):
        i = _LETTERS.index(m.group(2))
        return " ".join(_LETTERS[i + 1 : i + 1 + int(m.group(1))])
    if m := re.fullmatch(
        r"Copy these words, but write (\w+) instead of (\w+): ([a-z ]+)\.", prompt
    ):
        new, old, words = m.groups()
        assert old in words.split()
        return " ".join(new if w == old else w for w in words.split())
    if m := re.fullmatch(r"Count from (\d+) to (\d+)\.", prompt):
        return " ".join(map(str, range(int(m.group(1)), int(m.group(2)) + 1)))
    raise AssertionError(f"unknown task: {prompt}")


def test_instruction_responses_are_correct() -> None:
    records = load_builtin("instructions", split="train", n=400, seed=2)
    records += load_builtin("instructions", split="eval", n=100, seed=2)
    for r in records:
        assert r["response"] == _expected_response(r["prompt"])
        assert 5 <= len(r["response"].split()) <= 15
    first_words = Counter(r["prompt"].split()[0] for r in records)
    assert set(first_words) == {"Reverse", "Sort", "Repeat", "Write", "Copy", "Count"}


# --------------------------------------------------------------------------------------------
# HMM: the forward algorithm and the language


def _hmm(initial, transition, emission) -> HiddenMarkovModel:
    words = tuple(f"w{i}" for i in range(len(emission[0])))
    return HiddenMarkovModel(
        words, tuple(initial), tuple(map(tuple, transition)), tuple(map(tuple, emission))
    )


def test_deterministic_hmm_has_zero_entropy() -> None:
    # A 3-cycle that emits one word per state, starting in state 0: every token is certain.
    model = _hmm([1, 0, 0], [[0, 1, 0], [0, 0, 1], [1, 0, 0]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    doc = model.sample(rnd.derive_rng("t"), 30)
    assert doc == [0, 1, 2] * 10
    assert cross_entropy(model, [doc]) == 0.0


def test_uniform_emission_hmm_has_entropy_log_v() -> None:
    v = 7
    model = _hmm([0.3, 0.7], [[0.9, 0.1], [0.5, 0.5]], [[1 / v] * v] * 2)
    docs = [model.sample(rnd.derive_rng("u", i), 50) for i in range(3)]
    assert cross_entropy(model, docs) == pytest.approx(math.log(v), abs=1e-12)


def test_forward_matches_hand_computation() -> None:
    # Two sticky states, emissions 0.9/0.1. p(x0 = 0) = 0.5; the belief after x0 = 0 is
    # (0.9, 0.1), so p(x1 = 0 | x0) = 0.9 * 0.9 + 0.1 * 0.1 = 0.82.
    model = _hmm([0.5, 0.5], [[1, 0], [0, 1]], [[0.9, 0.1], [0.1, 0.9]])
    assert model.log_likelihood_terms([0, 0]) == pytest.approx([-math.log(0.5), -math.log(0.82)])
    assert cross_entropy(model, [[0, 0]]) == pytest.approx(-(math.log(0.5) + math.log(0.82)) / 2)


def test_forward_matches_brute_force_path_sum() -> None:
    # Independent reference: p(doc) = sum over all state paths of the joint probability.
    rng = rnd.derive_rng("brute")
    k, v = 3, 4
    model = _hmm(
        rnd.dirichlet(rng, 1.0, k),
        [rnd.dirichlet(rng, 0.7, k) for _ in range(k)],
        [rnd.dirichlet(rng, 0.7, v) for _ in range(k)],
    )
    doc = [0, 3, 1, 1, 2]
    total = 0.0
    for path in itertools.product(range(k), repeat=len(doc)):
        p = model.initial[path[0]] * model.emission[path[0]][doc[0]]
        for t in range(1, len(doc)):
            p *= model.transition[path[t - 1]][path[t]] * model.emission[path[t]][doc[t]]
        total += p
    assert sum(model.log_likelihood_terms(doc)) == pytest.approx(-math.log(total), rel=1e-12)


def test_sampling_follows_the_model() -> None:
    # Stationary two-state chain: word frequencies match the marginal sum_i pi_i E[i][w].
    model = _hmm([2 / 3, 1 / 3], [[0.9, 0.1], [0.2, 0.8]], [[0.8, 0.2], [0.1, 0.9]])
    doc = model.sample(rnd.derive_rng("freq"), 20000)
    expected = 2 / 3 * 0.8 + 1 / 3 * 0.1
    assert doc.count(0) / len(doc) == pytest.approx(expected, abs=0.02)


def test_hmm_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"emission\[1\] must be 2 probabilities summing to 1"):
        _hmm([0.5, 0.5], [[1, 0], [0, 1]], [[0.5, 0.5], [0.5, 0.6]])
    with pytest.raises(ValueError, match="probability 0"):
        _hmm([1, 0], [[1, 0], [0, 1]], [[1, 0], [0, 1]]).log_likelihood_terms([1])


def test_builtin_language_shape_and_floor() -> None:
    model = hmm.language()
    assert model is hmm.language()  # built once
    assert model.n_states == hmm.N_STATES == 48 and len(model.words) == hmm.N_WORDS == 256
    assert all(sum(1 for p in row if p) == hmm.SUCCESSORS for row in model.transition)
    # Every word can be emitted, so the vocabulary has no dead words.
    assert all(any(row[w] for row in model.emission) for w in range(hmm.N_WORDS))
    # Backs the docstring's bound on a document's probability (split disjointness).
    assert max(max(row) for row in model.emission) < 0.43
    docs = hmm.sample_documents(seed=0, split="eval", n=16)
    floor = cross_entropy(model, docs)
    marginal = list(zip(model.initial, model.emission, strict=True))
    unigram = [sum(p * row[w] for p, row in marginal) for w in range(hmm.N_WORDS)]
    unigram_ce = -sum(math.log(unigram[w]) for d in docs for w in d) / (16 * hmm.DOC_TOKENS)
    # Real entropy, well below both a uniform guess and the best context-free predictor.
    assert 2.5 < floor < unigram_ce - 1.0 < math.log(256)
    assert hmm.entropy_floor(n_docs=16) == pytest.approx(floor)


# --------------------------------------------------------------------------------------------
# seeded randomness


def test_gamma_and_dirichlet_moments() -> None:
    rng = rnd.derive_rng("gamma")
    for shape in (0.3, 1.0, 4.0):
        draws = [rnd.gamma(rng, shape) for _ in range(20000)]
        mean = sum(draws) / len(draws)
        var = sum((x - mean) ** 2 for x in draws) / len(draws)
        assert mean == pytest.approx(shape, rel=0.05)  # Gamma(k, 1): mean k, variance k
        assert var == pytest.approx(shape, rel=0.1)
    vec = rnd.dirichlet(rng, 0.5, 10)
    assert len(vec) == 10 and sum(vec) == pytest.approx(1.0) and min(vec) >= 0


def test_small_draws() -> None:
    rng = rnd.derive_rng("draws")
    assert {rnd.randint(rng, 2, 4) for _ in range(200)} == {2, 3, 4}
    picked = rnd.sample(rng, range(10), 10)
    assert sorted(picked) == list(range(10))
    assert rnd.derive_rng("a", 1).random() == rnd.derive_rng("a", 1).random()
    assert rnd.derive_rng("a", 1).random() != rnd.derive_rng("a", 2).random()


# --------------------------------------------------------------------------------------------
# source strings


def test_parse_source() -> None:
    assert parse_source("builtin:hmm") == ("builtin", "hmm")
    assert parse_source("jsonl:data/x.jsonl") == ("jsonl", "data/x.jsonl")
    assert parse_source("hf:gsm8k:main") == ("hf", "gsm8k:main")
    assert parse_hf("gsm8k:main") == ("gsm8k", "main")
    assert parse_hf("org/name") == ("org/name", None)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("data.jsonl", "has no scheme; expected builtin:NAME, jsonl:PATH"),
        ("json:x.jsonl", "unknown scheme 'json'; .* did you mean 'jsonl'"),
        ("text:", "nothing after 'text:'"),
        ("builtin:instruction", "unknown builtin dataset 'instruction'.*'instructions'"),
        ("hf:a:b:c", "expected hf:NAME or hf:NAME:CONFIG"),
    ],
)
def test_parse_source_errors(source: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_source(source)


# --------------------------------------------------------------------------------------------
# readers


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_with_field_mapping_and_base_dir(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(5)]
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "qa.jsonl", rows)
    with (tmp_path / "data" / "qa.jsonl").open("a") as handle:
        handle.write("\n   \n")  # blank lines are skipped
    records = load_records(
        "jsonl:data/qa.jsonl",
        fields={"prompt": "question", "response": "answer"},
        base_dir=tmp_path,
        n=3,
    )
    assert records == [{"id": i, "prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    assert len(load_records(f"jsonl:{tmp_path / 'data' / 'qa.jsonl'}")) == 5  # absolute path


def test_jsonl_gzip(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "x.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write('{"text": "héllo"}\n')
    assert load_records("jsonl:x.jsonl.gz", base_dir=tmp_path) == [{"text": "héllo"}]


def test_missing_field_names_available_columns(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "x.jsonl", [{"q": "a", "answer": "b"}])
    with pytest.raises(DataError) as err:
        load_records("jsonl:x.jsonl", fields={"prompt": "question"}, base_dir=tmp_path)
    assert str(err.value) == (
        "data source 'jsonl:x.jsonl': record 0 has no column 'question' "
        "(fields maps prompt <- question); available columns: q, answer"
    )


def test_check_fields_suggests_a_mapping() -> None:
    with pytest.raises(DataError) as err:
        check_fields([{"prompt": "p", "responses": "r"}], ("prompt", "response"), "jsonl:x")
    assert str(err.value) == (
        "data source 'jsonl:x': record 0 has no field 'response'; available columns: prompt, "
        "responses; map one with `fields: {response: responses}`"
    )
    check_fields([{"prompt": "p", "response": "r"}], ("prompt", "response"), "jsonl:x")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_records("jsonl:nope.jsonl", base_dir=tmp_path)
    assert str(err.value) == (
        f"data source 'jsonl:nope.jsonl': {tmp_path / 'nope.jsonl'} does not exist "
        f"(relative paths resolve against {tmp_path})"
    )
    with pytest.raises(DataError, match="is a folder, not a file"):
        load_records(f"text:{tmp_path}")


def test_bad_jsonl_lines(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2:7: invalid JSON: Expecting value$"):
        load_records("jsonl:bad.jsonl", base_dir=tmp_path)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"list\.jsonl:1: expected a JSON object per line, got list"
    ):
        load_records("jsonl:list.jsonl", base_dir=tmp_path)
    (tmp_path / "latin.jsonl").write_bytes(b'{"a": "\xe9"}\n')
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_records("jsonl:latin.jsonl", base_dir=tmp_path)


def test_text_documents() -> None:
    assert list(text_documents(["a b\n", "c\r\n", "\n", "\n", "d\n", "  \n"])) == ["a b\nc", "d"]
    assert list(text_documents(["one\n", "two\n", "three"])) == ["one", "two", "three"]
    assert list(text_documents([])) == []


def test_text_reader(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("first doc\nline two\n\nsecond doc\n\n\nthird\n", "utf-8")
    assert load_records("text:c.txt", base_dir=tmp_path, n=2) == [
        {"text": "first doc\nline two"},
        {"text": "second doc"},
    ]
    records = load_records("text:c.txt", base_dir=tmp_path, fields={"prompt": "text"})
    assert records[-1] == {"prompt": "third"}


def test_builtin_through_load_records() -> None:
    records = load_records(
        "builtin:arithmetic", split="eval", n=3, seed=5, fields={"question": "input"}
    )
    expected = load_builtin("arithmetic", split="eval", n=3, seed=5)
    assert [r["question"] for r in records] == [r["input"] for r in expected]
    assert "input" not in records[0]
    assert len(load_records("builtin:arithmetic")) == 1000  # the default n


def test_parquet_reader(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"q": ["x", "y", "z"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    records = load_records("parquet:t.parquet", base_dir=tmp_path, n=2, fields={"prompt": "q"})
    assert records == [{"n": 1, "prompt": "x"}, {"n": 2, "prompt": "y"}]
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read .*junk.parquet as parquet"):
        load_records("parquet:junk.parquet", base_dir=tmp_path)


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(DataError, match="needs the `pyarrow.parquet` package: pip install pyarrow"):
        load_records("parquet:t.parquet", base_dir=tmp_path)


def _fake_datasets(splits: dict[str, list[dict]]) -> types.ModuleType:
    """A stand-in for the `datasets` package: no hub is reachable from the tests."""

    class FakeDataset(list):
        def select(self, indices):
            return FakeDataset(self[i] for i in indices)

    module = types.ModuleType("datasets")
    module.calls = []
    module.get_dataset_split_names = lambda name, config=None: list(splits)

    def load_dataset(name, config=None, split=None):
        module.calls.append((name, config, split))
        return FakeDataset(splits[split])

    module.load_dataset = load_dataset
    return module


def test_hf_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_datasets({"train": [{"q": "a"}, {"q": "b"}], "validation": [{"q": "v"}]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_records("hf:org/set:main", n=1, fields={"prompt": "q"}) == [{"prompt": "a"}]
    assert load_records("hf:org/set", split="eval") == [{"q": "v"}]  # eval -> validation
    assert fake.calls == [("org/set", "main", "train"), ("org/set", None, "validation")]
    with pytest.raises(DataError, match="no split 'test'; the dataset has train, validation"):
        load_records("hf:org/set", split="test")


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="needs the `datasets` package: pip install datasets"):
        load_records("hf:gsm8k:main")
