"""The run directory: resolved spec and plan, one folder per node, metrics, done markers.

Layout::

    runs/<name>/
      spec.resolved.json   the merged, validated spec (+ the --set overrides applied)
      plan.json            the plan, as `kdspec plan --json` prints it
      metrics.jsonl        one JSON object per logged step of any node
      <node id>/           a node's artifacts; `fingerprint` first, `done` last (atomically)
      report.md            written by the report node
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    def node_dir(self, node_id: str) -> Path:
        return self.root / node_id

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def done_record(self, node_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.node_dir(node_id) / "done").read_text())
        except (OSError, ValueError):
            return None

    def is_done(self, node_id: str, fingerprint: str) -> bool:
        record = self.done_record(node_id)
        return bool(record) and record.get("fingerprint") == fingerprint

    def started_fingerprint(self, node_id: str) -> str | None:
        try:
            return (self.node_dir(node_id) / "fingerprint").read_text().strip()
        except OSError:
            return None

    def mark_started(self, node_id: str, fingerprint: str) -> None:
        atomic_write_text(self.node_dir(node_id) / "fingerprint", fingerprint + "\n")

    def mark_done(self, node_id: str, fingerprint: str, wall_seconds: float) -> None:
        atomic_write_json(self.node_dir(node_id) / "done", {
            "fingerprint": fingerprint, "wall_seconds": round(wall_seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    def append_metrics(self, record: dict[str, Any]) -> None:
        # One short line per write with O_APPEND: a kill leaves at most a partial last line,
        # which readers skip.
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        records = []
        try:
            lines = self.metrics_path.read_text().splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a kill
        return records
