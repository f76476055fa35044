"""YAML text -> a tree of located values, read with the YAML 1.2 core schema.

PyYAML implements YAML 1.1: it reads `1e-4` as a string, `on`/`no` as booleans and keeps the last
of two duplicate keys without a word. Here PyYAML only composes the text into nodes (which carry
their line and column); the resolver below follows the YAML 1.2 core schema, and the conversion
to Python values refuses duplicate keys, non-string keys and unknown tags with located errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from .errors import Diagnostic, KeyPath, Location, SpecError

__all__ = ["Node", "parse_yaml", "to_plain", "iter_located", "MAX_NODES", "MAX_DEPTH"]

MAX_NODES = 100_000  # after expanding aliases; stops "billion laughs" documents
MAX_DEPTH = 64  # a spec is a few levels deep; this stops pathological nesting early

_TAG = "tag:yaml.org,2002:"


class Core12Resolver(BaseResolver):
    """Implicit typing of plain scalars by the YAML 1.2 core schema (spec section 10.3.2)."""

    yaml_implicit_resolvers: dict = {}


def _add(tag: str, pattern: str, first: str) -> None:
    Core12Resolver.add_implicit_resolver(_TAG + tag, re.compile(pattern), list(first))


# Order matters within one first character: `10` is an int before it is a float.
_add("null", r"^(?:~|null|Null|NULL|)$", "~nN")
Core12Resolver.yaml_implicit_resolvers.setdefault("", []).append(
    (_TAG + "null", re.compile(r"^$"))  # an empty plain scalar (`key:`) is null
)
_add("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF")
_add("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789")
_add(
    "float",
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
    "-+.0123456789",
)


class _CoreLoader(Reader, Scanner, Parser, Composer, Core12Resolver):
    """PyYAML's pure-Python front end (reader, scanner, parser, composer), 1.2 resolver."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        Core12Resolver.__init__(self)


@dataclass
class Node:
    """A value with the place it was written. Mappings hold `dict[str, Node]`, sequences
    `list[Node]`, scalars a plain Python value. `key_loc` is where a mapping entry's key is."""

    value: Any
    loc: Location
    key_loc: Location | None = None

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_sequence(self) -> bool:
        return isinstance(self.value, list)


def _int(text: str) -> int:
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    if digits[:2] in ("0x", "0o"):
        return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
    return sign * int(digits)


def _float(text: str) -> float:
    lowered = text.lower()
    if lowered.lstrip("+-") == ".inf":
        return -math.inf if lowered.startswith("-") else math.inf
    if lowered == ".nan":
        return math.nan
    return float(text)


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


def _null(text: str) -> None:
    if text not in ("", "~", "null", "Null", "NULL"):
        raise ValueError(text)


_SCALARS: dict[str, Callable[[str], Any]] = {
    _TAG + "str": str, _TAG + "int": _int, _TAG + "float": _float,
    _TAG + "bool": _bool, _TAG + "null": _null,
}


class _Builder:
    """Converts composed nodes to `Node`s, collecting every duplicate-key and tag problem."""

    def __init__(self, file: str, line_offset: int = 0, col_offset: int = 0) -> None:
        self.file = file
        self.line_offset = line_offset
        self.col_offset = col_offset  # shifts columns of the first line (for `--set` values)
        self.diagnostics: list[Diagnostic] = []
        self.count = 0

    def mark(self, mark: yaml.Mark) -> Location:
        col = mark.column + (self.col_offset if mark.line == 0 else 0)
        return Location(self.file, mark.line + 1 + self.line_offset, col + 1)

    def error(self, message: str, path: KeyPath, mark: yaml.Mark, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(message, path, self.mark(mark), hint))

    def build(self, node: yaml.Node, path: KeyPath, active: frozenset[int]) -> Node:
        self.count += 1
        if self.count > MAX_NODES or len(path) > MAX_DEPTH or id(node) in active:
            raise SpecError([_too_big(path, self.mark(node.start_mark), id(node) in active)])
        if isinstance(node, MappingNode):
            return self.mapping(node, path, active | {id(node)})
        if isinstance(node, SequenceNode):
            inner = active | {id(node)}
            items = [self.build(n, (*path, i), inner) for i, n in enumerate(node.value)]
            if node.tag not in (_TAG + "seq", "!"):
                self.error(f"unsupported tag {_short(node.tag)}", path, node.start_mark)
            return Node(items, self.mark(node.start_mark))
        return Node(self.scalar(node, path), self.mark(node.start_mark))

    def scalar(self, node: ScalarNode, path: KeyPath) -> Any:
        convert = _SCALARS.get(node.tag)
        if convert is None:
            self.error(f"unsupported tag {_short(node.tag)}", path, node.start_mark,
                       "kdspec reads plain YAML values: strings, numbers, true/false, null")
            return node.value
        try:
            return convert(node.value)
        except ValueError:
            kind = node.tag.removeprefix(_TAG)
            self.error(f"cannot read {_clip(node.value)!r} as !!{kind}", path, node.start_mark)
            return node.value

    def mapping(self, node: MappingNode, path: KeyPath, active: frozenset[int]) -> Node:
        if node.tag not in (_TAG + "map", "!"):
            self.error(f"unsupported tag {_short(node.tag)}", path, node.start_mark)
        entries: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node, path)
            if key is None:
                continue
            if key in entries:
                first = entries[key].key_loc
                again = self.mark(key_node.start_mark).line
                self.error(f"duplicate key `{key}` at lines {first.line} and {again}",
                           (*path, key), key_node.start_mark, "delete one of them")
                continue
            child = self.build(value_node, (*path, key), active)
            child.key_loc = self.mark(key_node.start_mark)
            entries[key] = child
        return Node(entries, self.mark(node.start_mark))

    def key(self, node: yaml.Node, path: KeyPath) -> str | None:
        if not isinstance(node, ScalarNode):
            self.error("a key must be a plain string, not a list or mapping", path, node.start_mark)
            return None
        value = self.scalar(node, path)
        if node.value == "<<" and node.style is None:
            self.error("YAML merge keys (`<<`) are not supported", path, node.start_mark,
                       "use `extends: FILE` to build on another spec")
            return None
        if not isinstance(value, str):
            self.error(f"a key must be a string, got {_clip(node.value)!r}", path,
                       node.start_mark, f"quote it: '{_clip(node.value)}'")
            return None
        return value


