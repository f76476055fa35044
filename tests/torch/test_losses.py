"""The plain KD losses against hand-computed values, torch's kl_div and TRL's GKD loss."""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from kdspec_torch.losses import (  # noqa: E402
    DIVERGENCES,
    cross_entropy_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    kd_loss,
    reverse_kl,
    soft_cross_entropy,
    sparse_divergence,
    sparse_forward_kl,
    sparse_soft_cross_entropy,
)

# A 2-position, 3-token case. The expected values below are computed with plain Python `math`
# from the formulas, independently of the code under test.
STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]]


def py_softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(x / t) for x in row]
    return [e / sum(exps) for e in exps]


def py_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def py_jsd(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * py_kl(p, m) + (1 - beta) * py_kl(q, m)


def py_mean_over_positions(fn, t: float = 1.0) -> float:
    rows = [
        fn(py_softmax(tr, t), py_softmax(sr, t)) for sr, tr in zip(STUDENT, TEACHER, strict=True)
    ]
    return sum(rows) / len(rows)


def logits(rows: list[list[float]], **kw) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, **kw)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_forward_and_reverse_kl_hand_computed(t: float) -> None:
    s, te = logits(STUDENT), logits(TEACHER)
    expected_fwd = py_mean_over_positions(lambda p, q: py_kl(p, q), t)
    expected_rev = py_mean_over_positions(lambda p, q: py_kl(q, p), t)
    assert forward_kl(s, te, temperature=t).item() == pytest.approx(expected_fwd, rel=1e-6)
    assert reverse_kl(s, te, temperature=t).item() == pytest.approx(expected_rev, rel=1e-6)
    assert expected_fwd != pytest.approx(expected_rev, rel=1e-3)  # the direction matters here


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("t", [1.0, 1.7])
def test_jsd_hand_computed(beta: float, t: float) -> None:
    expected = py_mean_over_positions(lambda p, q: py_jsd(p, q, beta), t)
    got = generalized_jsd(logits(STUDENT), logits(TEACHER), beta=beta, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_jsd_endpoints_are_trl_special_cases_not_limits() -> None:
    s, te = logits(STUDENT), logits(TEACHER)
    assert generalized_jsd(s, te, beta=0.0).item() == pytest.approx(forward_kl(s, te).item())
    assert generalized_jsd(s, te, beta=1.0).item() == pytest.approx(reverse_kl(s, te).item())
    # The general formula tends to 0 at both ends: beta = 0 / 1 are definitions, not limits.
    for beta in (1e-6, 1 - 1e-6):
        expected = py_mean_over_positions(lambda p, q, b=beta: py_jsd(p, q, b))
        assert expected < 1e-4
        assert generalized_jsd(s, te, beta=beta).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, te, beta=1.5)


def test_jsd_half_is_symmetric_and_bounded_by_log2() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 7, 50, generator=g).mul(4).unbind(0)
    ab = generalized_jsd(a, b, beta=0.5)
    assert ab.item() == pytest.approx(generalized_jsd(b, a, beta=0.5).item(), rel=1e-5)
    assert 0 < ab.item() < math.log(2)
    assert generalized_jsd(a, a, beta=0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_cross_entropy_is_forward_kl_plus_teacher_entropy() -> None:
    s, te = logits(STUDENT), logits(TEACHER)
    expected = py_mean_over_positions(
        lambda p, q: -sum(x * math.log(y) for x, y in zip(p, q, strict=True)), 2.0
    )
    assert soft_cross_entropy(s, te, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    entropy = sum(-sum(x * math.log(x) for x in py_softmax(r, 2.0)) for r in TEACHER) / 2
    fkl = forward_kl(s, te, temperature=2.0).item()
    assert soft_cross_entropy(s, te, temperature=2.0).item() == pytest.approx(
        fkl + entropy, rel=1e-6
    )


def test_cross_entropy_loss_hand_computed_and_ignore_index() -> None:
    s = logits(STUDENT)
    nll = [-math.log(py_softmax(STUDENT[0])[1]), -math.log(py_softmax(STUDENT[1])[2])]
    assert cross_entropy_loss(s, torch.tensor([1, 2])).item() == pytest.approx(
        sum(nll) / 2, rel=1e-6
    )
    assert cross_entropy_loss(s, torch.tensor([1, -100])).item() == pytest.approx(nll[0], rel=1e-6)
    assert cross_entropy_loss(s, torch.tensor([7, 7]), ignore_index=7).item() == 0.0


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd, soft_cross_entropy])
def test_mask_keeps_counted_positions_only(fn) -> None:
    s, te = logits(STUDENT), logits(TEACHER)
    first = fn(s[:1], te[:1]).item()
    assert fn(s, te, mask=torch.tensor([True, False])).item() == pytest.approx(first, rel=1e-6)
    # Leading dims [batch, seq]: the mean is over counted positions, not over rows.
    s3, t3 = s.reshape(1, 2, 3).repeat(2, 1, 1), te.reshape(1, 2, 3).repeat(2, 1, 1)
    mask = torch.tensor([[True, False], [True, False]])
    assert fn(s3, t3, mask=mask).item() == pytest.approx(first, rel=1e-6)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd, soft_cross_entropy])
