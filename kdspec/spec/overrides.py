"""`--set KEY=VALUE` overrides applied to a located spec tree.

KEY is a dotted path: `hardware.mfu`, `stages.1.tokens` (a list index) or
`stages.student_kd.loss.temperature` (a list item by its `name`). Each step must name a key that
exists in the merged spec, or a field the schema defines at that place that the spec leaves
unset; anything else is refused with the closest valid key. VALUE is read as YAML 1.2
(`2M` is a string, `1e-4` a float, `[a, b]` a list, an empty value null) and replaces what was
there. The value's location is the override itself, so errors in it point at the `--set`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import Diagnostic, KeyPath, Location, SpecError
from .messages import show
from .suggest import did_you_mean, keys_of, type_at
from .yaml_nodes import Node, parse_yaml, to_plain

__all__ = ["Override", "parse_override", "apply_overrides", "override_label"]

_EXAMPLE = "e.g. --set stages.train.tokens=2M"


@dataclass(frozen=True)
class Override:
    """One parsed `--set`: its key segments (with their columns) and the located value."""

    text: str
    segments: tuple[tuple[str, int], ...]  # (segment, 1-based column in `text`)
    value: Node

    @property
    def label(self) -> str:
        return override_label(self.text)

    def at(self, col: int) -> Location:
        return Location(self.label, 1, col)


def override_label(text: str) -> str:
    """The pseudo file name under which an override's locations are reported."""
    return f"--set '{text}'"


def parse_override(text: str) -> Override:
    """Split `KEY=VALUE` and read VALUE as YAML; raises `SpecError` on bad syntax."""
    label = override_label(text)
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError([Diagnostic("expected KEY=VALUE", (), Location(label, 1, 1), _EXAMPLE)])
    segments, col = [], 1
    for part in key.split("."):
        if not part or part != part.strip():
            message = f"bad key `{key}`: empty or space-padded part between dots"
            raise SpecError([Diagnostic(message, (), Location(label, 1, col), _EXAMPLE)])
        segments.append((part, col))
        col += len(part) + 1
    node, problems = parse_yaml(raw, label, col_offset=len(key) + 1)
    if problems:
        raise SpecError(problems)
    value = node if node is not None else Node(None, Location(label, 1, len(key) + 2))
    return Override(text, tuple(segments), value)


@dataclass
class _Step:
    """One resolved step of an override path: its key, column, and whether it exists."""

    key: str | int
    col: int
    exists: bool


def _list_index(node: Node, segment: str, path: KeyPath) -> int | Diagnostic:
    """A list item by index (`1`) or by the `name` of its mapping (`student_kd`)."""
    if segment.isascii() and segment.isdigit():
        if int(segment) < len(node.value):
            return int(segment)
        return Diagnostic(f"index {segment} is out of range: the list has {len(node.value)} items",
                          path, None)
    names = [_item_name(item) for item in node.value]
    if segment in names:
        return names.index(segment)
    noun = "stage" if path == ("stages",) else "item"
    return Diagnostic(f"no {noun} named `{segment}`", path, None,
                      did_you_mean(segment, [n for n in names if n], f"{noun} names"))


def _item_name(item: Node) -> str | None:
    name = item.value.get("name") if item.is_mapping else None
    return name.value if name is not None and isinstance(name.value, str) else None


def _child(node: Node | None, key: str | int) -> Node | None:
    if node is None:
        return None
    return node.value.get(key) if node.is_mapping else node.value[key]


def _walk(root: Node, override: Override, data: Any, root_type: Any) -> list[_Step] | Diagnostic:
    """Resolve every segment to a step, creating nothing; a Diagnostic for the first bad one."""
    steps: list[_Step] = []
    node: Node | None = root
    path: KeyPath = ()
    for segment, col in override.segments:
        if node is not None and node.is_sequence:
            key: str | int | Diagnostic = _list_index(node, segment, path)
        elif node is None or node.is_mapping:
            key = _map_key(node, segment, path, data, root_type)
        else:
            key = Diagnostic(f"cannot set `{segment}` inside {show(node.value)}", path, None)
        if isinstance(key, Diagnostic):
            return Diagnostic(key.message, key.path, override.at(col), key.hint)
        child = _child(node, key)
        steps.append(_Step(key, col, child is not None))
        node, path = child, (*path, key)
    return steps


def _map_key(node: Node | None, segment: str, path: KeyPath, data: Any, root_type: Any
             ) -> str | Diagnostic:
    existing = list(node.value) if node is not None else []
    fields = keys_of(type_at(root_type, data, path))
    if segment in existing or segment in fields:
        return segment
    options = existing + [f for f in fields if f not in existing]
    return Diagnostic("unknown key", (*path, segment), None, did_you_mean(segment, options))


def _apply(root: Node, override: Override, root_type: Any) -> Diagnostic | None:
    if override.segments[0][0] == "extends":
        return Diagnostic("`extends` is read before overrides apply; it cannot be set",
                          ("extends",), override.at(1))
    steps = _walk(root, override, to_plain(root), root_type)
    if isinstance(steps, Diagnostic):
        return steps
    node = root
    for step in steps[:-1]:  # create the unset intermediate mappings the schema allows
        if not step.exists:
            node.value[step.key] = Node({}, override.at(step.col), override.at(step.col))
        node = node.value[step.key]
    last = steps[-1]
    node.value[last.key] = replace(override.value, key_loc=override.at(last.col))
    return None


def apply_overrides(root: Node, texts: Sequence[str], root_type: Any) -> list[Diagnostic]:
    """Apply each `--set` in order to the tree `root` (in place); return the problems found."""
    problems: list[Diagnostic] = []
    for text in texts:
        try:
            problem = _apply(root, parse_override(text), root_type)
        except SpecError as err:
            problems.extend(err.diagnostics)
            continue
        if problem is not None:
            problems.append(problem)
    return problems
