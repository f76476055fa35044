"""The spec loader: YAML 1.2 scalars, duplicate keys, `extends`, `--set`, located errors."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from kdspec.spec import loader
from kdspec.spec.errors import Location, SpecError
from kdspec.spec.loader import load_spec, parse_spec_text
from kdspec.spec.root import Spec
from kdspec.spec.suggest import unwrap
from kdspec.spec.yaml_nodes import parse_yaml, to_plain

SPEC = """\
kdspec: 1
name: tiny
description: on
models:
  teacher: {preset: gpt2}
  student:
    arch: {family: gpt2, d_model: 64, n_layers: 2, n_heads: 4, d_ff: 256}
data:
  corpus: {source: "builtin:hmm"}
stages:
  - name: distill
    kind: pretrain_kd
    student: student
    teacher: teacher
    data: corpus
    tokens: 2M
    optimizer:
      lr: 1e-4
      betas: [0.9, 0.95]
    loss: {temperature: 2.0}
  - name: polish
    kind: sft
    data: corpus
    steps: 100
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def errors_of(call, *args, **kwargs) -> list[str]:
    with pytest.raises(SpecError) as caught:
        call(*args, **kwargs)
    return [d.format() for d in caught.value.diagnostics]


def scalar(text: str) -> object:
    node, problems = parse_yaml(f"v: {text}\n", "t.yaml")
    assert not problems
    return to_plain(node)["v"]


# --- YAML 1.2 core schema --------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("3.0e-4", 3.0e-4), ("1E5", 1e5), ("-2.5", -2.5), (".5", 0.5), ("5.", 5.0),
    ("12", 12), ("+12", 12), ("-7", -7), ("017", 17), ("0x1F", 31), ("0o17", 15),
    ("true", True), ("False", False), ("TRUE", True),
    ("null", None), ("~", None), ("", None),
    ("on", "on"), ("off", "off"), ("yes", "yes"), ("no", "no"), ("y", "y"), ("Y", "Y"),
    ("1_000", "1_000"), ("0b101", "0b101"), ("2M", "2M"), ("'1e-4'", "1e-4"), ('"true"', "true"),
    ("12:30", "12:30"), ("2024-01-01", "2024-01-01"),
])
def test_yaml_12_scalars(text: str, value: object) -> None:
    got = scalar(text)
    assert got == value and type(got) is type(value)


def test_yaml_12_special_floats() -> None:
    assert scalar(".inf") == math.inf and scalar("-.Inf") == -math.inf
    assert math.isnan(scalar(".NaN"))


def test_numbers_and_strings_reach_the_spec_with_their_yaml_types() -> None:
    loaded = parse_spec_text(SPEC, "spec.yaml")
    assert loaded.spec.stages[0].optimizer.lr == 1e-4
    assert loaded.spec.description == "on"
    assert loaded.spec.stages[0].tokens == 2_000_000
    json.dumps(loaded.data)  # plain data, ready to record in a run directory


def test_a_quoted_number_is_not_silently_a_float() -> None:
    text = SPEC.replace("lr: 1e-4", 'lr: "1e-4"')
    assert errors_of(parse_spec_text, text, "spec.yaml") == [
        "spec.yaml:18:11: error: stages[0].optimizer.lr: expected a number, got '1e-4' "
        "(remove the quotes to write a number)"]


def test_an_integer_is_accepted_for_a_float() -> None:
    loaded = parse_spec_text(SPEC.replace("lr: 1e-4", "lr: 1"), "spec.yaml")
    assert loaded.spec.stages[0].optimizer.lr == 1.0


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_infinite_and_nan_floats_are_refused(value: str) -> None:
    text = SPEC.replace("lr: 1e-4", f"lr: {value}")
    assert errors_of(parse_spec_text, text, "s.yaml")[0].startswith(
        "s.yaml:18:11: error: stages[0].optimizer.lr: expected a finite number, got ")


def _container_types(tp: object, seen: set) -> set:
    """Every generic container (list, dict, tuple, ...) reachable from a schema type."""
    tp = unwrap(tp)
    found: set = set()
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp not in seen:
            seen.add(tp)
            for field in tp.model_fields.values():
                found |= _container_types(field.annotation, seen)
        return found
    if get_origin(tp) not in (None, Literal, Union, types.UnionType):
        found.add(get_origin(tp))
    for arg in get_args(tp):
        found |= _container_types(arg, seen)
    return found


