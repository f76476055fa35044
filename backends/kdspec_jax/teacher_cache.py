"""The on-disk teacher-logit cache, in numpy: the torch backend's format, file for file.

A cache written by either backend is read by both (``kdspec_torch.teacher_cache`` is the
reference; a test writes with one and reads with the other, and compares the files). Layout of
a `teacher_logits` node's ``cache/`` folder::

    writer.json          the writer's identity (format, seq_len, K, rows_per_shard, the rows'
                         sha256, the teacher's fingerprint): a writer of another identity
                         starts over instead of resuming
    rows.npy             int64 [R]: the dataset rows cached, strictly ascending (a row = a
                         packed row of seq_len + 1 tokens, numbered in packing order)
    ids-00000.npy        int32   [rows_per_shard, seq_len, K]: teacher token ids
    probs-00000.npy      float16 [rows_per_shard, seq_len, K]: their target probabilities
    sha256-00000.json    the sha256 of the shard's two files, written last: the shard is done
    ...                  (the last shard may have fewer rows)
    manifest.json        written last: format, mode, k, seq_len, temperature, vocab_size, rows,
                         rows_per_shard, shards, dtypes, bytes_per_token, node and teacher
                         fingerprints, and ``sha256``: file name -> sha256 of every data file

Cache row ``r`` lives in shard ``r // rows_per_shard`` at offset ``r % rows_per_shard``;
position ``t`` of a row holds the teacher's distribution for predicting token ``t + 1`` from
tokens ``≤ t``. ``rows_per_shard = max(1, 64 MiB // (seq_len · K · 6 bytes))``.

Every file goes through a temp name, fsync and rename; a file's sha256 is taken from the bytes
as they are written; a shard counts once its ``sha256-*.json`` exists, so a killed writer
resumes at the first missing shard. The reader verifies ``rows.npy`` on open and each shard's
files the first time it touches them, and raises :class:`CorruptCacheError` naming a file that
is missing or differs. float16 rounding leaves row sums within ~1e-3 of 1, so the reader
renormalises in fp32.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kdspec.plan.graph import Node
from kdspec.run.rundir import atomic_write_json

from .model import JaxModelConfig, Params
from .weights import to_hf_state_dict

__all__ = ["BYTES_PER_SLOT", "FORMAT", "SHARD_BYTES", "CacheReader", "CacheWriter",
           "CorruptCacheError", "file_sha256", "weights_fingerprint"]

FORMAT = "kdspec-teacher-cache/2"
SHARD_BYTES = 64 * 2**20
BYTES_PER_SLOT = 4 + 2  # int32 id + float16 probability


class CorruptCacheError(RuntimeError):
    """A cache file is missing or does not match the checksum its manifest recorded."""


def weights_fingerprint(params: Params, config: JaxModelConfig) -> str:
    """sha256 over the architecture (config.json keys) and every HF-named tensor's name,
    dtype, shape and bytes. (Not the torch backend's digest, which hashes transformers'
    config serialisation: a record of which teacher wrote the cache, compared only with
    caches this backend wrote.)"""
    digest = hashlib.sha256(json.dumps(config.to_hf(), sort_keys=True).encode())
    tensors = to_hf_state_dict(jax.device_get(params), config, dtype=np.float32)
    for name, array in sorted(tensors.items()):
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class _Sha256File:
    """A write-only file object that hashes every piece ``np.save`` writes through it."""

    def __init__(self, handle: Any):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` atomically (temp file, fsync, rename); the sha256 of its bytes."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        hashed = _Sha256File(handle)
        np.save(hashed, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return hashed.digest.hexdigest()


def _shard_files(shard: int) -> tuple[str, str]:
    return f"ids-{shard:05d}.npy", f"probs-{shard:05d}.npy"


class CacheWriter:
    """Writes the cache of ``rows`` (strictly ascending dataset rows) shard by shard; memory is
    bounded by one shard (at most ``shard_bytes`` on disk). A folder holding a writer of
    another identity (rows, seq_len, K, shard size or ``teacher_fingerprint``) is wiped; one
    with the same identity keeps its finished shards (resume)."""

    def __init__(self, folder: Path, rows: np.ndarray, *, seq_len: int, k: int,
                 teacher_fingerprint: str | None = None, shard_bytes: int | None = None):
        self.folder, self.seq_len, self.k = Path(folder), seq_len, k
        self.teacher_fingerprint = teacher_fingerprint
        self.rows = np.asarray(rows, np.int64)
        if np.any(np.diff(self.rows) <= 0):
            raise ValueError("cache rows must be strictly ascending")
        budget = SHARD_BYTES if shard_bytes is None else shard_bytes
        self.rows_per_shard = max(1, budget // (seq_len * k * BYTES_PER_SLOT))
        self.n_shards = -(-len(self.rows) // self.rows_per_shard)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_or_resume()

    def identity(self) -> dict[str, Any]:
        return {"format": FORMAT, "seq_len": self.seq_len, "k": self.k,
                "rows_per_shard": self.rows_per_shard,
                "rows_sha256": hashlib.sha256(self.rows.tobytes()).hexdigest(),
                "teacher_fingerprint": self.teacher_fingerprint}

    def _start_or_resume(self) -> None:
        path = self.folder / "writer.json"
        if path.exists() and json.loads(path.read_text()) == self.identity():
            return
        for stale in [*self.folder.glob("*.npy"), *self.folder.glob("*.json")]:
            stale.unlink()
        atomic_write_json(path, self.identity())
        _save_npy(self.folder / "rows.npy", self.rows)

    def shard_rows(self, shard: int) -> np.ndarray:
        start = shard * self.rows_per_shard
        return self.rows[start:start + self.rows_per_shard]

    def has_shard(self, shard: int) -> bool:
        return (self.folder / f"sha256-{shard:05d}.json").exists()

    def pending(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.has_shard(s)]

    def write_shard(self, shard: int, ids: np.ndarray, probs: np.ndarray) -> None:
        """Write shard ``shard`` (``[shard rows, seq_len, K]`` ids and probabilities, stored
        as int32 and float16), then its checksum file: on return it is done."""
        expected = (len(self.shard_rows(shard)), self.seq_len, self.k)
        if tuple(ids.shape) != expected or tuple(probs.shape) != expected:
            raise ValueError(f"shard {shard}: got {tuple(ids.shape)}, expected {expected}")
        sums = {}
        for name, data, dtype in zip(_shard_files(shard), (ids, probs), (np.int32, np.float16),
                                     strict=True):
            sums[name] = _save_npy(self.folder / name, np.ascontiguousarray(data, dtype=dtype))
        atomic_write_json(self.folder / f"sha256-{shard:05d}.json", sums)

    def finish(self, **meta: Any) -> dict[str, Any]:
        """Write manifest.json (last): the cache is complete. ``meta`` adds mode, temperature,
        vocab_size and the fingerprints."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"cannot finish the cache: shards {missing} are missing")
        teacher = meta.pop("teacher_fingerprint", None) or self.teacher_fingerprint
        if self.teacher_fingerprint is not None and teacher != self.teacher_fingerprint:
            raise ValueError(f"finish(teacher_fingerprint={teacher!r}) is not the writer's "
                             f"{self.teacher_fingerprint!r}")
        sums = {"rows.npy": file_sha256(self.folder / "rows.npy")}
        for shard in range(self.n_shards):
            sums.update(json.loads((self.folder / f"sha256-{shard:05d}.json").read_text()))
        manifest = {"format": FORMAT, "k": self.k, "seq_len": self.seq_len,
                    "rows": len(self.rows), "rows_per_shard": self.rows_per_shard,
                    "shards": self.n_shards, "ids_dtype": "int32", "probs_dtype": "float16",
                    "bytes_per_token": self.k * BYTES_PER_SLOT,
                    "teacher_fingerprint": teacher, **meta, "sha256": sums}
        atomic_write_json(self.folder / "manifest.json", manifest)
        return manifest


