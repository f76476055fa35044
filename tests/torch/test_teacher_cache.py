"""The teacher-logit cache at scale: checksums written with the bytes and verified lazily on
read, refusal of another teacher's cache, resume rules, and bounded memory while writing."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kdspec_torch import teacher_cache  # noqa: E402
from kdspec_torch.teacher_cache import (  # noqa: E402
    CacheReader,
    CacheWriter,
    CorruptCacheError,
)

SEQ, K = 3, 2
PER_ROW = SEQ * K * teacher_cache.BYTES_PER_SLOT


def _slices(n_rows: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids per slot, probabilities 0.75 / 0.25."""
    ids = np.arange(start, start + n_rows * SEQ * K, dtype=np.int32).reshape(n_rows, SEQ, K)
    probs = np.broadcast_to(np.array([0.75, 0.25], np.float16), (n_rows, SEQ, K))
    return ids, probs


def _write(folder: Path, rows: list[int], *, teacher: str | None = "t1",
           rows_per_shard: int = 2) -> CacheWriter:
    """A finished cache of `rows`, shard s holding ids from 1000·s."""
    writer = CacheWriter(folder, np.array(rows), seq_len=SEQ, k=K, teacher_fingerprint=teacher,
                         shard_bytes=rows_per_shard * PER_ROW)
    for shard in writer.pending():
        writer.write_shard(shard, *_slices(len(writer.shard_rows(shard)), 1000 * shard))
    writer.finish(mode="topk", temperature=1.0, vocab_size=5000, node_fingerprint="n")
    return writer


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_holds_the_sha256_of_every_file(tmp_path: Path) -> None:
    _write(tmp_path, [3, 7, 8])  # 2 shards: rows {3, 7} and {8}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "kdspec-teacher-cache/2"
    assert manifest["teacher_fingerprint"] == "t1"
    names = {"rows.npy", "ids-00000.npy", "probs-00000.npy", "ids-00001.npy", "probs-00001.npy"}
    assert set(manifest["sha256"]) == names
    # The writer hashed the bytes as it wrote them; they are the files' bytes.
    assert all(manifest["sha256"][n] == _sha256(tmp_path / n) for n in names)
    assert manifest["bytes_per_token"] == K * 6


def test_round_trip_across_shards(tmp_path: Path) -> None:
    _write(tmp_path, [3, 7, 8])
    reader = CacheReader.open(tmp_path)
    ids, probs = reader.get(torch.tensor([8, 3]))
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32
    assert torch.equal(ids[0], torch.arange(1000, 1000 + SEQ * K).view(SEQ, K))  # shard 1, row 0
    assert torch.equal(ids[1], torch.arange(SEQ * K).view(SEQ, K))  # shard 0, row 0
    assert torch.equal(probs, torch.tensor([0.75, 0.25]).expand(2, SEQ, K))
    assert reader.position == {3: 0, 7: 1, 8: 2}
    with pytest.raises(KeyError, match="dataset row 5 "):
        reader.get(torch.tensor([3, 5]))
    with pytest.raises(KeyError, match="dataset row 9 "):
        reader.get(torch.tensor([9]))  # past the last row


def test_a_corrupt_shard_is_named_when_first_read(tmp_path: Path) -> None:
    _write(tmp_path, [3, 7, 8])
    corrupt = tmp_path / "probs-00001.npy"
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last probability
    corrupt.write_bytes(bytes(data))
    reader = CacheReader.open(tmp_path)  # lazily: opening does not read the shards
    assert reader.get(torch.tensor([3, 7]))[0].shape == (2, SEQ, K)  # shard 0 is intact
    with pytest.raises(CorruptCacheError) as error:
        reader.get(torch.tensor([8]))
    message = str(error.value)
    assert str(corrupt) in message and "corrupt" in message
    assert f"delete the teacher_logits node's folder ({tmp_path.parent})" in message
    assert "rerun" in message
    with pytest.raises(CorruptCacheError, match="probs-00001.npy"):
        CacheReader.open(tmp_path).verify()


def test_a_missing_shard_file_is_named(tmp_path: Path) -> None:
    _write(tmp_path, [3, 7, 8])
    (tmp_path / "ids-00000.npy").unlink()
    with pytest.raises(CorruptCacheError, match=r"ids-00000\.npy is missing.*rerun"):
        CacheReader.open(tmp_path).get(torch.tensor([7]))