def test_the_schema_uses_only_containers_that_yaml_produces() -> None:
    # Strict validation refuses a list where a tuple or set is declared, and YAML gives lists.
    assert _container_types(Spec, set()) == {list, dict}


# --- duplicate keys --------------------------------------------------------------------------


def test_every_duplicate_key_is_refused_with_both_lines() -> None:
    text = SPEC.replace("name: tiny\n", "name: tiny\nseed: 1\nname: again\n").replace(
        "    steps: 100\n", "    steps: 100\n    steps: 200\n")
    assert errors_of(parse_spec_text, text, "spec.yaml") == [
        "spec.yaml:4:1: error: name: duplicate key `name` at lines 2 and 4 (delete one of them)",
        "spec.yaml:27:5: error: stages[1].steps: duplicate key `steps` at lines 26 and 27 "
        "(delete one of them)",
    ]


def test_duplicates_inside_flow_mappings_are_refused() -> None:
    text = SPEC.replace("{temperature: 2.0}", "{temperature: 2.0, temperature: 1.0}")
    assert errors_of(parse_spec_text, text, "s.yaml") == [
        "s.yaml:20:30: error: stages[0].loss.temperature: duplicate key `temperature` at lines "
        "20 and 20 (delete one of them)"]


# --- exact locations -------------------------------------------------------------------------


def test_errors_name_exact_line_and_column_in_a_multi_line_spec() -> None:
    text = (SPEC.replace("    tokens: 2M\n", "    tokens: 2M\n    tokns: 3\n")
            .replace("      lr: 1e-4", "      lr: -1")
            .replace("kind: sft", "kind: sftt"))
    with pytest.raises(SpecError) as caught:
        parse_spec_text(text, "multi.yaml")
    found = {(d.path, d.location) for d in caught.value.diagnostics}
    assert found == {
        (("stages", 0, "tokns"), Location("multi.yaml", 17, 5)),
        (("stages", 0, "optimizer", "lr"), Location("multi.yaml", 19, 11)),
        (("stages", 1, "kind"), Location("multi.yaml", 23, 11)),
    }
    # Reported in file order, each naming what was expected.
    assert [d.location.line for d in caught.value.diagnostics] == [17, 19, 23]
    assert "did you mean `tokens`?" in caught.value.diagnostics[0].hint
    assert caught.value.diagnostics[1].message == "expected more than 0, got -1"
    assert caught.value.diagnostics[2].message == "unknown stage kind `sftt`"


def test_locate_finds_values_keys_and_nearest_ancestors() -> None:
    loaded = parse_spec_text(SPEC, "spec.yaml")
    assert loaded.locate(("stages", 0, "optimizer", "betas", 1)) == Location("spec.yaml", 19, 20)
    assert loaded.locate_key(("stages", 1, "steps")) == Location("spec.yaml", 24, 5)
    assert loaded.locate(("stages", 1, "steps")) == Location("spec.yaml", 24, 12)
    # Not written (a default): the nearest written ancestor, the stage's mapping.
    assert loaded.locate(("stages", 1, "optimizer", "lr")) == Location("spec.yaml", 21, 5)
    assert loaded.locate(()) == Location("spec.yaml", 1, 1)


# --- files, versions -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    expected = f"error: <root>: cannot read `{missing}`: no such file"
    assert errors_of(load_spec, missing) == [expected]


