"""The on-disk teacher-logit cache, in numpy: the torch backend's format, byte for byte.

A cache written by either backend is read by both (``kdspec_torch.teacher_cache`` is the
reference; a test writes with one and reads with the other). Layout of a `teacher_logits`
node's ``cache/`` folder::

    rows.npy             int64 [R]: the dataset rows cached, ascending (a row = a packed row
                         of seq_len + 1 tokens, numbered in packing order)
    ids-00000.npy        int32   [rows_per_shard, seq_len, K]: teacher token ids
    probs-00000.npy      float16 [rows_per_shard, seq_len, K]: their target probabilities
    ...                  (the last shard may have fewer rows)
    manifest.json        written last: format, mode, k, seq_len, temperature, vocab_size, rows,
                         rows_per_shard, shards, dtypes, bytes_per_token, node and teacher
                         fingerprints

Cache row ``r`` lives in shard ``r // rows_per_shard`` at offset ``r % rows_per_shard``;
position ``t`` of a row holds the teacher's distribution for predicting token ``t + 1`` from
tokens ``≤ t``. ``rows_per_shard = max(1, 64 MiB // (seq_len · K · 6 bytes))``. Every file is
written to a temp name, fsynced and renamed, and a shard counts only when its probs file
(written after its ids) exists, so a killed writer resumes at the first missing shard and a
reader never sees a torn file. float16 rounding leaves row sums within ~1e-3 of 1, so the
reader renormalises in fp32.

Which rows a cache holds depends on the backend that wrote it: each backend's epoch sampler
draws its own permutation (numpy here, torch there), and a `teacher_logits` node caches the rows
its own backend's train node will visit. A cache read by the other backend's trainer must
therefore cover the rows that trainer visits (always true once the budget spans an epoch);
otherwise the reader names the missing row.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kdspec.plan.graph import Node
from kdspec.run.rundir import atomic_write_json

from .model import JaxModelConfig, Params
from .weights import to_hf_state_dict

__all__ = ["BYTES_PER_SLOT", "FORMAT", "SHARD_BYTES", "CacheReader", "CacheWriter",
           "weights_fingerprint"]

FORMAT = "kdspec-teacher-cache/1"
SHARD_BYTES = 64 * 2**20
BYTES_PER_SLOT = 4 + 2  # int32 id + float16 probability


def weights_fingerprint(params: Params, config: JaxModelConfig) -> str:
    """sha256 over the architecture (config.json keys) and every HF-named tensor's name,
    dtype, shape and bytes. (Not the torch backend's digest, which hashes transformers'
    config serialisation; it is a record of which teacher wrote the cache, never compared
    across backends.)"""
    digest = hashlib.sha256(json.dumps(config.to_hf(), sort_keys=True).encode())
    tensors = to_hf_state_dict(jax.device_get(params), config, dtype=np.float32)
    for name, array in sorted(tensors.items()):
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CacheWriter:
    """Writes the cache of ``rows`` (ascending dataset rows) shard by shard; bounded memory:
    one shard of at most SHARD_BYTES is held at a time. Opening a folder that holds another
    row set wipes it; one with the same rows keeps its finished shards (resume)."""

    def __init__(self, folder: Path, rows: np.ndarray, *, seq_len: int, k: int):
        self.folder, self.seq_len, self.k = folder, seq_len, k
        self.rows = np.asarray(rows, np.int64)
        self.rows_per_shard = max(1, SHARD_BYTES // (seq_len * k * BYTES_PER_SLOT))
        self.n_shards = -(-len(self.rows) // self.rows_per_shard)
        folder.mkdir(parents=True, exist_ok=True)
        rows_file = folder / "rows.npy"
        if not rows_file.exists() or not np.array_equal(np.load(rows_file), self.rows):
            for stale in [*folder.glob("*.npy"), folder / "manifest.json"]:
                stale.unlink(missing_ok=True)
            _save_npy(rows_file, self.rows)

    def shard_rows(self, shard: int) -> np.ndarray:
        start = shard * self.rows_per_shard
        return self.rows[start:start + self.rows_per_shard]

    def has_shard(self, shard: int) -> bool:
        return (self.folder / f"probs-{shard:05d}.npy").exists()

    def pending(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.has_shard(s)]

    def write_shard(self, shard: int, ids: np.ndarray, probs: np.ndarray) -> None:
        expected = (len(self.shard_rows(shard)), self.seq_len, self.k)
        if tuple(ids.shape) != expected or tuple(probs.shape) != expected:
            raise ValueError(f"shard {shard}: got {tuple(ids.shape)}, expected {expected}")
        _save_npy(self.folder / f"ids-{shard:05d}.npy", np.asarray(ids).astype(np.int32))
        _save_npy(self.folder / f"probs-{shard:05d}.npy", np.asarray(probs).astype(np.float16))

    def finish(self, **meta: Any) -> dict[str, Any]:
        """Write manifest.json (last): the cache is complete."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"cannot finish the cache: shards {missing} are missing")
        manifest = {"format": FORMAT, "k": self.k, "seq_len": self.seq_len,
                    "rows": len(self.rows), "rows_per_shard": self.rows_per_shard,
                    "shards": self.n_shards, "ids_dtype": "int32", "probs_dtype": "float16",
                    "bytes_per_token": self.k * BYTES_PER_SLOT, **meta}
        atomic_write_json(self.folder / "manifest.json", manifest)
        return manifest


