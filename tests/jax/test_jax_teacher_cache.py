"""Teacher slices (top-K, sampled-K) and the on-disk cache: hand-computed values, the torch
backend's definitions, and one file format read and written by both backends."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdspec_jax.teacher_cache import CacheReader, CacheWriter, CorruptCacheError, file_sha256
from kdspec_jax.teacher_slice import densify_slice, sampled_slice, topk_slice


def test_topk_slice_by_hand() -> None:
    ids, probs = topk_slice(jnp.asarray([[1.0, 3.0, 2.0, 0.0]]), 2)
    np.testing.assert_array_equal(ids, [[1, 2]])
    e = math.e
    np.testing.assert_allclose(probs, [[e / (e + 1), 1 / (e + 1)]], rtol=1e-6)  # e³/(e³+e²)
    _, hot = topk_slice(jnp.asarray([[1.0, 3.0, 2.0, 0.0]]), 2, temperature=2.0)
    np.testing.assert_allclose(hot, [[1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))]],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="k must be in"):
        topk_slice(jnp.zeros((1, 4)), 5)


def test_topk_slice_matches_the_torch_backend() -> None:
    torch = pytest.importorskip("torch")
    torch_slice = pytest.importorskip("kdspec_torch.teacher_slice")
    logits = np.random.default_rng(0).normal(size=(3, 5, 40)).astype(np.float32)
    ids, probs = topk_slice(jnp.asarray(logits), 7, temperature=1.5)
    want_ids, want_probs = torch_slice.topk_slice(torch.from_numpy(logits), 7, temperature=1.5)
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_allclose(probs, want_probs.numpy(), rtol=1e-5)


def test_sampled_slice_layout_by_hand() -> None:
    """A near-certain token is drawn K times: one slot holds 1, the repeats 0. Otherwise ids
    come sorted, each distinct id's weight (its count / K) on its first slot."""
    ids, probs = sampled_slice(jnp.asarray([[0.0, 60.0, 0.0, 0.0, 0.0]]), 4, jax.random.key(0))
    np.testing.assert_array_equal(ids, [[1, 1, 1, 1]])
    np.testing.assert_array_equal(probs, [[1.0, 0.0, 0.0, 0.0]])
    ids, probs = sampled_slice(jnp.zeros((50, 10)), 8, jax.random.key(1))
    ids, probs = np.asarray(ids), np.asarray(probs)
    assert (np.diff(ids, axis=-1) >= 0).all()
    for row_ids, row_probs in zip(ids, probs, strict=True):
        first = np.r_[True, row_ids[1:] != row_ids[:-1]]
        expected = [np.sum(row_ids == i) / 8 if f else 0.0 for i, f in zip(row_ids, first,
                                                                           strict=True)]
        np.testing.assert_allclose(row_probs, expected)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_sampled_slice_is_unbiased() -> None:
    """E[count / K] = p: averaged over 4000 positions the densified target is p (the standard
    error per token is sqrt(p(1 − p) / (K·N)) < 0.004)."""
    p = np.asarray([0.5, 0.3, 0.15, 0.05])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (4000, 4))
    ids, probs = sampled_slice(logits * 2.0, 4, jax.random.key(2), temperature=2.0)
    mean = np.asarray(densify_slice(ids, probs, 4)).mean(axis=0)
    np.testing.assert_allclose(mean, p, atol=0.02)


def _slices(rows: int, seq: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, (rows, seq, k)).astype(np.int32)
    probs = rng.dirichlet(np.ones(k), (rows, seq)).astype(np.float32)
    return ids, probs