def test_non_utf8_file_is_located(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes("kdspec: 1\nname: é".encode() + b"caf\xe9\n")
    assert errors_of(load_spec, path) == [f"{path}:2:11: error: <root>: the file is not UTF-8 text"]


def test_a_folder_is_not_a_spec(tmp_path: Path) -> None:
    assert errors_of(load_spec, tmp_path) == [
        f"error: <root>: cannot read `{tmp_path}`: not a regular file"]


def test_unsupported_version() -> None:
    text = SPEC.replace("kdspec: 1", "kdspec: 2")
    assert errors_of(parse_spec_text, text, "s.yaml") == [
        "s.yaml:1:9: error: kdspec: kdspec: 2 is not supported; this kdspec reads version 1"]


def test_migrations_chain_upgrades_old_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    def rename_title(data: dict) -> dict:
        data = dict(data, kdspec=1)
        data["name"] = data.pop("title")
        return data

    monkeypatch.setattr(loader, "MIGRATIONS", {0: rename_title})
    old = SPEC.replace("kdspec: 1", "kdspec: 0").replace("name: tiny", "title: tiny")
    loaded = parse_spec_text(old, "old.yaml")
    assert loaded.spec.name == "tiny" and loaded.data["kdspec"] == 1
    assert loaded.locate(("stages", 1, "steps")) == Location("old.yaml", 24, 12)  # unchanged path
    assert loaded.locate(("name",)) == Location("old.yaml", 1, 1)  # renamed: its parent's
    monkeypatch.setattr(loader, "MIGRATIONS", {})
    assert "kdspec: 0 is not supported" in errors_of(parse_spec_text, old, "old.yaml")[0]


# --- extends ---------------------------------------------------------------------------------

CHILD = """\
extends: base/base.yaml
name: child
models:
  student:
    arch: {d_model: 128}
stages:
  - name: distill
    tokens: 4M
    optimizer: {betas: [0.8, 0.9]}
  - {name: polish, remove: true}
  - {name: check, kind: eval, models: [distill], data: [corpus]}
"""


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "base.yaml", SPEC)
    return write(tmp_path, "child.yaml", CHILD)


def test_extends_merges_mappings_and_stages_by_name(chain: Path) -> None:
    loaded = load_spec(chain)
    spec = loaded.spec
    assert spec.name == "child" and spec.kdspec == 1
    assert spec.models["student"].arch.d_model == 128  # merged into the base's arch...
    assert spec.models["student"].arch.n_layers == 2  # ...which keeps the rest
    distill = spec.stages[0]
    assert distill.tokens == 4_000_000 and distill.teacher == "teacher"
    assert distill.optimizer.lr == 1e-4  # mapping merged
    assert distill.optimizer.betas == [0.8, 0.9]  # list replaced
    assert [s.name for s in spec.stages] == ["distill", "check"]  # polish removed, check appended
    assert "extends" not in loaded.data
    assert loaded.sources == [chain, chain.parent / "base" / "base.yaml"]


def test_merged_values_point_to_the_file_they_came_from(chain: Path) -> None:
    loaded = load_spec(chain)
    base = str(chain.parent / "base" / "base.yaml")
    assert loaded.locate(("stages", 0, "optimizer", "lr")) == Location(base, 18, 11)
    assert loaded.locate(("stages", 0, "tokens")) == Location(str(chain), 8, 13)
    assert loaded.locate(("models", "student", "arch", "family")) == Location(base, 7, 20)
    assert loaded.locate(("models", "student", "arch", "d_model")) == Location(str(chain), 5, 21)
    assert loaded.locate(("stages", 1, "kind")) == Location(str(chain), 11, 25)


