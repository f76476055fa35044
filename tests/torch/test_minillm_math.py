"""MiniLLM's loss pieces against hand-computed values and exact gradients on toy vocabularies."""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from kdspec_torch.minillm.math import (  # noqa: E402
    advantages,
    clip_fraction,
    discounted_returns,
    importance_weights,
    masked_whiten,
    mixture_probs,
    normalised_returns,
    per_token_reverse_kl,
    policy_ratio,
    ppo_policy_loss,
    pretrain_loss,
    remaining_tokens,
    single_step_loss,
    tempered,
    token_logprobs,
    token_rewards,
)

pytestmark = pytest.mark.torch

T = torch.tensor
B = torch.bool


def _close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> bool:
    return torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol)


def _log(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).log()


# ---------------------------------------------------------------- teacher-mixed sampling


def test_mixture_probs_hand_computed():
    q, p = T([0.5, 0.5, 0.0]), T([0.1, 0.3, 0.6])
    # 0.2·p + 0.8·q
    assert torch.allclose(mixture_probs(q, p, 0.2), T([0.42, 0.46, 0.12]))


def test_importance_weights_hand_computed():
    # q(y)=0.5, p(y)=0.1: mix = 0.8·0.5 + 0.2·0.1 = 0.42, w = 0.5/0.42
    # q(y)=0.1, p(y)=0.6: mix = 0.08 + 0.12 = 0.20, w = 0.5
    w = importance_weights(_log(0.5, 0.1), _log(0.1, 0.6), alpha=0.2)
    assert w.tolist() == pytest.approx([0.5 / 0.42, 0.5], rel=1e-6)


def test_importance_weights_edge_alphas_and_bound():
    log_q, log_p = _log(0.5, 0.1, 1e-30), _log(0.1, 0.6, 0.3)
    assert importance_weights(log_q, log_p, 0.0).tolist() == [1.0, 1.0, 1.0]
    only_teacher = importance_weights(log_q, log_p, 1.0).tolist()
    assert only_teacher == pytest.approx([5.0, 1 / 6, 1e-30 / 0.3])
    w = importance_weights(log_q, log_p, 0.2)
    assert (w <= 1 / 0.8 + 1e-6).all() and (w >= 0).all()
    with pytest.raises(ValueError, match="teacher_mix_alpha"):
        importance_weights(log_q, log_p, 1.5)


def test_token_logprobs_and_tempered_keep_set():
    logits = T([[2.0, 0.0, 0.0]])
    keep = T([[True, True, False]])
    # keep set {0, 1} at T=2: softmax([1, 0]) -> log(e/(e+1)) for token 0
    lp = token_logprobs(tempered(logits, 2.0, keep), T([0]))
    assert lp.item() == pytest.approx(math.log(math.e / (math.e + 1)))
    assert token_logprobs(tempered(logits, 2.0, keep), T([2])).item() == -math.inf


# ---------------------------------------------------------------- rewards


def test_token_rewards_divide_then_clip():
    # log p − log q = [ln(0.1/0.5), 0.8, 0.3]; / 0.5 -> [−3.2189, 1.6, 0.6]; clip ±1
    log_p = T([[math.log(0.1), 0.8, 0.3, 5.0]])
    log_q = T([[math.log(0.5), 0.0, 0.0, 0.0]])
    mask = T([[True, True, True, False]])
    r = token_rewards(log_p, log_q, mask, reward_scaling=0.5, cliprange_reward=1.0)
    # clipping first would give 0.8/0.5 = 1.6 for the second token: the order matters
    assert _close(r, [[-1.0, 1.0, 0.6, 0.0]])
    unclipped = token_rewards(log_p, log_q, mask, reward_scaling=0.5)
    assert unclipped[0, 0].item() == pytest.approx(2 * math.log(0.2))


# ---------------------------------------------------------------- returns and advantages


def test_discounted_returns_hand_computed():
    r = T([[1.0, 2.0, 3.0, 0.0]])
    # γ=0.5: R_2 = 3, R_1 = 2 + 1.5 = 3.5, R_0 = 1 + 0.5·3.5 = 2.75
    assert discounted_returns(r, 0.5).tolist() == [[2.75, 3.5, 3.0, 0.0]]
    assert discounted_returns(r, 1.0).tolist() == [[6.0, 5.0, 3.0, 0.0]]


