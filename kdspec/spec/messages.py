"""pydantic validation errors -> located diagnostics in plain words.

pydantic says "Input should be a valid integer" at `('stages', 0, 'sft', 'batch_size')`; a user
wants `spec.yaml:9:17: error: stages[0].batch_size: expected an integer, got 'abc'`. This module
maps pydantic's location onto the data (dropping union tags), words the message, and adds the
closest valid key or value where one is misspelt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import ValidationError

from .errors import Diagnostic, KeyPath, Location
from .suggest import (
    LocWalk,
    accepts,
    closest,
    describe_type,
    did_you_mean,
    get_key,
    keys_of,
    kind_tags,
    literal_values,
    union_members,
    unwrap,
    walk_loc,
)

__all__ = ["Locator", "validation_diagnostics", "show"]

# base.Name's pattern; a name that fails it gets a sentence instead of a regex.
_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
_NAME_RULE = "a name of letters, digits, `_` and `-` that starts with a letter or `_`"

_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping", "model_attributes_type": "a mapping",
}
_BOUNDS = {
    "greater_than": ("gt", "more than"), "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most"),
}
_YAML11_BOOLEANS = {"yes", "no", "on", "off", "y", "n"}


class Locator(Protocol):
    def locate(self, path: KeyPath) -> Location | None: ...
    def locate_key(self, path: KeyPath) -> Location | None: ...


def show(value: Any) -> str:
    """A short rendering of a YAML value for "got ..." (strings quoted, containers named)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) + ".0" if value.is_integer() and abs(value) < 1e16 else repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _bound(number: Any) -> str:
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)


def _is_number_text(value: Any) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _type_hint(kind: str, value: Any) -> str | None:
    """The usual reason a YAML value has the wrong type, when we can tell."""
    if kind in ("float_type", "int_type") and _is_number_text(value):
        return "remove the quotes to write a number"
    if kind == "bool_type" and isinstance(value, str) and value.lower() in _YAML11_BOOLEANS:
        return "YAML 1.2 reads only true and false as booleans"
    if kind == "string_type" and isinstance(value, (int, float, bool)):
        return "quote it to make it a string"
    return None


