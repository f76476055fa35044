"""Read records from a source string: `builtin:NAME`, `jsonl:PATH`, `text:PATH`, `parquet:PATH`,
`hf:NAME[:CONFIG]`.

Every reader returns a list of plain dicts. `fields` then renames columns to the names kdspec's
stages use (`{"prompt": "question"}` puts row["question"] under "prompt"), and `n` keeps the
first n records in the source's own order: no shuffling, so a file source is read the same way
every time and `seed` only matters for builtin datasets.
"""

from __future__ import annotations

import difflib
import gzip
import importlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from .builtin import BUILTIN, load_builtin, unknown_builtin
from .errors import DataError

SCHEMES = ("builtin", "jsonl", "text", "parquet", "hf")
DEFAULT_BUILTIN_N = 1000  # records a builtin source makes when the spec gives no `n`
FILE_SCHEMES = ("jsonl", "text", "parquet")
SOURCE_SYNTAX = "builtin:NAME, jsonl:PATH, text:PATH, parquet:PATH or hf:NAME[:CONFIG]"
# Names an "eval" split may have in a HuggingFace dataset, tried in order.
HF_EVAL_SPLITS = ("eval", "validation", "valid", "dev", "test")


def parse_source(source: str) -> tuple[str, str]:
    """Split `SCHEME:REST` and check it without reading anything: `("jsonl", "data/x.jsonl")`.

    Raises DataError for a missing or unknown scheme (naming the closest one), an empty REST, or
    an unknown builtin dataset.
    """
    scheme, sep, rest = source.partition(":")
    if not sep:
        raise DataError(f"data source {source!r} has no scheme; expected {SOURCE_SYNTAX}")
    if scheme not in SCHEMES:
        close = difflib.get_close_matches(scheme, SCHEMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"data source {source!r}: unknown scheme {scheme!r}; expected {SOURCE_SYNTAX}{hint}"
        )
    if not rest:
        raise DataError(
            f"data source {source!r}: nothing after '{scheme}:'; expected {SOURCE_SYNTAX}"
        )
    if scheme == "builtin" and rest not in BUILTIN:
        raise unknown_builtin(rest)
    if scheme == "hf":
        parse_hf(rest)
    return scheme, rest


def parse_hf(rest: str) -> tuple[str, str | None]:
    """`"gsm8k:main"` -> `("gsm8k", "main")`; `"org/name"` -> `("org/name", None)`."""
    name, _, config = rest.partition(":")
    if not name or ":" in config:
        raise DataError(f"hf source {rest!r}: expected hf:NAME or hf:NAME:CONFIG")
    return name, config or None


