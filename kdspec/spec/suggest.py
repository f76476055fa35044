"""What is valid at a key path: the schema type there, its keys, and the closest to a typo.

The walk follows the pydantic models' field annotations, through `Annotated`, `X | None`,
`list[...]`, `dict[str, ...]` and unions. The stage union is discriminated by `kind`; the right
member is picked from the data's `kind` (data-driven walk) or from pydantic's tag in an error's
location (location-driven walk).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from .errors import KeyPath

__all__ = [
    "closest", "did_you_mean", "unwrap", "union_members", "kind_tags", "child_type",
    "type_at", "keys_of", "literal_values", "LocWalk", "walk_loc", "describe_type", "accepts",
    "get_key", "pick_member",
]


def closest(word: str, options: Sequence[str]) -> str | None:
    """The option nearest to `word` (difflib ratio ≥ 0.6, case ignored first), or None."""
    lowered = {o.lower(): o for o in options}
    if word.lower() in lowered:
        return lowered[word.lower()]
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, options: Sequence[str], noun: str = "valid keys") -> str:
    """A hint naming the closest option, or all options when none is close."""
    best = closest(word, options)
    if best is not None:
        return f"did you mean `{best}`?"
    return f"{noun}: {', '.join(options)}" if options else f"no {noun} here"


def union_members(tp: Any) -> tuple[Any, ...] | None:
    """The members of a `Union[...]` / `X | Y`, or None for anything else."""
    if get_origin(tp) in (Union, types.UnionType):
        return get_args(tp)
    return None


def unwrap(tp: Any) -> Any:
    """Strip `Annotated[...]` and `X | None` down to the type that holds the value."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
            continue
        members = union_members(tp)
        if members is not None and type(None) in members and len(members) == 2:
            tp = next(m for m in members if m is not type(None))
            continue
        return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def literal_values(tp: Any) -> tuple[Any, ...]:
    tp = unwrap(tp)
    return get_args(tp) if get_origin(tp) is Literal else ()


def kind_tags(members: Sequence[Any]) -> dict[str, type[BaseModel]] | None:
    """For a union of models that each fix `kind` to a literal: tag -> model; else None."""
    tags: dict[str, type[BaseModel]] = {}
    for member in members:
        field = member.model_fields.get("kind") if _is_model(member) else None
        values = literal_values(field.annotation) if field is not None else ()
        if not values:
            return None
        tags.update((str(v), member) for v in values)
    return tags


def child_type(tp: Any, key: str | int) -> Any:
    """The schema type one key below `tp` (already picked from any union), or None."""
    tp = unwrap(tp)
    if _is_model(tp):
        field = tp.model_fields.get(key) if isinstance(key, str) else None
        return field.annotation if field is not None else None
    args = get_args(tp)
    if get_origin(tp) is list and isinstance(key, int) and args:
        return args[0]
    if get_origin(tp) is dict and isinstance(key, str) and len(args) == 2:
        return args[1]
    return None


_PYTHON_OF = {list: list, dict: dict, str: str, int: int, float: (int, float), bool: bool}


def accepts(member: Any, value: Any) -> bool:
    """Whether a union member is the one meant for this kind of YAML value."""
    member = unwrap(member)
    if _is_model(member):
        return isinstance(value, dict)
    if get_origin(member) is Literal:
        return value in get_args(member)
    python = _PYTHON_OF.get(get_origin(member) or member)
    if python is None or (isinstance(value, bool) and member is not bool):
        return False
    return isinstance(value, python)


def pick_member(tp: Any, value: Any) -> Any:
    """For a union, the member this value is meant for (None if none); else `tp` itself."""
    members = union_members(unwrap(tp))
    if members is None:
        return tp
    tags = kind_tags(members)
    if tags is not None:
        kind = value.get("kind") if isinstance(value, dict) else None
        return tags.get(kind) if isinstance(kind, str) else None
    return next((m for m in members if accepts(m, value)), None)


def type_at(root: Any, data: Any, path: KeyPath) -> Any:
    """The schema type at `path` of `data` (a plain YAML value), or None where unknown."""
    tp: Any = root
    for key in path:
        tp = pick_member(tp, data)
        if tp is None:
            return None
        tp = child_type(tp, key)
        data = get_key(data, key)
    return pick_member(tp, data) if tp is not None else None


def keys_of(tp: Any) -> list[str]:
    """The field names of the model at `tp` (empty if `tp` is not a model)."""
    tp = unwrap(tp) if tp is not None else None
    return list(tp.model_fields) if _is_model(tp) else []


def describe_type(tp: Any) -> str:
    """`list[X]` -> "a list", a model -> "a mapping", `str` -> "a string", ..."""
    tp = unwrap(tp)
    if _is_model(tp) or get_origin(tp) is dict:
        return "a mapping"
    names = {list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true or false"}
    return names.get(get_origin(tp) or tp, str(tp))


def get_key(data: Any, key: str | int) -> Any:
    if isinstance(data, dict) and isinstance(key, str):
        return data.get(key)
    if isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
        return data[key]
    return None


@dataclass(frozen=True)
class LocWalk:
    """A pydantic error location mapped onto the data.

    path: the key path in the data (union tags removed); tp: the schema type there (None if
    unknown); union: for a member of a plain (non-`kind`) union, the union's path and the member.
    """

    path: KeyPath
    tp: Any
    union: tuple[KeyPath, Any] | None = None


def _member_for_label(members: Sequence[Any], label: str) -> Any:
    """pydantic names a union member `list[Demonstration]`, `str`, `HTTPTeacher`, ..."""
    head = label.split("[", 1)[0].removeprefix("constrained-")
    for member in members:
        inner = unwrap(member)
        name = getattr(get_origin(inner) or inner, "__name__", "")
        if name == head:
            return member
    return None


def walk_loc(root: Any, loc: Sequence[str | int]) -> LocWalk:
    """Map a pydantic error `loc` to a data key path, skipping the union tags pydantic adds."""
    tp: Any = root
    path: list[str | int] = []
    union: tuple[KeyPath, Any] | None = None
    for elem in loc:
        members = union_members(unwrap(tp)) if tp is not None else None
        if members is not None:
            tags = kind_tags(members)
            if tags is not None and elem in tags:
                tp = tags[elem]
                continue
            if tags is None and isinstance(elem, str):
                tp = _member_for_label(members, elem)
                union = (tuple(path), tp)
                continue
        path.append(elem)
        tp = child_type(tp, elem) if tp is not None else None
    return LocWalk(tuple(path), tp, union)