def test_remaining_tokens_and_length_normalised_returns():
    mask = T([[True, True, True, False], [True, False, False, False]])
    assert remaining_tokens(mask).tolist() == [[3, 2, 1, 1], [1, 1, 1, 1]]
    r = T([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    out = normalised_returns(r, mask, gamma=0.5, length_norm=True)
    assert _close(out, [[2.75 / 3, 3.5 / 2, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    raw = normalised_returns(r, mask, gamma=0.5, length_norm=False)
    assert _close(raw, [[2.75, 3.5, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])


def test_masked_whiten_ignores_padding():
    values = T([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = T([[True, True, False], [True, False, False]])
    # over {1, 2, 3}: mean 2, Bessel variance 1
    out = masked_whiten(values, mask)
    assert _close(out, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    reference = torch.var_mean(T([1.0, 2.0, 3.0]))  # the official whiten's statistics
    assert reference[0].item() == pytest.approx(1.0) and reference[1].item() == pytest.approx(2.0)


def test_advantages_compose_and_detach():
    r = T([[1.0, 2.0, 3.0, 0.0]], requires_grad=True)
    mask = T([[True, True, True, False]])
    a = advantages(r, mask, gamma=0.5, length_norm=True, whiten=True)
    expect = masked_whiten(T([[2.75 / 3, 1.75, 3.0, 0.0]]), mask)
    assert torch.allclose(a, expect) and not a.requires_grad
    a_raw = advantages(r, mask, gamma=0.5, length_norm=False, whiten=False)
    assert a_raw.tolist() == [[2.75, 3.5, 3.0, 0.0]]


# ---------------------------------------------------------------- PPO


def test_policy_ratio_multiplies_weight_and_masks():
    logp = T([[math.log(1.5), 0.0, 50.0]])
    old = T([[0.0, 0.0, -50.0]])
    w = T([[1.0, 1.25, 0.9]])
    mask = T([[True, True, False]])
    # outside the mask the log-ratio is 0 (no exp(100) overflow): ρ = w
    assert _close(policy_ratio(logp, old, w, mask), [[1.5, 1.25, 0.9]])


@pytest.mark.parametrize(
    ("ratio", "adv", "expected"),
    [
        (1.5, 1.0, -1.2),  # max(−1.5, −1.2): the clipped branch
        (1.5, -1.0, 1.5),  # max(1.5, 1.2)
        (0.5, 1.0, -0.5),  # max(−0.5, −0.8)
        (0.5, -1.0, 0.8),  # max(0.5, 0.8): the clipped branch
        (1.1, 2.0, -2.2),  # inside [0.8, 1.2]: no clipping
    ],
)
def test_ppo_policy_loss_clipping(ratio, adv, expected):
    loss = ppo_policy_loss(T([[ratio]]), T([[adv]]), T([[True]]), clip_range=0.2)
    assert loss.item() == pytest.approx(expected)


def test_ppo_loss_mean_over_mask_and_weight_inside_clip():
    logp = T([[0.0, math.log(1.5), 0.0]], requires_grad=True)
    old = T([[0.0, 0.0, 0.0]])
    w = T([[1.25, 1.0, 1.0]])  # ρ·w = 1.25 is clipped to 1.2 although ρ = 1
    adv = T([[1.0, -1.0, 7.0]])
    mask = T([[True, True, False]])
    ratio = policy_ratio(logp, old, w, mask)
    loss = ppo_policy_loss(ratio, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    loss.backward()
    # token 0 is on the clipped branch (no gradient); token 1: d/dlogp (A·ρ)/2 = −(−1)·1.5/2
    assert _close(logp.grad, [[0.0, 0.75, 0.0]])
    assert clip_fraction(ratio.detach(), mask, 0.2).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- single-step term


def test_single_step_loss_hand_computed():
    q, p = T([0.5, 0.25, 0.25]), T([0.25, 0.5, 0.25])
    # Σ q (log q − log p) = 0.5·ln 2 + 0.25·ln 0.5 = 0.25·ln 2
    value = single_step_loss(q.log()[None, None], p.log()[None, None], T([[True]]))
    assert value.item() == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_per_token_reverse_kl_with_filtered_tokens():
    inf = math.inf
    # q = [0.5, 0.25, 0.25, 0] (last token filtered out), p = [0.25, 0.5, 0.25, 0]
    student = T([[math.log(0.5), math.log(0.25), math.log(0.25), -inf]])
    teacher = T([[math.log(0.25), math.log(0.5), math.log(0.25), -inf]])
    kl = per_token_reverse_kl(student, teacher)
    assert kl.tolist() == pytest.approx([0.25 * math.log(2)])
    # the teacher rules out a token the student samples: infinite, not NaN
    assert per_token_reverse_kl(T([[0.0, 0.0]]), T([[0.0, -inf]])).item() == inf


def test_single_step_gradient_is_exact_reverse_kl_gradient():
    """The term's gradient in the student logits is the exact reverse-KL gradient: the analytic
    `q_v (log q_v − log p_v − KL)` and autograd through torch.distributions' KL."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    mask = T([[True, True, False], [True, False, False]])
    (grad,) = torch.autograd.grad(single_step_loss(z, teacher, mask), z)

    q, log_q, log_p = z.softmax(-1), z.log_softmax(-1), teacher.log_softmax(-1)
    kl = (q * (log_q - log_p)).sum(-1, keepdim=True)
    analytic = q * (log_q - log_p - kl) * mask[..., None] / mask.sum()
    assert torch.allclose(grad, analytic.detach(), atol=1e-12)

    dist = torch.distributions
    z2 = z.detach().clone().requires_grad_(True)
    exact = dist.kl_divergence(dist.Categorical(logits=z2), dist.Categorical(logits=teacher))
    (ref,) = torch.autograd.grad((exact * mask).sum() / mask.sum(), z2)
    assert torch.allclose(grad, ref, atol=1e-12)


def _toy_two_step(vocab: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    t1 = torch.randn(vocab, generator=gen, dtype=torch.float64)
    t2 = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64)
    return z1, z2, t1, t2


def _exact_sequence_reverse_kl(z1, z2, t1, t2):
    """KL(q(y1, y2) ‖ p(y1, y2)) by enumerating every sequence of two tokens."""
    lq1, lq2, lp1, lp2 = (x.log_softmax(-1) for x in (z1, z2, t1, t2))
    log_q = lq1[:, None] + lq2  # [y1, y2]
    log_p = lp1[:, None] + lp2
    return (log_q.exp() * (log_q - log_p)).sum()


def _decomposed_gradient(z1, z2, t1, t2, *, include_current_reward: bool, single_step: bool):
    """E_{y~q}[surrogate] by enumeration, with kdspec's functions: the PPO term at ρ = 1 with
    returns from t+1 (paper) or from t (official code), plus the single-step term."""
    vocab = z1.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for y1, y2 in itertools.product(range(vocab), repeat=2):
        student = torch.stack([z1, z2[y1]])[None]  # [1, 2, V]
        teacher = torch.stack([t1, t2[y1]])[None]
        tokens = T([[y1, y2]])
        log_q = token_logprobs(student, tokens)
        prob = log_q.sum().exp().detach()  # sampling weight of this sequence
        rewards = token_rewards(token_logprobs(teacher, tokens), log_q.detach(), mask)
        returns = discounted_returns(rewards, gamma=1.0)
        if not include_current_reward:
            returns = torch.cat([returns[:, 1:], torch.zeros(1, 1, dtype=returns.dtype)], 1)
        ratio = policy_ratio(log_q, log_q.detach(), torch.ones_like(log_q), mask)
        term = 2 * ppo_policy_loss(ratio, returns, mask, clip_range=0.2)  # sum over 2 tokens
        if single_step:
            term = term + 2 * single_step_loss(student, teacher, mask)
        total = total + prob * term
    return torch.autograd.grad(total, (z1, z2))


def test_single_step_decomposition_recovers_exact_gradient():
    """Paper Eq. 5-6: ∇KL(q‖p) = E[Σ_t ∇KL_t] − E[Σ_t R_{t+1} ∇log q(y_t)] (γ = 1)."""
    z1, z2, t1, t2 = _toy_two_step()
    exact = torch.autograd.grad(_exact_sequence_reverse_kl(z1, z2, t1, t2), (z1, z2))
    ours = _decomposed_gradient(z1, z2, t1, t2, include_current_reward=False, single_step=True)
    for a, b in zip(exact, ours, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_returns_from_t_alone_already_give_exact_gradient():
    """With R_t including r_t (the official advantages), the policy term alone is already the
    exact gradient; the official loss adds the single-step term on top (docs/minillm.md)."""
    z1, z2, t1, t2 = _toy_two_step(seed=2)
    exact = torch.autograd.grad(_exact_sequence_reverse_kl(z1, z2, t1, t2), (z1, z2))
    ours = _decomposed_gradient(z1, z2, t1, t2, include_current_reward=True, single_step=False)
    for a, b in zip(exact, ours, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    both = _decomposed_gradient(z1, z2, t1, t2, include_current_reward=True, single_step=True)
    assert not torch.allclose(exact[0], both[0], atol=1e-4)  # the single-step part, twice


# ---------------------------------------------------------------- pre-training regulariser


def test_pretrain_loss_hand_computed():
    student = T([[[0.0, math.log(3.0)]]])  # q = [0.25, 0.75]
    teacher = T([[[0.0, 0.0]]])  # p = [0.5, 0.5]
    labels = T([[1]])
    terms = pretrain_loss(student, labels, teacher_logits=teacher, kd_ratio=0.5)
    ce = -math.log(0.75)
    soft = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert terms.lm.item() == pytest.approx(ce)
    assert terms.distil.item() == pytest.approx(soft)
    assert terms.total.item() == pytest.approx(0.5 * ce + 0.5 * soft)
    alone = pretrain_loss(student, labels)
    assert alone.distil is None and alone.total.item() == pytest.approx(ce)


def test_pretrain_loss_ignores_masked_labels():
    student = torch.randn(1, 3, 4)
    teacher = torch.randn(1, 3, 4)
    labels = T([[2, -100, 1]])
    full = pretrain_loss(student, labels, teacher_logits=teacher, kd_ratio=1.0)
    kept = pretrain_loss(student[:, [0, 2]], labels[:, [0, 2]], teacher_logits=teacher[:, [0, 2]],
                         kd_ratio=1.0)
    assert full.total.item() == pytest.approx(kept.total.item())