def test_cache_round_trip_across_shards_and_resume(tmp_path: Path) -> None:
    seq, k = 3, 2
    rows = np.asarray([1, 4, 5, 9, 12])
    writer = CacheWriter(tmp_path, rows, seq_len=seq, k=k, shard_bytes=2 * seq * k * 6)
    assert (writer.rows_per_shard, writer.n_shards) == (2, 3)  # two rows a shard
    data = {s: _slices(len(writer.shard_rows(s)), seq, k, seed=s) for s in range(3)}
    writer.write_shard(0, *data[0])
    again = CacheWriter(tmp_path, rows, seq_len=seq, k=k, shard_bytes=2 * seq * k * 6)
    assert again.pending() == [1, 2]  # a killed writer, restarted, keeps shard 0
    with pytest.raises(RuntimeError, match=r"shards \[1, 2\] are missing"):
        again.finish(mode="topk")
    for shard in again.pending():
        again.write_shard(shard, *data[shard])
    manifest = again.finish(mode="topk", temperature=1.0, vocab_size=100)
    assert manifest["sha256"]["ids-00002.npy"] == file_sha256(tmp_path / "ids-00002.npy")
    reader = CacheReader.open(tmp_path)
    ids, probs = reader.get(np.asarray([9, 1]))
    np.testing.assert_array_equal(ids, [data[1][0][1], data[0][0][0]])
    np.testing.assert_allclose(probs[0], data[1][1][1], atol=2e-3)  # float16 on disk
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)  # renormalised
    with pytest.raises(KeyError, match="row 2 is not in the teacher cache"):
        reader.get(np.asarray([2]))
    CacheWriter(tmp_path, rows[:3], seq_len=seq, k=k)  # another identity wipes the old cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.npy", "writer.json"]
    with pytest.raises(ValueError, match="strictly ascending"):
        CacheWriter(tmp_path, np.asarray([3, 3]), seq_len=seq, k=k)


def test_a_corrupt_shard_is_named_when_first_read(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path, np.asarray([0, 1]), seq_len=2, k=2, shard_bytes=2 * 2 * 6)
    for shard in range(2):
        writer.write_shard(shard, *_slices(1, 2, 2, seed=shard))
    writer.finish(mode="topk", temperature=1.0, vocab_size=100)
    raw = bytearray((tmp_path / "probs-00001.npy").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "probs-00001.npy").write_bytes(bytes(raw))
    reader = CacheReader.open(tmp_path)
    reader.get(np.asarray([0]))  # shard 0 is intact
    with pytest.raises(CorruptCacheError, match="probs-00001.npy is corrupt"):
        reader.get(np.asarray([1]))


def test_one_cache_format_for_both_backends(tmp_path: Path) -> None:
    """A cache the JAX backend writes is read by kdspec_torch's reader and the other way
    round; for the same slices both write the same files and manifest."""
    torch = pytest.importorskip("torch")
    torch_cache = pytest.importorskip("kdspec_torch.teacher_cache")
    rows, (ids, probs) = np.asarray([0, 3, 7]), _slices(3, 4, 5, seed=0)
    meta = {"mode": "topk", "temperature": 1.0, "vocab_size": 100, "node_fingerprint": "n",
            "teacher_fingerprint": "t"}

    jax_writer = CacheWriter(tmp_path / "jax", rows, seq_len=4, k=5)
    jax_writer.write_shard(0, ids, probs)
    jax_manifest = jax_writer.finish(**meta)
    got_ids, got_probs = torch_cache.CacheReader.open(tmp_path / "jax").get(
        torch.tensor([7, 0]))
    np.testing.assert_array_equal(got_ids.numpy(), ids[[2, 0]])
    np.testing.assert_allclose(got_probs.numpy(), CacheReader.open(tmp_path / "jax").get(
        np.asarray([7, 0]))[1], rtol=1e-6)

    torch_writer = torch_cache.CacheWriter(tmp_path / "torch", rows, seq_len=4, k=5)
    torch_writer.write_shard(0, torch.from_numpy(ids), torch.from_numpy(probs))
    torch_manifest = torch_writer.finish(**meta)
    got_ids, got_probs = CacheReader.open(tmp_path / "torch").get(np.asarray([3]))
    want_ids, want_probs = torch_cache.CacheReader.open(tmp_path / "torch").get(
        torch.tensor([3]))
    np.testing.assert_array_equal(got_ids, want_ids.numpy())
    np.testing.assert_allclose(got_probs, want_probs.numpy(), rtol=1e-6)

    assert jax_manifest == torch_manifest
    files = sorted(p.name for p in (tmp_path / "torch").iterdir())
    assert sorted(p.name for p in (tmp_path / "jax").iterdir()) == files
    for name in files:
        assert (tmp_path / "jax" / name).read_bytes() == (tmp_path / "torch" / name).read_bytes()
