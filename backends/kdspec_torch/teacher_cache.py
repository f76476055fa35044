"""The on-disk teacher-logit cache: top-K or sampled-K slices per token, memory-mapped on read.

Layout of a `teacher_logits` node's `cache/` folder::

    writer.json          what the writer is writing (seq_len, K, rows_per_shard, the rows'
                         sha256, the teacher's fingerprint): a rerun with another identity
                         starts over instead of resuming
    rows.npy             int64 [R]: the dataset rows cached, ascending (row = a packed row
                         of seq_len + 1 tokens, numbered as `kdspec_torch.batches` numbers them)
    ids-00000.npy        int32   [rows_per_shard, seq_len, K]: teacher token ids
    probs-00000.npy      float16 [rows_per_shard, seq_len, K]: their target probabilities
    sha256-00000.json    the sha256 of the shard's two files, written last: the shard is done
    ...                  (the last shard may have fewer rows)
    manifest.json        written last: format, mode, k, seq_len, temperature, vocab_size, rows,
                         rows_per_shard, shards, dtypes, bytes_per_token, node and teacher
                         fingerprints, and `sha256`: file name -> sha256 of every data file

Cache row `r` lives in shard `r // rows_per_shard` at offset `r % rows_per_shard`; position `t`
of a row holds the teacher's distribution for predicting token `t + 1` from tokens `≤ t`.
A slot costs 6 bytes (`BYTES_PER_SLOT`): a token costs `6·K` bytes on disk.

Writing is bounded in memory and crash-safe: each shard (at most `SHARD_BYTES`) goes to disk as
soon as it is handed over, every file through a temp name, fsync and rename, its checksums are
taken from the bytes as they are written (never re-read), and a shard counts only once its
`sha256-*.json` exists, so a killed writer resumes at the first missing shard. Reading checks
the manifest's checksum of each shard lazily, the first time the shard is touched, then
memory-maps it; a mismatch raises `CorruptCacheError` naming the file.

Top-K probabilities are renormalised over the K; sampled-K ones are draw counts / K. float16
rounding leaves row sums within ~1e-3 of 1, so the reader renormalises in fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from kdspec.plan.graph import Node
from kdspec.run.rundir import atomic_write_json

__all__ = ["BYTES_PER_SLOT", "FORMAT", "SHARD_BYTES", "CacheReader", "CacheWriter",
           "CorruptCacheError", "file_sha256", "weights_fingerprint"]

FORMAT = "kdspec-teacher-cache/2"
SHARD_BYTES = 64 * 2**20
BYTES_PER_SLOT = 4 + 2  # int32 id + float16 probability


class CorruptCacheError(RuntimeError):
    """A cache file is missing or does not match the checksum its manifest recorded."""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's config and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class _HashingWriter:
    """A binary file that hashes what is written to it (np.save then writes in bounded
    pieces instead of one `tofile`, so no copy of the array is made)."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write `array` atomically (temp file, fsync, rename); the sha256 of the bytes written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        hashing = _HashingWriter(handle)
        np.save(hashing, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return hashing.digest.hexdigest()


def _as_numpy(x: Tensor | np.ndarray, dtype: type[np.generic]) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _shard_files(shard: int) -> tuple[str, str]:
    return f"ids-{shard:05d}.npy", f"probs-{shard:05d}.npy"


class CacheWriter:
    """Writes the cache of `rows` (ascending dataset rows) shard by shard.

    Memory is bounded by one shard of at most `shard_bytes` on disk (`SHARD_BYTES`; twice
    that in the caller's int64/fp32 tensors): `write_shard` writes and forgets it. A folder
    holding a writer of another identity (rows, seq_len, K, shard size or
    `teacher_fingerprint`) is wiped; one with the same identity keeps its finished shards.
    """

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

    def _identity(self) -> dict[str, Any]:
        return {"format": FORMAT, "seq_len": self.seq_len, "k": self.k,
                "rows_per_shard": self.rows_per_shard,
                "rows_sha256": hashlib.sha256(self.rows.tobytes()).hexdigest(),
                "teacher_fingerprint": self.teacher_fingerprint}

    def _start_or_resume(self) -> None:
        identity, path = self._identity(), self.folder / "writer.json"
        if path.exists() and json.loads(path.read_text()) == identity:
            return
        # Another writer's shards (other rows, shape or teacher) must not be resumed; temp
        # files of killed writers go too.
        for pattern in ("*.npy", "*.json", ".*.tmp-*"):
            for stale in self.folder.glob(pattern):
                stale.unlink()
        atomic_write_json(path, identity)
        _save_npy(self.folder / "rows.npy", self.rows)

    def shard_rows(self, shard: int) -> np.ndarray:
        start = shard * self.rows_per_shard
        return self.rows[start:start + self.rows_per_shard]

    def has_shard(self, shard: int) -> bool:
        return (self.folder / f"sha256-{shard:05d}.json").exists()

    def pending(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.has_shard(s)]

    def write_shard(self, shard: int, ids: Tensor | np.ndarray, probs: Tensor | np.ndarray) -> None:
        """Write shard `shard`: `ids` and `probs` of `[shard rows, seq_len, K]`, stored as int32
        and float16; on return it is on disk and nothing of it is kept."""
        expected = (len(self.shard_rows(shard)), self.seq_len, self.k)
        if tuple(ids.shape) != expected or tuple(probs.shape) != expected:
            raise ValueError(f"shard {shard}: got {tuple(ids.shape)}, expected {expected}")
        sums = {}
        for name, data, dtype in zip(_shard_files(shard), (ids, probs), (np.int32, np.float16),
                                     strict=True):
            sums[name] = _save_npy(self.folder / name, _as_numpy(data, dtype))
        atomic_write_json(self.folder / f"sha256-{shard:05d}.json", sums)

    def finish(self, **meta: Any) -> dict[str, Any]:
        """Write manifest.json (last): the cache is complete. `meta` adds mode, temperature,
        vocab_size and fingerprints."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"cannot finish the cache: shards {missing} are missing")
        teacher = meta.pop("teacher_fingerprint", None) or self.teacher_fingerprint
        if teacher != (self.teacher_fingerprint or teacher):
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


@dataclass
class CacheReader:
    """Memory-mapped reads of a finished cache, by dataset row; each shard's checksum is
    verified the first time it is read."""

    folder: Path
    manifest: dict[str, Any]
    rows: np.ndarray  # int64 [R], ascending: the dataset row of each cache row
    _shards: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def position(self) -> dict[int, int]:
        """Dataset row -> cache row, as a dict (for inspection; `get` does not build it)."""
        return {int(row): i for i, row in enumerate(self.rows)}

    @classmethod
    def open(cls, folder: Path, expect: Node | None = None, *,
             teacher_fingerprint: str | None = None) -> CacheReader:
        """Open the cache in `folder`; with `expect` (the teacher_logits node), check that the
        cache was written by that node (fingerprint) with its settings; with
        `teacher_fingerprint`, that it was written by that teacher (`weights_fingerprint`)."""
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
        if teacher_fingerprint is not None and (
                manifest.get("teacher_fingerprint") != teacher_fingerprint):
            raise ValueError(
                f"{path} was written by another teacher (teacher fingerprint "
                f"{str(manifest.get('teacher_fingerprint'))[:12]}… != {teacher_fingerprint[:12]}…)"
                f"; {_rebuild_hint(folder)}")
        rows = np.load(_verified(folder, "rows.npy", manifest))
        return cls(folder, manifest, rows)

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's `(ids, probs)` memory maps; the files' checksums are verified once."""
        if shard not in self._shards:
            self._shards[shard] = tuple(
                np.load(_verified(self.folder, name, self.manifest), mmap_mode="r")
                for name in _shard_files(shard))
        return self._shards[shard]

    def verify(self) -> None:
        """Verify every shard's checksums now (reads the whole cache once)."""
        for shard in range(self.manifest["shards"]):
            self._shard(shard)

    def cache_rows(self, index: Tensor | np.ndarray) -> np.ndarray:
        """The cache rows of dataset rows `index`; KeyError names a row that is not cached."""
        wanted = np.asarray(index, dtype=np.int64).reshape(-1)
        found = np.searchsorted(self.rows, wanted)
        hit = found < len(self.rows)
        hit[hit] = self.rows[found[hit]] == wanted[hit]
        if not hit.all():
            raise KeyError(f"dataset row {int(wanted[~hit][0])} is not in the teacher cache")
        return found

    def get(self, index: Tensor, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """`(ids int64, probs fp32)`, each `[len(index), seq_len, K]`, for dataset rows `index`;
        probabilities renormalised to sum to 1 per position."""
        per_shard = self.manifest["rows_per_shard"]
        ids, probs = [], []
        for row in self.cache_rows(index.cpu().numpy()).tolist():
            shard, offset = divmod(row, per_shard)
            shard_ids, shard_probs = self._shard(shard)
            ids.append(shard_ids[offset])
            probs.append(shard_probs[offset])
        ids_t = torch.from_numpy(np.stack(ids).astype(np.int64)).to(device)
        probs_t = torch.from_numpy(np.stack(probs).astype(np.float32)).to(device)
        return ids_t, probs_t / probs_t.sum(dim=-1, keepdim=True)


def _rebuild_hint(folder: Path) -> str:
    return (f"delete the teacher_logits node's folder ({folder.parent}) and rerun "
            "`kdspec run` to rebuild the cache")


def _verified(folder: Path, name: str, manifest: dict[str, Any]) -> Path:
    """`folder / name` after checking its sha256 against the manifest's."""
    path = folder / name
    want = manifest["sha256"].get(name)
    if want is None:
        raise CorruptCacheError(f"{folder / 'manifest.json'} has no checksum for {name}; "
                                f"{_rebuild_hint(folder)}")
    if not path.exists():
        raise CorruptCacheError(f"teacher cache file {path} is missing; {_rebuild_hint(folder)}")
    got = file_sha256(path)
    if got != want:
        raise CorruptCacheError(
            f"teacher cache file {path} is corrupt: its sha256 {got[:12]}… is not the "
            f"{want[:12]}… its manifest recorded; {_rebuild_hint(folder)}")
    return path


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
