"""Load a spec file: YAML 1.2 -> `extends` chain -> schema version -> `--set` -> validated `Spec`.

Every problem is collected with its file, line, column and key path, and raised at once as one
`SpecError`: first what the YAML reader found (duplicate keys, bad tags, `extends` problems), then
the `--set` problems, then every validation error. See docs/spec-loading.md for the rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import Diagnostic, KeyPath, Location, SpecError
from .messages import show, sort_key, validation_diagnostics
from .overrides import apply_overrides, override_label
from .root import SCHEMA_VERSION, Spec
from .yaml_nodes import Node, iter_located, parse_yaml, to_plain

__all__ = ["LoadedSpec", "load_spec", "parse_spec_text", "MIGRATIONS", "merge_nodes"]

MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
"""`MIGRATIONS[n]` turns the plain data of a version-n spec into version n+1 (and sets
`kdspec: n+1`). Empty while version 1 is the only one; a spec of version n loads if every step
from n to `SCHEMA_VERSION` is here."""


class _Index:
    """Key path -> located node of the final tree; answers "where was this written?"."""

    def __init__(self, root: Node) -> None:
        self.nodes: dict[KeyPath, Node] = dict(iter_located(root))

    def locate(self, path: KeyPath) -> Location | None:
        """Where the value at `path` starts; for a path not in the spec, its nearest ancestor."""
        for end in range(len(path), -1, -1):
            node = self.nodes.get(tuple(path[:end]))
            if node is not None:
                return node.loc
        return None

    def locate_key(self, path: KeyPath) -> Location | None:
        """Where the key of the entry at `path` is written (its value's place for list items)."""
        node = self.nodes.get(tuple(path))
        if node is not None and node.key_loc is not None:
            return node.key_loc
        return self.locate(path)


@dataclass
class LoadedSpec:
    """A validated spec with the data it came from and where each value was written."""

    spec: Spec
    path: Path
    data: dict[str, Any]
    overrides: list[str]
    sources: list[Path]
    index: _Index = field(repr=False, compare=False)

    def locate(self, path: KeyPath) -> Location | None:
        """Location of the value at `path`, or of its nearest ancestor written in the spec."""
        return self.index.locate(path)

    def locate_key(self, path: KeyPath) -> Location | None:
        """Location of the key of the entry at `path` (falls back to `locate`)."""
        return self.index.locate_key(path)


# ---------------------------------------------------------------------------------------------
# Reading files and following `extends`


class _Reader:
    """Reads a spec and its `extends` chain, merging as it goes; collects non-fatal problems."""

    def __init__(self) -> None:
        self.problems: list[Diagnostic] = []
        self.sources: list[Path] = []
        self.shown: list[str] = []  # the file names diagnostics use, in reading order

    def load_file(self, file: Path, shown: str, via: Location | None,
                  chain: tuple[tuple[Path, str], ...] = ()) -> Node:
        return self.load_text(_read(file, shown, via), file, shown, chain)

    def load_text(self, text: str, file: Path, shown: str,
                  chain: tuple[tuple[Path, str], ...] = ()) -> Node:
        self.sources.append(file)
        self.shown.append(shown)
        node, problems = parse_yaml(text, shown)
        self.problems.extend(problems)
        root = _require_mapping(node, shown)
        return self.follow_extends(root, file, shown, (*chain, (_identity(file), shown)))

    def follow_extends(self, root: Node, file: Path, shown: str,
                       chain: tuple[tuple[Path, str], ...]) -> Node:
        ext = root.value.pop("extends", None)
        if ext is None:
            return root
        if not isinstance(ext.value, str) or not ext.value.strip():
            raise SpecError([Diagnostic(
                f"expected the path of a spec file to build on, got {show(ext.value)}",
                ("extends",), ext.loc, "write `extends: base.yaml`, a path relative to this file")])
        target = file.parent / ext.value
        target_shown = os.path.normpath(os.path.join(os.path.dirname(shown), ext.value))
        if _identity(target) in [p for p, _ in chain]:
            cycle = " -> ".join([*(s for _, s in chain), target_shown])
            raise SpecError([Diagnostic(f"`extends` cycle: {cycle}", ("extends",), ext.loc)])
        base = self.load_file(target, target_shown, ext.loc, chain)
        return merge_nodes(base, root, (), self.problems)


def _identity(file: Path) -> Path:
    return Path(os.path.realpath(file))


def _read(file: Path, shown: str, via: Location | None) -> str:
    """The file's text; a missing or unreadable file is a diagnostic located at `via`."""
    path: KeyPath = ("extends",) if via is not None else ()
    try:
        if file.exists() and not file.is_file():  # a folder, or a device that never ends
            raise IsADirectoryError
        data = file.read_bytes()
    except OSError as err:
        reason = {FileNotFoundError: "no such file", IsADirectoryError: "not a regular file",
                  PermissionError: "permission denied"}.get(type(err), err.strerror or str(err))
        raise SpecError([Diagnostic(f"cannot read `{shown}`: {reason}", path, via)]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError([Diagnostic("the file is not UTF-8 text", (), _byte_location(
            data, err.start, shown))]) from None


def _byte_location(data: bytes, offset: int, shown: str) -> Location:
    line_start = data.rfind(b"\n", 0, offset) + 1
    col = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
    return Location(shown, data.count(b"\n", 0, offset) + 1, col)


def _require_mapping(node: Node | None, shown: str) -> Node:
    if node is None:
        loc = Location(shown, 1, 1)
        raise SpecError([Diagnostic("the spec is empty", (), loc, "start with `kdspec: 1`")])
    if not node.is_mapping:
        raise SpecError([Diagnostic(
            f"a spec must be a mapping of keys (kdspec, name, stages, ...), got {show(node.value)}",
            (), node.loc)])
    return node


# ---------------------------------------------------------------------------------------------
# Merging a spec onto the one it extends


def merge_nodes(base: Node, child: Node, path: KeyPath, problems: list[Diagnostic]) -> Node:
    """`child` written over `base`: mappings merge key by key, recursively; `stages` merge by
    stage name; anything else (scalars, lists, a type change) is replaced by the child's value.
    Every node keeps the location it was written at, so merged values point at their file."""
    if path == ("stages",) and base.is_sequence and child.is_sequence:
        return _merge_stages(base, child, problems)
    if not (base.is_mapping and child.is_mapping):
        return child
    merged = dict(base.value)
    for key, value in child.value.items():
        if key in merged:
            value = merge_nodes(merged[key], value, (*path, key), problems)
            value.key_loc = child.value[key].key_loc
        merged[key] = value
    return Node(merged, child.loc, child.key_loc)


def _stage_name(node: Node) -> str | None:
    name = node.value.get("name") if node.is_mapping else None
    return name.value if name is not None and isinstance(name.value, str) else None


def _merge_stages(base: Node, child: Node, problems: list[Diagnostic]) -> Node:
    """A child stage named like a base stage is merged into it (or replaces it if it sets a
    different `kind`); `{name: x, remove: true}` drops base stage x; other stages append."""
    items: list[Node | None] = list(base.value)
    by_name: dict[str, int] = {}
    for i, item in enumerate(items):
        name = _stage_name(item)  # type: ignore[arg-type]
        if name is not None:
            by_name.setdefault(name, i)
    for i, stage in enumerate(child.value):
        name = _stage_name(stage)
        if stage.is_mapping and "remove" in stage.value:
            _remove_stage(stage, ("stages", i), items, by_name, problems)
        elif name in by_name:
            j = by_name.pop(name)
            items[j] = _merge_stage(items[j], stage, j, problems)  # type: ignore[arg-type]
        else:
            items.append(stage)
    return Node([s for s in items if s is not None], child.loc, child.key_loc)


def _merge_stage(base: Node, child: Node, index: int, problems: list[Diagnostic]) -> Node:
    kinds = [n.value.get("kind") for n in (base, child)]
    if kinds[1] is not None and kinds[0] is not None and kinds[0].value != kinds[1].value:
        return child  # another kind of stage: merging fields of two kinds would be nonsense
    return merge_nodes(base, child, ("stages", index), problems)


def _remove_stage(stage: Node, path: KeyPath, items: list[Node | None], by_name: dict[str, int],
                  problems: list[Diagnostic]) -> None:
    remove, name = stage.value["remove"], _stage_name(stage)
    if remove.value is not True or set(stage.value) != {"name", "remove"}:
        problems.append(Diagnostic(
            "a stage removal is exactly `{name: STAGE, remove: true}`", path, stage.loc))
    elif name not in by_name:
        problems.append(Diagnostic(f"cannot remove stage `{name}`: the base spec has no such "
                                   "stage (or it was already merged)", (*path, "name"),
                                   stage.value["name"].loc))
    else:
        items[by_name.pop(name)] = None


# ---------------------------------------------------------------------------------------------
# Schema version


def _version_problem(root: Node) -> Diagnostic | None:
    node = root.value.get("kdspec")
    if node is None:
        return Diagnostic("missing required key `kdspec` (the schema version)", (), root.loc,
                          f"add `kdspec: {SCHEMA_VERSION}` at the top")
    version = node.value
    if not isinstance(version, int) or isinstance(version, bool):
        return Diagnostic(f"expected the schema version as an integer, got {show(version)}",
                          ("kdspec",), node.loc, f"write `kdspec: {SCHEMA_VERSION}`")
    if not _migratable(version):
        return Diagnostic(f"kdspec: {version} is not supported; this kdspec reads version "
                          f"{SCHEMA_VERSION}", ("kdspec",), node.loc)
    return None


def _migratable(version: int) -> bool:
    return version <= SCHEMA_VERSION and all(
        v in MIGRATIONS for v in range(version, SCHEMA_VERSION))


def _migrate(root: Node) -> Node:
    """Run the migrations from the spec's version up to `SCHEMA_VERSION`. Values keep the
    location of whatever was at their key path before; new paths take their parent's."""
    version = root.value["kdspec"].value
    while version < SCHEMA_VERSION:
        old = _Index(root)
        root = _relocate(MIGRATIONS[version](to_plain(root)), old, ())
        version += 1
    return root


def _relocate(value: Any, old: _Index, path: KeyPath) -> Node:
    prior = old.nodes.get(path)
    loc = prior.loc if prior is not None else old.locate(path)
    node = Node(value, loc, prior.key_loc if prior is not None else None)  # type: ignore[arg-type]
    if isinstance(value, dict):
        node.value = {k: _relocate(v, old, (*path, k)) for k, v in value.items()}
    elif isinstance(value, list):
        node.value = [_relocate(v, old, (*path, i)) for i, v in enumerate(value)]
    return node


# ---------------------------------------------------------------------------------------------
# Putting it together


def _finish(reader: _Reader, root: Node, path: Path, overrides: Sequence[str]) -> LoadedSpec:
    version_problem = _version_problem(root)
    if version_problem is not None:
        raise SpecError([*reader.problems, version_problem])
    root = _migrate(root)
    problems = reader.problems + apply_overrides(root, overrides, Spec)
    index, data = _Index(root), to_plain(root)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        files = reader.shown + [override_label(o) for o in overrides]
        seen = {(d.path, d.location) for d in problems}  # one report per written value
        found = [d for d in validation_diagnostics(err, Spec, data, index)
                 if (d.path, d.location) not in seen]
        problems += sorted(found, key=lambda d: sort_key(d, files))
    if problems:
        raise SpecError(problems)
    return LoadedSpec(spec, path, data, list(overrides), reader.sources, index)


def _load(read: Callable[[_Reader], Node], path: Path, overrides: Sequence[str]) -> LoadedSpec:
    reader = _Reader()
    try:
        root = read(reader)
    except SpecError as err:  # fatal: report what was found before it, then it
        raise SpecError([*reader.problems, *err.diagnostics]) from None
    return _finish(reader, root, path, overrides)


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> LoadedSpec:
    """Read, merge, override and validate a spec file; raises `SpecError` with every problem."""
    path = Path(path)
    return _load(lambda r: r.load_file(path, str(path), None), path, overrides)


def parse_spec_text(text: str, filename: str = "<string>", overrides: Sequence[str] = ()
                    ) -> LoadedSpec:
    """`load_spec` for text in memory; `extends` is relative to `filename`'s folder."""
    path = Path(filename)
    return _load(lambda r: r.load_text(text, path, filename), path, overrides)
