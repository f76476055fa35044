"""Fingerprints: a hash of a node's resolved config, its inputs' fingerprints and code version."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .. import __version__


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal configs give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(kind: str, config: dict[str, Any], input_fingerprints: dict[str, str],
                code_version: str = __version__) -> str:
    """sha256 over (node kind, canonical config, role -> input fingerprint, code version)."""
    payload = canonical_json(
        {"kind": kind, "config": config, "inputs": input_fingerprints, "code": code_version}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
