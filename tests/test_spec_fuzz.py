"""Property test: whatever a spec's text or overrides are, loading either succeeds or raises
`SpecError` whose diagnostics all have a location; never any other exception."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdspec.spec.errors import KeyPath, SpecError
from kdspec.spec.loader import LoadedSpec, load_spec, parse_spec_text
from kdspec.spec.yaml_nodes import iter_located, parse_yaml, to_plain

VALID = """\
kdspec: 1
name: fuzz
models:
  teacher: {preset: gpt2}
  student:
    arch: {family: llama, d_model: 64, n_layers: 2, n_heads: 4, d_ff: 128}
data:
  corpus: {source: "builtin:hmm", n: 1K}
hardware: {accelerator: cpu, count: 2, parallelism: {data: 2}}
stages:
  - name: distill
    kind: pretrain_kd
    student: student
    teacher: teacher
    data: corpus
    tokens: 2M
    optimizer: {lr: 1e-4, betas: [0.9, 0.95]}
    loss: {divergence: jsd, temperature: 2.0}
    teacher_cache: {mode: topk, k: 8}
  - name: sbs
    kind: step_by_step
    teacher: teacher
    data: corpus
    steps: 10
    rationales:
      demonstrations: [{input: a, rationale: b, label: c}]
  - {name: polish, kind: minillm, teacher: teacher, data: corpus, steps: 5, after: [sbs]}
  - {name: check, kind: eval, models: [polish], data: [corpus], metrics: [perplexity]}
"""
VALID_NODE, _ = parse_yaml(VALID, "valid.yaml")
VALID_DATA: dict[str, Any] = to_plain(VALID_NODE)
PATHS: list[KeyPath] = [p for p, _ in iter_located(VALID_NODE) if p]
FIELD_NAMES = sorted({str(p[-1]) for p in PATHS if isinstance(p[-1], str)} | {"extends", "kind"})
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**15), st.floats(),
    st.text(max_size=12), st.sampled_from(["2M", "1e-4", "on", "pretrain", "hf:x", "builtin:"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)), inner,
                        max_size=3),
    ),
    max_leaves=8,
)


def _paths(data: Any, path: KeyPath = ()) -> Iterator[KeyPath]:
    """Every key path below `data` (a plain YAML value)."""
    items = data.items() if isinstance(data, dict) else (
        enumerate(data) if isinstance(data, list) else ())
    for key, value in items:
        yield (*path, key)
        yield from _paths(value, (*path, key))


def _parent(data: Any, path: KeyPath) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated_data(draw: st.DrawFn) -> dict[str, Any]:
    """The valid spec with a few keys deleted, inserted or given random values."""
    data = copy.deepcopy(VALID_DATA)
    for _ in range(draw(st.integers(1, 4))):
        live = list(_paths(data))[::-1]  # hypothesis favours early items: deep keys, not `kdspec`
        if not live:
            break
        path = draw(st.sampled_from(live))
        parent, key = _parent(data, path), path[-1]
        op = draw(st.sampled_from(["delete", "replace", "insert"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(values)
        elif isinstance(parent[key], dict):
            parent[key][draw(st.sampled_from(FIELD_NAMES))] = draw(values)
    return data


@st.composite
def mutated_text(draw: st.DrawFn, text: str) -> str:
    """Text edits: duplicated lines (duplicate keys), random characters, cut slices."""
    for _ in range(draw(st.integers(0, 3))):
        lines = text.split("\n")
        op = draw(st.sampled_from(["duplicate", "insert", "cut"]))
        at = draw(st.integers(0, len(lines) - 1))
        if op == "duplicate":
            lines.insert(at, lines[at])
            text = "\n".join(lines)
        elif op == "insert":
            pos = draw(st.integers(0, len(text)))
            text = text[:pos] + draw(st.text(max_size=6)) + text[pos:]
        else:
            pos = draw(st.integers(0, len(text)))
            text = text[:pos] + text[pos + draw(st.integers(0, 20)):]
    return text


def _dotted(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


overrides = st.lists(
    st.builds(
        lambda key, value: f"{key}={value}",
        st.one_of(st.sampled_from([_dotted(p) for p in PATHS]), st.text(max_size=12)),
        st.one_of(st.text(max_size=10), st.sampled_from(["[1, 2", "{a: 1}", "3", "", "x: y"])),
    ),
    max_size=2,
)


def _check(load) -> None:
    try:
        loaded = load()
    except SpecError as err:
        assert err.diagnostics
        for diagnostic in err.diagnostics:  # the file exists, so every problem has a place
            assert diagnostic.message and diagnostic.location is not None, diagnostic.format()
        assert str(err)
    else:
        assert isinstance(loaded, LoadedSpec)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")  # `extends:` in fuzzed text reads from here only


def test_the_valid_spec_loads() -> None:
    assert parse_spec_text(VALID).spec.name == "fuzz"


@FUZZ
@given(data=mutated_data(), sets=overrides)
def test_mutated_data(folder: Path, data: dict[str, Any], sets: list[str]) -> None:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    _check(lambda: parse_spec_text(text, str(folder / "spec.yaml"), sets))


@FUZZ
@given(st.data())
def test_mutated_text(folder: Path, data: st.DataObject) -> None:
    text = data.draw(mutated_text(VALID))
    _check(lambda: parse_spec_text(text, str(folder / "spec.yaml")))


@settings(max_examples=50, deadline=None)
@given(noise=st.binary(max_size=16), at=st.integers(0, len(VALID)))
def test_random_bytes_in_a_file(folder: Path, noise: bytes, at: int) -> None:
    raw = VALID.encode()
    path = folder / "bytes.yaml"
    path.write_bytes(raw[:at] + noise + raw[at:])
    _check(lambda: load_spec(path))
