"""JAX losses: hand-computed values, edge cases, and agreement with the torch backend's."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdspec_jax import losses as L

# Two positions over a 2-token vocabulary with probabilities we can write down:
# teacher p = (0.8, 0.2), (0.5, 0.5); student q = (0.5, 0.5), (0.25, 0.75).
P = np.array([[0.8, 0.2], [0.5, 0.5]])
Q = np.array([[0.5, 0.5], [0.25, 0.75]])
TEACHER = jnp.asarray(np.log(P), jnp.float32)
STUDENT = jnp.asarray(np.log(Q), jnp.float32)


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * np.log(a / b)).sum(-1)


def test_forward_and_reverse_kl_by_hand() -> None:
    fkl = [0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5),
           0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)]
    rkl = [0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2),
           0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)]
    assert float(L.forward_kl(STUDENT, TEACHER)) == pytest.approx(np.mean(fkl), rel=1e-5)
    assert float(L.reverse_kl(STUDENT, TEACHER)) == pytest.approx(np.mean(rkl), rel=1e-5)
    mask = jnp.array([True, False])
    assert float(L.forward_kl(STUDENT, TEACHER, mask=mask)) == pytest.approx(fkl[0], rel=1e-5)


def test_jsd_by_hand() -> None:
    beta = 0.3
    m = beta * P + (1 - beta) * Q
    expected = (beta * _kl(P, m) + (1 - beta) * _kl(Q, m)).mean()
    got = float(L.generalized_jsd(STUDENT, TEACHER, beta=beta))
    assert got == pytest.approx(expected, rel=1e-5)
    # TRL's special cases: beta 0 is the forward KL, beta 1 the reverse KL (not the limits).
    assert float(L.generalized_jsd(STUDENT, TEACHER, beta=0.0)) == pytest.approx(
        float(L.forward_kl(STUDENT, TEACHER)), rel=1e-6)
    assert float(L.generalized_jsd(STUDENT, TEACHER, beta=1.0)) == pytest.approx(
        float(L.reverse_kl(STUDENT, TEACHER)), rel=1e-6)
    # The symmetric JSD is bounded by log 2.
    far = jnp.array([[30.0, -30.0]])
    assert float(L.generalized_jsd(-far, far, beta=0.5)) == pytest.approx(math.log(2), rel=1e-4)


def test_temperature_softens_both_sides() -> None:
    t = 2.0
    p = np.sqrt(P) / np.sqrt(P).sum(-1, keepdims=True)  # softmax(log p / 2)
    q = np.sqrt(Q) / np.sqrt(Q).sum(-1, keepdims=True)
    got = float(L.forward_kl(STUDENT, TEACHER, temperature=t))
    assert got == pytest.approx(_kl(p, q).mean(), rel=1e-5)


def test_soft_cross_entropy_is_kl_plus_teacher_entropy() -> None:
    entropy = -(P * np.log(P)).sum(-1).mean()
    got = float(L.soft_cross_entropy(STUDENT, TEACHER))
    assert got == pytest.approx(float(L.forward_kl(STUDENT, TEACHER)) + entropy, rel=1e-5)


def test_cross_entropy_by_hand() -> None:
    labels = jnp.array([0, L.IGNORE_INDEX])
    assert float(L.cross_entropy(STUDENT, labels)) == pytest.approx(-math.log(0.5), rel=1e-6)
    labels = jnp.array([1, 1])
    both = (-math.log(0.5) - math.log(0.75)) / 2
    assert float(L.cross_entropy(STUDENT, labels)) == pytest.approx(both, rel=1e-6)
    only_second = L.cross_entropy(STUDENT, labels, mask=jnp.array([False, True]))
    assert float(only_second) == pytest.approx(-math.log(0.75), rel=1e-6)
    nothing = L.cross_entropy(STUDENT, jnp.full((2,), L.IGNORE_INDEX))
    assert float(nothing) == 0.0


def test_sparse_forward_kl_by_hand() -> None:
    """Slice ids (1, 0) with probs (0.6, 0.4) at position 0; position 1 a single token."""
    ids = jnp.array([[1, 0], [1, 1]])
    probs = jnp.array([[0.6, 0.4], [1.0, 0.0]])
    expected = [0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5), math.log(1 / 0.75)]
    got = float(L.sparse_forward_kl(STUDENT, ids, probs))
    assert got == pytest.approx(np.mean(expected), rel=1e-5)


def test_zero_probabilities_give_finite_values_and_gradients() -> None:
    """-inf teacher logits: 0·log 0 = 0, and the gradient is finite (the double-where)."""
    teacher = jnp.array([[0.0, -jnp.inf, 1.0]])
    student = jnp.array([[0.5, 0.2, -0.3]])
    for name in L.DIVERGENCES:
        if name == "reverse_kl":
            continue  # infinite by definition: the student puts mass where the teacher has none
        value, grad = jax.value_and_grad(
            lambda s, n=name: L.divergence(n, s, teacher, beta=0.5))(student)
        assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all(), name
    assert float(L.masked_mean(jnp.ones(3), jnp.zeros(3, bool))) == 0.0


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        L.forward_kl(STUDENT, TEACHER[:1])
    with pytest.raises(ValueError, match="beta must be in"):
        L.generalized_jsd(STUDENT, TEACHER, beta=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.forward_kl(STUDENT, TEACHER, temperature=0.0)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        L.divergence("kl", STUDENT, TEACHER)
    with pytest.raises(TypeError, match="bool"):
        L.forward_kl(STUDENT, TEACHER, mask=jnp.array([1, 0]))


# --------------------------------------------------------------------------------------------
# Against the torch backend (same inputs, values and gradients)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_losses():  # noqa: ANN201
    pytest.importorskip("torch")
    return pytest.importorskip("kdspec_torch.losses")


def _random(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 2, (3, 5, 17)).astype(np.float32)
    teacher = rng.normal(0, 2, (3, 5, 17)).astype(np.float32)
    mask = rng.random((3, 5)) < 0.7
    labels = rng.integers(0, 17, (3, 5))
    labels[~mask] = L.IGNORE_INDEX
    return student, teacher, mask, labels


@pytest.mark.parametrize(
    ("name", "beta", "temperature"),
    [("forward_kl", 0.5, 1.0), ("forward_kl", 0.5, 2.0), ("reverse_kl", 0.5, 1.5),
     ("jsd", 0.5, 1.0), ("jsd", 0.1, 2.0), ("jsd", 0.0, 1.0), ("jsd", 1.0, 1.0)],
)
def test_divergences_match_torch(torch_losses, name: str, beta: float,  # noqa: ANN001
                                 temperature: float) -> None:
    import torch

    student, teacher, mask, _ = _random()
    s = torch.tensor(student, requires_grad=True)
    expected = torch_losses.divergence(name, s, torch.tensor(teacher), beta=beta,
                                       temperature=temperature, mask=torch.tensor(mask))
    expected.backward()

    def jax_loss(x: jax.Array) -> jax.Array:
        return L.divergence(name, x, jnp.asarray(teacher), beta=beta, temperature=temperature,
                            mask=jnp.asarray(mask))

    value, grad = jax.value_and_grad(jax_loss)(jnp.asarray(student))
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), s.grad.numpy(), atol=1e-6)


def test_cross_entropy_and_slice_match_torch(torch_losses) -> None:  # noqa: ANN001
    import torch

    student, teacher, _, labels = _random(1)
    expected = torch_losses.cross_entropy_loss(torch.tensor(student), torch.tensor(labels))
    got = L.cross_entropy(jnp.asarray(student), jnp.asarray(labels))
    assert float(got) == pytest.approx(expected.item(), rel=1e-6)
    soft = torch_losses.soft_cross_entropy(torch.tensor(student), torch.tensor(teacher))
    assert float(L.soft_cross_entropy(jnp.asarray(student), jnp.asarray(teacher))) == (
        pytest.approx(soft.item(), rel=1e-6))
    probs = torch.softmax(torch.tensor(teacher), -1)
    top = probs.topk(4, dim=-1)
    ids, p = top.indices, top.values / top.values.sum(-1, keepdim=True)
    expected = torch_losses.sparse_forward_kl(torch.tensor(student), ids, p)
    got = L.sparse_forward_kl(jnp.asarray(student), jnp.asarray(ids.numpy()),
                              jnp.asarray(p.numpy()))
    assert float(got) == pytest.approx(expected.item(), rel=1e-5)