def test_an_error_in_an_inherited_value_names_the_base_file(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", SPEC.replace("steps: 100", "steps: many"))
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\n")
    assert errors_of(load_spec, child) == [
        f"{tmp_path / 'base.yaml'}:24:12: error: stages[1].steps: expected an integer, got 'many'"]


def test_a_stage_of_another_kind_replaces_the_base_stage(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", SPEC)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nstages:\n"
                  "  - {name: distill, kind: pretrain, student: student, data: corpus, steps: 5}\n")
    spec = load_spec(child).spec
    assert spec.stages[0].kind == "pretrain" and spec.stages[0].steps == 5


def test_null_in_a_child_unsets_a_base_value(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", SPEC)
    child = write(tmp_path, "child.yaml",
                  "extends: base.yaml\nmodels:\n  teacher: {preset: null, source: hf:org/big}\n")
    model = load_spec(child).spec.models["teacher"]
    assert model.preset is None and model.source == "hf:org/big"


def test_extends_chains_and_cycles(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", SPEC)
    write(tmp_path, "b.yaml", "extends: a.yaml\nseed: 3\n")
    c = write(tmp_path, "c.yaml", "extends: b.yaml\nname: c\n")
    spec = load_spec(c).spec
    assert (spec.name, spec.seed, spec.stages[0].name) == ("c", 3, "distill")
    me = write(tmp_path, "me.yaml", "extends: me.yaml\nname: me\n")
    assert errors_of(load_spec, me) == [
        f"{me}:1:10: error: extends: `extends` cycle: {me} -> {me}"]


def test_extends_problems_come_with_the_other_yaml_problems(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", "name: a\nname: b\nextends: gone.yaml\n")
    assert errors_of(load_spec, child) == [
        f"{child}:2:1: error: name: duplicate key `name` at lines 1 and 2 (delete one of them)",
        f"{child}:3:10: error: extends: cannot read `{tmp_path / 'gone.yaml'}`: no such file",
    ]


# --- --set -----------------------------------------------------------------------------------


def test_set_existing_keys_by_index_and_by_stage_name() -> None:
    overrides = ["stages.distill.loss.temperature=3", "stages.1.steps=7", "hardware.mfu=0.5",
                 "stages.0.optimizer.lr=3e-4", "stages.1.steps=8"]
    loaded = parse_spec_text(SPEC, "s.yaml", overrides)
    spec = loaded.spec
    assert spec.stages[0].loss.temperature == 3.0
    assert spec.stages[0].optimizer.lr == 3e-4
    assert spec.stages[1].steps == 8  # applied in order: the last wins
    assert spec.hardware.mfu == 0.5  # `hardware` is unset in the file: a schema field is fine
    assert loaded.overrides == overrides
    assert loaded.locate(("stages", 1, "steps")) == Location("--set 'stages.1.steps=8'", 1, 16)


def test_set_values_are_yaml() -> None:
    spec = parse_spec_text(SPEC, "s.yaml", [
        "stages.distill.optimizer.betas=[0.5, 0.6]", "description=yes",
        "hardware.price_per_device_hour=", "stages.distill.tokens=1Mi"]).spec
    assert spec.stages[0].optimizer.betas == [0.5, 0.6]
    assert spec.description == "yes"
    assert spec.hardware.price_per_device_hour is None
    assert spec.stages[0].tokens == 2**20


def test_set_with_a_typo_names_the_closest_key() -> None:
    assert errors_of(parse_spec_text, SPEC, "s.yaml", ["stages.distill.los.temperature=1"]) == [
        "--set 'stages.distill.los.temperature=1':1:16: error: stages[0].los: unknown key "
        "(did you mean `loss`?)"]
    assert errors_of(parse_spec_text, SPEC, "s.yaml", ["stages.polsh.steps=1"]) == [
        "--set 'stages.polsh.steps=1':1:8: error: stages: no stage named `polsh` "
        "(did you mean `polish`?)"]


def test_set_cannot_add_entries_that_neither_spec_nor_schema_has() -> None:
    errors = errors_of(parse_spec_text, SPEC, "s.yaml", ["models.extra.preset=gpt2"])
    assert errors == ["--set 'models.extra.preset=gpt2':1:8: error: models.extra: unknown key "
                      "(valid keys: teacher, student)"]


def test_set_beside_a_stage_with_a_nonsense_kind_is_a_spec_error() -> None:
    # A regression found by the fuzz test: `kind: [x]` is unhashable.
    text = SPEC.replace("kind: sft", "kind: [sft]")
    errors = errors_of(parse_spec_text, text, "s.yaml", ["stages.polish.steps=3"])
    assert errors == ["s.yaml:22:11: error: stages[1].kind: expected a stage kind, got a list "
                      "(kinds: pretrain, pretrain_kd, sft, step_by_step, minillm, kd, seqkd, gkd, "
                      "eval)"]


@pytest.mark.parametrize("text", [
    "=1", "stages", ".=1", " =1", "stages.\u00b2.steps=1", "stages.-1.steps=1",
    "stages.99999999999999999999.steps=1", "stages.0.=1", "hardware.mfu=a: b: c",
    "description=[", "seed=!!python/name:os.system", "name=*alias",
])
def test_malformed_set_strings_are_spec_errors(text: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec_text(SPEC, "s.yaml", [text])
    assert all(d.location is not None for d in caught.value.diagnostics)


def test_a_bad_set_leaves_the_spec_untouched_and_all_problems_are_reported() -> None:
    text = SPEC.replace("name: tiny\n", "name: tiny\nname: twice\n")
    errors = errors_of(parse_spec_text, text, "s.yaml",
                       ["stages.polish.kind.x=1", "stages.polish.steps=zero"])
    assert errors == [
        "s.yaml:3:1: error: name: duplicate key `name` at lines 2 and 3 (delete one of them)",
        "--set 'stages.polish.kind.x=1':1:20: error: stages[1].kind: cannot set `x` inside 'sft'",
        "--set 'stages.polish.steps=zero':1:21: error: stages[1].steps: expected an integer, "
        "got 'zero'",
    ]