def _clip(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _too_big(path: KeyPath, loc: Location, recursive: bool) -> Diagnostic:
    if recursive:
        return Diagnostic("an alias refers to a value that contains it", path, loc)
    return Diagnostic(
        f"the document is too large or too deeply nested (more than {MAX_NODES} values or "
        f"{MAX_DEPTH} levels after expanding aliases)", path, loc,
    )


def _syntax_error(err: yaml.YAMLError, text: str, file: str, builder: _Builder) -> Diagnostic:
    """A located diagnostic for PyYAML's reader, scanner, parser and composer errors."""
    if isinstance(err, yaml.reader.ReaderError):
        before = text[: err.position]
        line, col = before.count("\n"), err.position - (before.rfind("\n") + 1)
        loc = Location(file, line + 1 + builder.line_offset, col + 1)
        return Diagnostic(f"YAML: unacceptable character #x{err.character:04x}", (), loc,
                          "a spec must be printable text")
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        if (err.context or "").startswith("expected a single document"):
            return Diagnostic("YAML: a spec is one document, but a second one starts here", (),
                              builder.mark(err.problem_mark), "remove the `---` line")
        hint = None
        if err.context and err.context_mark is not None:
            ctx = builder.mark(err.context_mark)
            hint = f"{err.context} at line {ctx.line}, column {ctx.col}"
        problem = err.problem or "syntax error"
        if "'\\t'" in problem:
            hint = "YAML does not allow tabs for indentation; use spaces"
        return Diagnostic(f"YAML: {problem}", (), builder.mark(err.problem_mark), hint)
    return Diagnostic(f"YAML: {err}", (), Location(file, 1, 1))


def parse_yaml(
    text: str, file: str, *, line_offset: int = 0, col_offset: int = 0
) -> tuple[Node | None, list[Diagnostic]]:
    """Parse one YAML document into a `Node` tree (None for an empty document).

    Returns the tree and the problems that still let it be read (duplicate keys, unsupported
    tags); a syntax error, which leaves nothing to read, raises `SpecError`.
    """
    builder = _Builder(file, line_offset, col_offset)
    try:
        loader = _CoreLoader(text)
        try:
            composed = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise SpecError([_syntax_error(err, text, file, builder)]) from None
    except RecursionError:
        raise SpecError([_too_big((), Location(file, 1, 1), False)]) from None
    if composed is None:
        return None, []
    return builder.build(composed, (), frozenset()), builder.diagnostics


def to_plain(node: Node | None) -> Any:
    """The plain Python value of a tree: dicts, lists and scalars, without locations."""
    if node is None:
        return None
    if node.is_mapping:
        return {k: to_plain(v) for k, v in node.value.items()}
    if node.is_sequence:
        return [to_plain(v) for v in node.value]
    return node.value


def iter_located(node: Node, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Node]]:
    """Every (key path, node) pair of a tree, the root first."""
    yield path, node
    if node.is_mapping:
        for key, child in node.value.items():
            yield from iter_located(child, (*path, key))
    elif node.is_sequence:
        for i, child in enumerate(node.value):
            yield from iter_located(child, (*path, i))