def test_all_masked_is_zero_with_zero_gradient(fn) -> None:
    s = logits(STUDENT, requires_grad=True)
    loss = fn(s, logits(TEACHER), mask=torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_bad_mask_is_rejected() -> None:
    s, te = logits(STUDENT), logits(TEACHER)
    with pytest.raises(ValueError, match="mask shape"):
        forward_kl(s, te, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        forward_kl(s, te, mask=torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(s, te[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, te, temperature=0.0)


def test_teacher_zero_probabilities_give_no_nan() -> None:
    """A teacher with -inf logits (e.g. a masked padded vocabulary): 0·log 0 = 0."""
    te = logits([[2.0, float("-inf"), 1.0], [1.0, 1.0, float("-inf")]])
    s = logits(STUDENT, requires_grad=True)
    p = [py_softmax([2.0, 1.0]), py_softmax([1.0, 1.0])]
    q = [py_softmax(r) for r in STUDENT]
    expected = (py_kl(p[0], [q[0][0], q[0][2]]) + py_kl(p[1], q[1][:2])) / 2
    loss = forward_kl(s, te)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(s.grad).all()
    for fn in (generalized_jsd, soft_cross_entropy):
        s.grad = None
        fn(s, te).backward()
        assert torch.isfinite(s.grad).all()
    # Reverse KL is infinite there: the student puts mass where the teacher has none.
    assert reverse_kl(s, te).item() == math.inf


def test_large_logits_are_stable() -> None:
    s = logits(STUDENT).mul(1e4)
    te = logits(TEACHER).mul(1e4)
    for name in DIVERGENCES:
        assert torch.isfinite(divergence(name, s, te)).item()


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradient_matches_the_documented_formula(name: str, t: float) -> None:
    """∂D/∂z per position, as chunked_loss uses it: (q − p)/T, q⊙(log q − log p − R)/T,
    (1−β) q⊙(log q − log m − KL(q‖m))/T — here checked against autograd, over 2 positions."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    te = torch.randn(2, 9, generator=g, dtype=torch.float64)
    beta = 0.3
    divergence(name, s, te, beta=beta, temperature=t).backward()
    log_q, log_p = F.log_softmax(s.detach() / t, -1), F.log_softmax(te / t, -1)
    q, p = log_q.exp(), log_p.exp()
    if name == "forward_kl":
        expected = q - p
    elif name == "reverse_kl":
        rkl = (q * (log_q - log_p)).sum(-1, keepdim=True)
        expected = q * (log_q - log_p - rkl)
    else:
        log_m = (beta * p + (1 - beta) * q).log()
        kl_qm = (q * (log_q - log_m)).sum(-1, keepdim=True)
        expected = (1 - beta) * q * (log_q - log_m - kl_qm)
    torch.testing.assert_close(s.grad, expected / (t * 2), rtol=1e-10, atol=1e-12)


def test_forward_kl_matches_torch_kl_div() -> None:
    g = torch.Generator().manual_seed(2)
    s, te = torch.randn(2, 4, 5, 11, generator=g).mul(3).unbind(0)
    mask = torch.rand(4, 5, generator=g) > 0.3
    t = 1.5
    per_pos = F.kl_div(
        F.log_softmax(s / t, -1), F.log_softmax(te / t, -1), log_target=True, reduction="none"
    ).sum(-1)
    expected = per_pos[mask].mean()
    torch.testing.assert_close(forward_kl(s, te, temperature=t, mask=mask), expected)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl(beta: float) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(3)
    s, te = torch.randn(2, 3, 6, 40, generator=g).mul(2).unbind(0)
    labels = torch.randint(0, 40, (3, 6), generator=g)
    labels[0, :2] = -100
    labels[2, 4:] = -100
    t = 0.7
    # TRL: logits / temperature, same mixture convention; "batchmean" with labels = sum over the
    # vocabulary and the unmasked positions, divided by their number: our mean over counted ones.
    expected = gkd.GKDTrainer.generalized_jsd_loss(s, te, labels=labels, beta=beta, temperature=t)
    got = generalized_jsd(s, te, beta=beta, temperature=t, mask=labels != -100)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_divergence_dispatches_by_yaml_name() -> None:
    s, te = logits(STUDENT), logits(TEACHER)
    assert divergence("forward_kl", s, te, temperature=2.0) == forward_kl(s, te, temperature=2.0)
    assert divergence("reverse_kl", s, te) == reverse_kl(s, te)
    assert divergence("jsd", s, te, beta=0.2) == generalized_jsd(s, te, beta=0.2)
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        divergence("kl", s, te)


# ---- sparse (cached-slice) losses ----------------------------------------------------------

SLICE_IDS = [[0, 2], [2, 2]]  # position 1: a repeated id in a padding slot with weight 0
SLICE_PROBS = [[0.7, 0.3], [1.0, 0.0]]


def test_sparse_forward_kl_and_soft_ce_hand_computed() -> None:
    q = [py_softmax(r, 2.0) for r in STUDENT]
    kl = [
        0.7 * math.log(0.7 / q[0][0]) + 0.3 * math.log(0.3 / q[0][2]),
        1.0 * math.log(1.0 / q[1][2]),
    ]
    ce = [-(0.7 * math.log(q[0][0]) + 0.3 * math.log(q[0][2])), -math.log(q[1][2])]
    ids, probs = torch.tensor(SLICE_IDS), torch.tensor(SLICE_PROBS)
    s = logits(STUDENT)
    got = sparse_forward_kl(s, ids, probs, temperature=2.0)
    assert got.item() == pytest.approx(sum(kl) / 2, rel=1e-6)
    got_ce = sparse_soft_cross_entropy(s, ids, probs, temperature=2.0)
    assert got_ce.item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    masked = sparse_forward_kl(s, ids, probs, temperature=2.0, mask=torch.tensor([False, True]))
    assert masked.item() == pytest.approx(kl[1], rel=1e-6)


def test_full_slice_equals_full_forward_kl() -> None:
    g = torch.Generator().manual_seed(4)
    s, te = torch.randn(2, 5, 13, generator=g).unbind(0)
    ids = torch.arange(13).expand(5, 13)
    probs = F.softmax(te / 1.3, -1)
    torch.testing.assert_close(
        sparse_forward_kl(s, ids, probs, temperature=1.3), forward_kl(s, te, temperature=1.3)
    )
    torch.testing.assert_close(
        sparse_soft_cross_entropy(s, ids, probs, temperature=1.3),
        soft_cross_entropy(s, te, temperature=1.3),
    )


def test_sparse_divergence_refuses_what_a_slice_cannot_define() -> None:
    s, ids, probs = logits(STUDENT), torch.tensor(SLICE_IDS), torch.tensor(SLICE_PROBS)
    assert sparse_divergence("forward_kl", s, ids, probs) == sparse_forward_kl(s, ids, probs)
    for name in ("reverse_kl", "jsd"):
        with pytest.raises(ValueError, match="full distribution"):
            sparse_divergence(name, s, ids, probs)
    with pytest.raises(ValueError, match="unknown divergence"):
        sparse_divergence("fkl", s, ids, probs)
    with pytest.raises(ValueError, match="same shape"):
        sparse_forward_kl(s, ids, probs[:, :1])


# ---- kd_loss: the full objective from hidden states ----------------------------------------


def _kd_problem(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 4, 6, generator=g)
    head = torch.randn(10, 6, generator=g)
    t_hidden = torch.randn(3, 4, 8, generator=g)
    t_head = torch.randn(10, 8, generator=g)
    labels = torch.randint(0, 10, (3, 4), generator=g)
    labels[1, 2:] = -100
    return hidden, head, t_hidden, t_head, labels


@pytest.mark.parametrize("name", DIVERGENCES)
def test_kd_loss_composes_soft_and_hard_terms(name: str) -> None:
    hidden, head, t_hidden, t_head, labels = _kd_problem()
    z, tz = hidden @ head.T, t_hidden @ t_head.T
    mask = labels != -100
    soft = divergence(name, z, tz, beta=0.4, temperature=2.0, mask=mask)
    expected = 0.7 * 4.0 * soft + 0.3 * cross_entropy_loss(z, labels)
    kwargs = dict(divergence=name, beta=0.4, temperature=2.0, labels=labels, soft_scale=4.0)
    got_hidden = kd_loss(
        hidden, head, teacher_hidden=t_hidden, teacher_head_weight=t_head,
        hard_label_weight=0.3, **kwargs,
    )  # fmt: skip
    got_logits = kd_loss(hidden, head, teacher_logits=tz, hard_label_weight=0.3, **kwargs)
    torch.testing.assert_close(got_hidden, expected)
    torch.testing.assert_close(got_logits, expected)


def test_kd_loss_without_labels_counts_every_position_and_detaches_the_teacher() -> None:
    hidden, head, _, _, _ = _kd_problem()
    tz = torch.randn(3, 4, 10, requires_grad=True)
    loss = kd_loss(hidden, head, teacher_logits=tz)
    torch.testing.assert_close(loss, forward_kl(hidden @ head.T, tz))
    assert not loss.requires_grad  # nothing of the student requires grad, the teacher is cut


def test_kd_loss_with_a_slice() -> None:
    hidden, head, _, _, labels = _kd_problem()
    ids = torch.randint(0, 10, (3, 4, 3))
    probs = F.softmax(torch.randn(3, 4, 3), -1)
    got = kd_loss(hidden, head, teacher_topk=(ids, probs), labels=labels)
    expected = sparse_forward_kl(hidden @ head.T, ids, probs, mask=labels != -100)
    torch.testing.assert_close(got, expected)


def test_kd_loss_rejects_inconsistent_arguments() -> None:
    hidden, head, t_hidden, t_head, labels = _kd_problem()
    tz = t_hidden @ t_head.T
    cases = [
        (dict(), "exactly one teacher"),
        (
            dict(teacher_logits=tz, teacher_hidden=t_hidden, teacher_head_weight=t_head),
            "exactly one",
        ),
        (dict(teacher_hidden=t_hidden), "together"),
        (dict(teacher_logits=tz[..., :5]), "teacher_logits"),
        (dict(teacher_hidden=t_hidden, teacher_head_weight=t_head[:5]), "same vocabulary"),
        (dict(teacher_logits=tz, hard_label_weight=0.5), "needs labels"),
        (dict(teacher_logits=tz, hard_label_weight=1.5, labels=labels), "hard_label_weight"),
        (dict(teacher_logits=tz, labels=labels[:2]), "labels"),
        (dict(teacher_logits=tz, divergence="kl"), "unknown divergence"),
        (
            dict(teacher_topk=(labels[..., None], tz[..., :1]), divergence="jsd"),
            "full distribution",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            kd_loss(hidden, head, **kwargs)


def test_low_precision_logits_are_computed_in_fp32() -> None:
    g = torch.Generator().manual_seed(6)
    s, te = torch.randn(2, 8, 64, generator=g).mul(3).unbind(0)
    got = forward_kl(s.bfloat16(), te.bfloat16())
    assert got.dtype == torch.float32
    reference = forward_kl(s.bfloat16().float(), te.bfloat16().float())
    torch.testing.assert_close(got, reference)