def _rebuild_hint(folder: Path) -> str:
    return (f"delete the teacher_logits node's folder ({folder.parent}) and rerun "
            "`kdspec run` to rebuild the cache")


def _verified(folder: Path, name: str, manifest: dict[str, Any]) -> Path:
    """``folder / name`` once its sha256 equals the manifest's."""
    path, want = folder / name, manifest["sha256"].get(name)
    if want is None:
        raise CorruptCacheError(f"{folder / 'manifest.json'} has no checksum for {name}; "
                                f"{_rebuild_hint(folder)}")
    if not path.exists():
        raise CorruptCacheError(f"teacher cache file {path} is missing; {_rebuild_hint(folder)}")
    got = file_sha256(path)
    if got != want:
        raise CorruptCacheError(f"teacher cache file {path} is corrupt: sha256 {got[:12]}…, "
                                f"its manifest recorded {want[:12]}…; {_rebuild_hint(folder)}")
    return path


@dataclass
class CacheReader:
    """Memory-mapped reads of a finished cache, by dataset row; each shard's checksums are
    verified the first time it is read."""

    folder: Path
    manifest: dict[str, Any]
    rows: np.ndarray  # int64 [R], ascending: the dataset row of each cache row
    _shards: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def position(self) -> dict[int, int]:
        """Dataset row -> cache row (for inspection; `get` does not build it)."""
        return {int(row): i for i, row in enumerate(self.rows)}

    @classmethod
    def open(cls, folder: Path, expect: Node | None = None) -> CacheReader:
        """Open the cache in ``folder``; with ``expect`` (the teacher_logits node), check that
        the cache was written by that node (fingerprint) with its settings."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"no finished teacher cache at {folder} (manifest.json is "
                                    "written last; run the teacher_logits node first)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r} "
                             f"(written by another kdspec version); {_rebuild_hint(folder)}")
        if expect is not None:
            _check_matches(manifest, expect, path)
        return cls(folder, manifest, np.load(_verified(folder, "rows.npy", manifest)))

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._shards:
            ids, probs = (np.load(_verified(self.folder, name, self.manifest), mmap_mode="r")
                          for name in _shard_files(shard))
            self._shards[shard] = (ids, probs)
        return self._shards[shard]

    def cache_rows(self, index: np.ndarray) -> np.ndarray:
        """The cache rows of dataset rows ``index``; a KeyError names a row not cached."""
        wanted = np.asarray(index, np.int64).reshape(-1)
        found = np.searchsorted(self.rows, wanted).clip(max=len(self.rows) - 1)
        missing = wanted[self.rows[found] != wanted]
        if missing.size:
            raise KeyError(f"dataset row {int(missing[0])} is not in the teacher cache (it "
                           f"holds {len(self.rows)} rows; a cache written by another backend "
                           "covers that backend's data order)")
        return found

    def get(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32, probs float32)``, each ``[len(index), seq_len, K]``, for dataset rows
        ``index``; probabilities renormalised to sum to 1 per position."""
        per_shard = self.manifest["rows_per_shard"]
        ids, probs = [], []
        for row in self.cache_rows(index).tolist():
            shard, offset = divmod(row, per_shard)
            shard_ids, shard_probs = self._shard(shard)
            ids.append(shard_ids[offset])
            probs.append(shard_probs[offset])
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