def resolve_path(rest: str, base_dir: Path | None) -> Path:
    """A relative PATH resolves against `base_dir` (the spec file's folder), else the cwd."""
    path = Path(rest).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def load_records(
    source: str,
    *,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    fields: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> list[dict]:
    """The records of `source`, fields renamed, the first `n` kept.

    `split` and `seed` choose builtin records (`n` of them, 1000 by default); `split` picks the
    split of an hf dataset (`eval` falls back to validation/valid/dev/test); files have no splits
    and ignore both: name a separate file for evaluation.
    """
    scheme, rest = parse_source(source)
    if n is not None and n < 0:
        raise DataError(f"data source {source!r}: n must be >= 0, got {n}")
    if scheme == "builtin":
        n = DEFAULT_BUILTIN_N if n is None else n
        rows: Sequence[Mapping[str, Any]] = load_builtin(rest, split=split, n=n, seed=seed)
    elif scheme == "hf":
        rows = _read_hf(source, rest, split, n)
    else:
        path = resolve_path(rest, base_dir)
        _check_file(source, path, base_dir)
        rows = _FILE_READERS[scheme](source, path, n)
    rows = rows[:n] if n is not None else rows
    return rename_fields(rows, fields or {}, source)


def _check_file(source: str, path: Path, base_dir: Path | None) -> None:
    if path.is_file():
        return
    problem = "is a folder, not a file" if path.is_dir() else "does not exist"
    where = f" (relative paths resolve against {base_dir})" if base_dir is not None else ""
    raise DataError(f"data source {source!r}: {path} {problem}{where}")


def rename_fields(
    rows: Sequence[Mapping[str, Any]], fields: Mapping[str, str], source: str
) -> list[dict]:
    """Apply `fields` (new name -> column) to every row.

    A mapped column is moved to its new name; other columns are kept. Raises DataError naming
    the row and the available columns when a mapped column is missing.
    """
    out = []
    for i, row in enumerate(rows):
        missing = [col for col in fields.values() if col not in row]
        if missing:
            raise DataError(
                f"data source {source!r}: record {i} has no column {missing[0]!r} "
                f"(fields maps {_mapping_of(fields, missing[0])}); "
                f"available columns: {', '.join(map(str, row)) or 'none'}"
            )
        record = {k: v for k, v in row.items() if k not in fields.values()}
        record.update({new: row[col] for new, col in fields.items()})
        out.append(record)
    return out


def check_fields(
    records: Sequence[Mapping[str, Any]], required: Sequence[str], source: str
) -> None:
    """Raise DataError if a record lacks one of `required`, suggesting a `fields:` mapping.

    For stages to call with the names they read (e.g. `("prompt", "response")`).
    """
    for i, record in enumerate(records):
        for name in required:
            if name not in record:
                columns = ", ".join(map(str, record)) or "none"
                close = difflib.get_close_matches(name, list(map(str, record)), n=1)
                guess = close[0] if close else "COLUMN"
                raise DataError(
                    f"data source {source!r}: record {i} has no field {name!r}; available "
                    f"columns: {columns}; map one with `fields: {{{name}: {guess}}}`"
                )


def _mapping_of(fields: Mapping[str, str], column: str) -> str:
    return ", ".join(f"{new} <- {col}" for new, col in fields.items() if col == column)


def _open_text(path: Path) -> IO[str]:
    """A text handle; `.gz` files are decompressed on the fly."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _read_jsonl(source: str, path: Path, n: int | None) -> list[dict]:
    """One JSON object per line; blank lines are skipped. Stops after `n` records."""
    rows: list[dict] = []
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if n is not None and len(rows) >= n:
                    break
                if not line.strip():
                    continue
                rows.append(_parse_json_object(source, path, lineno, line))
    except UnicodeDecodeError as err:
        raise DataError(f"data source {source!r}: {path} is not UTF-8 text ({err})") from err
    return rows


def _parse_json_object(source: str, path: Path, lineno: int, line: str) -> dict:
    try:
        value = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"data source {source!r}: {path}:{lineno}:{err.colno}: invalid JSON: {err.msg}"
        ) from err
    if not isinstance(value, dict):
        raise DataError(
            f"data source {source!r}: {path}:{lineno}: expected a JSON object per line, "
            f"got {type(value).__name__}"
        )
    return value


def text_documents(lines: Iterable[str]) -> Iterator[str]:
    """Documents of a text file: blocks separated by blank lines, each block's lines joined with
    newlines; a file without any blank line has one document per line."""
    blocks: list[list[str]] = [[]]
    saw_blank = False
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line.strip():
            blocks[-1].append(line)
        else:
            saw_blank = True
            if blocks[-1]:
                blocks.append([])
    if not saw_blank:
        yield from (line for block in blocks for line in block)
        return
    yield from ("\n".join(block) for block in blocks if block)


def _read_text(source: str, path: Path, n: int | None) -> list[dict]:
    try:
        with _open_text(path) as handle:
            docs = islice(text_documents(handle), n)
            return [{"text": doc} for doc in docs]
    except UnicodeDecodeError as err:
        raise DataError(f"data source {source!r}: {path} is not UTF-8 text ({err})") from err


def _import_optional(module: str, purpose: str, install: str) -> ModuleType:
    """Import an optional dependency or explain how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DataError(f"{purpose} needs the `{module}` package: pip install {install}") from err


def _read_parquet(source: str, path: Path, n: int | None) -> list[dict]:
    pq = _import_optional("pyarrow.parquet", f"reading {source!r}", "pyarrow")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own hierarchy (ArrowInvalid, OSError, ...)
        raise DataError(f"data source {source!r}: cannot read {path} as parquet: {err}") from err
    if n is not None:
        table = table.slice(0, n)
    return table.to_pylist()


def _read_hf(source: str, rest: str, split: str, n: int | None) -> list[dict]:
    """A split of a HuggingFace dataset through `datasets.load_dataset` (needs the hub or a
    local cache). `eval` uses the first of `HF_EVAL_SPLITS` the dataset has."""
    datasets = _import_optional("datasets", f"reading {source!r}", "datasets")
    name, config = parse_hf(rest)
    try:
        available = list(datasets.get_dataset_split_names(name, config))
    except Exception as err:  # network, auth and missing-config errors all land here
        raise DataError(f"data source {source!r}: cannot open dataset {name!r}: {err}") from err
    chosen = _choose_hf_split(split, available)
    if chosen is None:
        raise DataError(
            f"data source {source!r}: no split {split!r}; the dataset has {', '.join(available)}"
        )
    dataset = datasets.load_dataset(name, config, split=chosen)
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    return [dict(row) for row in dataset]


def _choose_hf_split(split: str, available: Sequence[str]) -> str | None:
    if split in available:
        return split
    if split == "eval":
        return next((s for s in HF_EVAL_SPLITS if s in available), None)
    return None


_FILE_READERS: dict[str, Callable[[str, Path, int | None], list[dict]]] = {
    "jsonl": _read_jsonl,
    "text": _read_text,
    "parquet": _read_parquet,
}