@dataclass
class CacheReader:
    """Memory-mapped reads of a finished cache, by dataset row."""

    manifest: dict[str, Any]
    ids: list[np.ndarray]
    probs: list[np.ndarray]
    position: dict[int, int]  # dataset row -> cache row

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @classmethod
    def open(cls, folder: Path, expect: Node | None = None) -> CacheReader:
        """Open the cache in ``folder``; with ``expect`` (the teacher_logits node), check that
        the cache was written by that node (fingerprint) with its settings."""
        path = folder / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"no finished teacher cache at {folder} (manifest.json is "
                                    "written last; run the teacher_logits node first)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if expect is not None:
            _check_matches(manifest, expect, path)
        rows = np.load(folder / "rows.npy")
        shards = range(manifest["shards"])
        return cls(manifest,
                   [np.load(folder / f"ids-{s:05d}.npy", mmap_mode="r") for s in shards],
                   [np.load(folder / f"probs-{s:05d}.npy", mmap_mode="r") for s in shards],
                   {int(row): i for i, row in enumerate(rows)})

    def get(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32, probs float32)``, each ``[len(index), seq_len, K]``, for dataset rows
        ``index``; probabilities renormalised to sum to 1 per position."""
        per_shard = self.manifest["rows_per_shard"]
        ids, probs = [], []
        for row in np.asarray(index).tolist():
            if row not in self.position:
                raise KeyError(f"dataset row {row} is not in the teacher cache (it holds "
                               f"{len(self.position)} rows; a cache written by another "
                               "backend covers that backend's data order)")
            shard, offset = divmod(self.position[row], per_shard)
            ids.append(self.ids[shard][offset])
            probs.append(self.probs[shard][offset])
        probs_np = np.stack(probs).astype(np.float32)
        return np.stack(ids).astype(np.int32), probs_np / probs_np.sum(axis=-1, keepdims=True)


def _check_matches(manifest: dict[str, Any], node: Node, path: Path) -> None:
    config = node.config
    expected = {"mode": config["cache"]["mode"], "k": config["cache"]["k"],
                "seq_len": config["seq_len"], "temperature": config["temperature"]}
    if node.fingerprint:
        expected["node_fingerprint"] = node.fingerprint
    wrong = {key: (manifest.get(key), value) for key, value in expected.items()
             if manifest.get(key) != value}
    if wrong:
        detail = ", ".join(f"{key}: cache {got!r} != plan {want!r}"
                           for key, (got, want) in wrong.items())
        raise ValueError(f"{path} does not match its plan node `{node.id}` ({detail}); rerun it")
