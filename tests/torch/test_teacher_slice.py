"""Teacher-logit cache slices: exact top-K renormalisation, unbiased sampled-K targets."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kdspec_torch.losses import soft_cross_entropy, sparse_soft_cross_entropy  # noqa: E402
from kdspec_torch.teacher_slice import densify_slice, sampled_slice, topk_slice  # noqa: E402

LOGITS = [0.3, 2.0, -1.0, 1.2, 0.0, 2.5, -0.4, 0.9]


def np_softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    e = np.exp((x - x.max(-1, keepdims=True)) / t)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_topk_keeps_the_k_largest_renormalised(t: float) -> None:
    x = np.array([LOGITS, LOGITS[::-1]], dtype=np.float64)
    ids, probs = topk_slice(torch.tensor(x, dtype=torch.float32), 3, temperature=t)
    p = np_softmax(x, t)
    expected_ids = np.argsort(-x, axis=-1)[:, :3]
    np.testing.assert_array_equal(ids.numpy(), expected_ids)
    kept = np.take_along_axis(p, expected_ids, -1)
    np.testing.assert_allclose(probs.numpy(), kept / kept.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, rtol=1e-6)
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32


def test_topk_of_the_whole_vocabulary_is_the_distribution() -> None:
    x = torch.tensor([LOGITS])
    ids, probs = topk_slice(x, len(LOGITS))
    torch.testing.assert_close(densify_slice(ids, probs, len(LOGITS)), torch.softmax(x, -1))


def test_slice_arguments_are_checked() -> None:
    x = torch.tensor([LOGITS])
    for fn in (topk_slice, sampled_slice):
        with pytest.raises(ValueError, match="k must be"):
            fn(x, 0)
        with pytest.raises(ValueError, match="k must be"):
            fn(x, len(LOGITS) + 1)
        with pytest.raises(ValueError, match="temperature"):
            fn(x, 2, temperature=0.0)


def test_sampled_slice_shape_weights_and_merged_duplicates() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 20, generator=g)
    k = 16
    ids, probs = sampled_slice(x, k, generator=g)
    assert ids.shape == probs.shape == (3, 5, k)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5))
    counts = probs * k  # each weight is count / K
    torch.testing.assert_close(counts, counts.round())
    for row_ids, row_probs in zip(ids.reshape(-1, k), probs.reshape(-1, k), strict=True):
        kept = row_ids[row_probs > 0]
        assert kept.unique().numel() == kept.numel()  # duplicates merged into one slot
        assert set(row_ids.tolist()) == set(kept.tolist())  # padding repeats a kept id
    assert (probs == 0).any()  # 16 draws from 20 tokens repeat some with this seed


def test_sampled_slice_of_a_point_mass() -> None:
    x = torch.full((1, 10), -50.0)
    x[0, 7] = 50.0
    ids, probs = sampled_slice(x, 4, generator=torch.Generator().manual_seed(0))
    assert ids.tolist() == [[7, 7, 7, 7]]
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_sampled_slice_is_reproducible_with_a_generator() -> None:
    x = torch.randn(4, 30)
    a = sampled_slice(x, 8, generator=torch.Generator().manual_seed(1))
    b = sampled_slice(x, 8, generator=torch.Generator().manual_seed(1))
    c = sampled_slice(x, 8, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(densify_slice(*a, 30), densify_slice(*c, 30))


def test_sampled_slice_is_unbiased() -> None:
    """E[counts / K] = p: the mean target of M independent slices is within 4 standard errors
    (sqrt(p(1 − p) / (K·M)) per token) of the teacher's distribution at temperature T."""
    vocab, k, m, t = len(LOGITS), 4, 20_000, 1.5
    x = torch.tensor(LOGITS).expand(m, vocab)
    ids, probs = sampled_slice(x, k, temperature=t, generator=torch.Generator().manual_seed(3))
    mean = densify_slice(ids, probs, vocab).double().mean(0).numpy()
    p = np_softmax(np.array(LOGITS), t)
    se = np.sqrt(p * (1 - p) / (k * m))
    assert np.all(np.abs(mean - p) < 4 * se), (mean - p) / se
    # ...and the test can tell: the top-K target is off by far more than that.
    top_ids, top_probs = topk_slice(x[:1], k, temperature=t)
    assert np.abs(densify_slice(top_ids, top_probs, vocab)[0].numpy() - p).max() > 20 * se.max()


def test_sparse_soft_cross_entropy_is_unbiased_for_the_full_one() -> None:
    """E over sampled slices of −Σ_k p̂_k log q_{id_k} equals −Σ_v p_v log q_v."""
    vocab, k, m = 50, 8, 4_000
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(1, vocab, generator=g).mul(2)
    student = torch.randn(1, vocab, generator=g).mul(2)
    ids, probs = sampled_slice(teacher.expand(m, vocab), k, generator=g)
    per_slice = torch.stack(
        [sparse_soft_cross_entropy(student, ids[i : i + 1], probs[i : i + 1]) for i in range(m)]
    ).double()
    full = soft_cross_entropy(student, teacher).item()
    se = per_slice.std().item() / math.sqrt(m)
    assert abs(per_slice.mean().item() - full) < 4 * se
    assert se < 0.05 * full  # the check is tight enough to mean something


def test_densify_adds_repeated_ids() -> None:
    ids = torch.tensor([[1, 1, 3]])
    probs = torch.tensor([[0.25, 0.25, 0.5]])
    assert densify_slice(ids, probs, 4).tolist() == [[0.0, 0.5, 0.0, 0.5]]