def _expected(err: dict[str, Any], tp: Any) -> tuple[str, str | None]:
    """Message and hint for an error about a value (not a key)."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    got = f", got {show(value)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}{got}", _type_hint(kind, value)
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return f"expected {words} {_bound(ctx[key])}{got}", None
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        words = "at least" if kind == "too_short" else "at most"
        return f"expected {words} {n} item{'s' * (n != 1)}, got {ctx.get('actual_length')}", None
    if kind in ("string_too_short", "string_too_long"):
        n = ctx.get("min_length" if kind == "string_too_short" else "max_length")
        words = "at least" if kind == "string_too_short" else "at most"
        return f"expected {words} {n} characters{got}", None
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern")
        rule = _NAME_RULE if pattern == _NAME_PATTERN else f"text matching {pattern}"
        return f"expected {rule}{got}", None
    if kind == "literal_error":
        options = [str(v) for v in literal_values(tp)] or [ctx.get("expected", "")]
        hint = f"did you mean `{best}`?" if (best := closest(str(value), options)) else None
        return f"expected one of {', '.join(options)}{got}", hint
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"]), None
    return err["msg"], None


def _stage_kinds(tp: Any) -> list[str]:
    members = union_members(unwrap(tp)) if tp is not None else None
    tags = kind_tags(members) if members else None
    return list(tags or {})


def _kind_diagnostic(err: dict[str, Any], walk: LocWalk, where: Locator) -> Diagnostic:
    kinds = _stage_kinds(walk.tp)
    listing = f"kinds: {', '.join(kinds)}"
    noun = "stage kind" if walk.path[:1] == ("stages",) else "kind"
    if err["type"] == "union_tag_not_found":
        return Diagnostic("missing required key `kind`", walk.path, where.locate(walk.path),
                          listing)
    path = (*walk.path, "kind")
    written = err["input"].get("kind") if isinstance(err["input"], dict) else None
    if not isinstance(written, str):
        return Diagnostic(f"expected a {noun}, got {show(written)}", path, where.locate(path),
                          listing)
    best = closest(written, kinds)
    hint = f"did you mean `{best}`? {listing}" if best else listing
    return Diagnostic(f"unknown {noun} `{written}`", path, where.locate(path), hint)


def _diagnostic(err: dict[str, Any], walk: LocWalk, root: Any, where: Locator) -> Diagnostic:
    path = walk.path
    if err["type"] == "missing":
        parent = path[:-1]
        return Diagnostic(f"missing required key `{path[-1]}`", parent, where.locate(parent))
    if err["type"] == "extra_forbidden":
        options = keys_of(walk_loc(root, err["loc"][:-1]).tp)
        hint = did_you_mean(str(path[-1]), options)
        return Diagnostic("unknown key", path, where.locate_key(path), hint)
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return _kind_diagnostic(err, walk, where)
    if path[-1:] == ("[key]",):
        message, hint = _expected(err, None)
        return Diagnostic(message, path[:-1], where.locate_key(path[:-1]), hint)
    message, hint = _expected(err, walk.tp)
    return Diagnostic(message, path, where.locate(path), hint)


def _resolve_unions(
    items: list[tuple[dict[str, Any], LocWalk]], data: Any, where: Locator
) -> list[tuple[dict[str, Any], LocWalk] | Diagnostic]:
    """pydantic reports a failed plain union once per member ("not a list", "not a string").
    Keep the errors of the member that matches the kind of value written; if none matches,
    say once what the union accepts."""
    out: list[tuple[dict[str, Any], LocWalk] | Diagnostic] = []
    seen: set[KeyPath] = set()
    for err, walk in items:
        if walk.union is None:
            out.append((err, walk))
        elif walk.union[0] not in seen:
            path = walk.union[0]
            seen.add(path)
            group = [(e, w) for e, w in items if w.union and w.union[0] == path]
            out.extend(_one_member(group, path, data, where))
    return out


def _one_member(
    group: list[tuple[dict[str, Any], LocWalk]], path: KeyPath, data: Any, where: Locator
) -> list[tuple[dict[str, Any], LocWalk] | Diagnostic]:
    """The errors of the union member meant for the value written, or one summary error."""
    value = _value_at(data, path)
    members = [w.union[1] for _, w in group if w.union is not None and w.union[1] is not None]
    fitting = [(e, w) for e, w in group if w.union and w.union[1] is not None
               and accepts(w.union[1], value)]
    if fitting:
        return list(fitting)
    wanted = _unique(describe_type(m) for m in members)
    return [Diagnostic(f"expected {' or '.join(wanted)}, got {show(value)}", path,
                       where.locate(path))]


def _value_at(data: Any, path: KeyPath) -> Any:
    for key in path:
        data = get_key(data, key)
    return data


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def validation_diagnostics(
    error: ValidationError, root: Any, data: Any, where: Locator
) -> list[Diagnostic]:
    """One diagnostic per problem pydantic found validating `data` against the model `root`."""
    items = [(err, walk_loc(root, err["loc"])) for err in error.errors(include_url=False)]
    out: list[Diagnostic] = []
    for item in _resolve_unions(items, data, where):
        out.append(item if isinstance(item, Diagnostic) else _diagnostic(*item, root, where))
    return out


def sort_key(diagnostic: Diagnostic, files: Sequence[str]) -> tuple[int, int, int]:
    """Order by file (the spec, its bases, then `--set`), then line and column."""
    loc = diagnostic.location
    if loc is None:
        return (len(files) + 1, 0, 0)
    rank = files.index(loc.file) if loc.file in files else len(files)
    return (rank, loc.line, loc.col)