def test_each_shard_is_verified_once(tmp_path: Path, monkeypatch) -> None:
    _write(tmp_path, [3, 7, 8])
    hashed: list[str] = []
    real = teacher_cache.file_sha256
    monkeypatch.setattr(teacher_cache, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    reader = CacheReader.open(tmp_path)
    assert hashed == ["rows.npy"]
    for _ in range(3):
        reader.get(torch.tensor([3, 7]))
    assert hashed == ["rows.npy", "ids-00000.npy", "probs-00000.npy"]


def test_another_teachers_cache_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, [3, 7, 8], teacher="a" * 64)
    with pytest.raises(ValueError, match=r"written by another teacher .*aaaaaaaaaaaa… != "
                                         r"bbbbbbbbbbbb….*delete the teacher_logits"):
        CacheReader.open(tmp_path, teacher_fingerprint="b" * 64)
    assert CacheReader.open(tmp_path, teacher_fingerprint="a" * 64).vocab_size == 5000


def test_a_cache_of_the_older_format_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, [0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format"] = "kdspec-teacher-cache/1"
    del manifest["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format 'kdspec-teacher-cache/1'.*rebuild the cache"):
        CacheReader.open(tmp_path)


def test_resume_keeps_the_same_teachers_shards_only(tmp_path: Path) -> None:
    rows = np.array([3, 7, 8])

    def writer(teacher: str) -> CacheWriter:
        return CacheWriter(tmp_path, rows, seq_len=SEQ, k=K, teacher_fingerprint=teacher,
                           shard_bytes=2 * PER_ROW)

    first = writer("t1")
    first.write_shard(0, *_slices(2))
    assert writer("t1").pending() == [1]  # killed after shard 0: resume at shard 1
    torn = tmp_path / ".probs-00001.npy.tmp-123"  # a killed writer's temp file
    torn.write_bytes(b"torn")
    assert writer("t2").pending() == [0, 1]  # another teacher: its shard 0 is not reused
    assert not (tmp_path / "ids-00000.npy").exists() and not torn.exists()
    # Another row set, or another shard size, starts over too.
    CacheWriter(tmp_path, rows, seq_len=SEQ, k=K, teacher_fingerprint="t2",
                shard_bytes=2 * PER_ROW).write_shard(0, *_slices(2))
    assert CacheWriter(tmp_path, rows[:2], seq_len=SEQ, k=K, teacher_fingerprint="t2",
                       shard_bytes=2 * PER_ROW).pending() == [0]
    assert writer("t2").pending() == [0, 1]


def test_a_shard_counts_only_with_its_checksums(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path, np.array([0]), seq_len=SEQ, k=K)
    writer.write_shard(0, *_slices(1))
    (tmp_path / "sha256-00000.json").unlink()  # killed between the probs file and its sums
    assert CacheWriter(tmp_path, np.array([0]), seq_len=SEQ, k=K).pending() == [0]
    with pytest.raises(RuntimeError, match=r"shards \[0\] are missing"):
        writer.finish(mode="topk", temperature=1.0, vocab_size=10)


def test_finish_refuses_a_second_teacher(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path, np.array([0]), seq_len=SEQ, k=K, teacher_fingerprint="t1")
    writer.write_shard(0, *_slices(1))
    with pytest.raises(ValueError, match="not the writer's 't1'"):
        writer.finish(mode="topk", temperature=1.0, vocab_size=10, teacher_fingerprint="t2")
    assert writer.finish(mode="topk", temperature=1.0, vocab_size=10,
                         teacher_fingerprint="t1")["teacher_fingerprint"] == "t1"


def test_rows_must_ascend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="strictly ascending"):
        CacheWriter(tmp_path, np.array([3, 3, 4]), seq_len=SEQ, k=K)


def test_writing_holds_one_shard_at_a_time(tmp_path: Path) -> None:
    """Each shard is on disk when `write_shard` returns, and the writer keeps none of it:
    writing 8 shards peaks at a small multiple of one shard, not 8."""
    seq_len, k, shard_bytes, n_shards = 64, 16, 2**20, 8
    writer = CacheWriter(tmp_path, np.arange(10_000), seq_len=seq_len, k=k,
                         shard_bytes=shard_bytes)
    writer = CacheWriter(tmp_path, writer.rows[:writer.rows_per_shard * n_shards],
                         seq_len=seq_len, k=k, shard_bytes=shard_bytes)
    assert writer.n_shards == n_shards
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        for shard in writer.pending():
            shape = (len(writer.shard_rows(shard)), seq_len, k)
            writer.write_shard(shard, rng.integers(0, 2**31, shape, dtype=np.int32),
                               rng.random(shape, dtype=np.float32).astype(np.float16))
            assert writer.has_shard(shard)
            on_disk = sum((tmp_path / f"{kind}-{shard:05d}.npy").stat().st_size
                          for kind in ("ids", "probs"))
            assert on_disk > np.prod(shape) * 6  # the whole shard, plus two .npy headers
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < shard_bytes / 4  # nothing of the shards is kept
    assert peak < 3 * shard_bytes  # vs 8 MiB written
