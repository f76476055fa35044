"""chunked_kd_loss against the naive kd_loss: values and gradients, and no full logits."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from kdspec_torch.chunked_loss import (  # noqa: E402
    DEFAULT_CHUNK_BUDGET_BYTES,
    chunked_kd_loss,
    default_chunk_size,
)
from kdspec_torch.losses import kd_loss  # noqa: E402
from kdspec_torch.teacher_slice import sampled_slice, topk_slice  # noqa: E402

TOKENS, VOCAB, HIDDEN, TEACHER_HIDDEN = 50, 300, 16, 24
CHUNKS = (7, 16, None)  # 7 and 16 do not divide the 43 counted positions; None = one chunk


def make_problem(dtype=torch.float32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=dtype)
    head = torch.randn(VOCAB, HIDDEN, generator=g, dtype=dtype).mul(0.5)
    t_hidden = torch.randn(TOKENS, TEACHER_HIDDEN, generator=g, dtype=dtype)
    t_head = torch.randn(VOCAB, TEACHER_HIDDEN, generator=g, dtype=dtype).mul(0.5)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[::7] = -100  # 8 ignored positions, 42 counted
    return dict(hidden=hidden, head=head, t_hidden=t_hidden, t_head=t_head, labels=labels)


def teacher_kwargs(kind: str, prob: dict, temperature: float) -> dict:
    logits = prob["t_hidden"] @ prob["t_head"].T
    if kind == "logits":
        return dict(teacher_logits=logits)
    if kind == "hidden":
        return dict(teacher_hidden=prob["t_hidden"], teacher_head_weight=prob["t_head"])
    return dict(teacher_topk=topk_slice(logits, 20, temperature=temperature))


def loss_and_grads(fn, prob: dict, **kwargs):
    hidden = prob["hidden"].clone().requires_grad_()
    head = prob["head"].clone().requires_grad_()
    loss = fn(hidden, head, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, head.grad


def assert_rel_close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Elementwise within rtol of the reference, and of its scale for near-zero entries."""
    assert got.dtype == ref.dtype
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)
    assert (got - ref).norm() <= rtol * ref.norm()


DIVERGENCE_CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.3),
    ("jsd", 0.0),  # TRL's special case: forward KL
    ("jsd", 1.0),  # TRL's special case: reverse KL
]
CASES = [
    (kind, div, beta, t, w)
    for kind, (div, beta), t, w in itertools.product(
        ("logits", "hidden", "topk"), DIVERGENCE_CASES, (1.0, 2.0), (0.0, 0.3)
    )
    if kind != "topk" or div == "forward_kl"
]


@pytest.mark.parametrize(("kind", "div", "beta", "t", "w"), CASES)
def test_matches_naive_in_fp32(kind: str, div: str, beta: float, t: float, w: float) -> None:
    prob = make_problem()
    kwargs = dict(
        divergence=div, beta=beta, temperature=t, labels=prob["labels"], hard_label_weight=w,
        **teacher_kwargs(kind, prob, t),
    )  # fmt: skip
    ref = loss_and_grads(kd_loss, prob, **kwargs)
    for chunk in CHUNKS:
        got = loss_and_grads(chunked_kd_loss, prob, chunk_size=chunk, **kwargs)
        for g, r in zip(got, ref, strict=True):
            assert_rel_close(g, r, rtol=1e-5)


@pytest.mark.parametrize(("div", "beta"), DIVERGENCE_CASES)
def test_matches_naive_in_fp64_to_rounding(div: str, beta: float) -> None:
    """In fp64 the only difference left is summation order: the analytic gradients are exact."""
    prob = make_problem(torch.float64, seed=1)
    kwargs = dict(
        divergence=div, beta=beta, temperature=0.7, labels=prob["labels"], hard_label_weight=0.2,
        teacher_logits=prob["t_hidden"] @ prob["t_head"].T, soft_scale=0.49,
    )  # fmt: skip
    ref = loss_and_grads(kd_loss, prob, **kwargs)
    got = loss_and_grads(chunked_kd_loss, prob, chunk_size=9, **kwargs)
    for g, r in zip(got, ref, strict=True):
        assert_rel_close(g, r, rtol=1e-11)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_matches_finite_differences(div: str) -> None:
    """Directional derivatives by central differences in fp64, independent of kd_loss.
    (torch.autograd.gradcheck backpropagates twice through one graph, which chunked_kd_loss
    refuses by design: it hands over the gradients it computed in the forward pass.)"""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 3, generator=g, dtype=torch.float64)
    head = torch.randn(11, 3, generator=g, dtype=torch.float64)
    teacher = torch.randn(6, 11, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4, 0, 10, 3])

    def fn(h, w):
        return chunked_kd_loss(
            h, w, teacher_logits=teacher, divergence=div, beta=0.4, temperature=1.3,
            labels=labels, hard_label_weight=0.25, chunk_size=2,
        )  # fmt: skip

    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    fn(h, w).backward()
    eps = 1e-6
    for _ in range(5):
        dh, dw = (
            torch.randn(6, 3, generator=g, dtype=torch.float64),
            torch.randn(11, 3, generator=g, dtype=torch.float64),
        )
        numeric = fn(hidden + eps * dh, head + eps * dw) - fn(hidden - eps * dh, head - eps * dw)
        numeric = numeric.item() / (2 * eps)
        analytic = (h.grad * dh).sum().item() + (w.grad * dw).sum().item()
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_sampled_slice_with_repeated_ids() -> None:
    prob = make_problem()
    logits = prob["t_hidden"] @ prob["t_head"].T
    ids, probs = sampled_slice(logits, 32, generator=torch.Generator().manual_seed(0))
    assert (probs == 0).any()  # padding slots with repeated ids are exercised
    kwargs = dict(teacher_topk=(ids.int(), probs), labels=prob["labels"], hard_label_weight=0.1)
    ref = loss_and_grads(kd_loss, prob, **kwargs)
    got = loss_and_grads(chunked_kd_loss, prob, chunk_size=11, **kwargs)
    for g, r in zip(got, ref, strict=True):
        assert_rel_close(g, r, rtol=1e-5)


def test_without_labels_every_position_counts() -> None:
    prob = make_problem()
    kwargs = teacher_kwargs("hidden", prob, 1.0)
    ref = loss_and_grads(kd_loss, prob, divergence="jsd", **kwargs)
    got = loss_and_grads(chunked_kd_loss, prob, divergence="jsd", chunk_size=13, **kwargs)
    for g, r in zip(got, ref, strict=True):
        assert_rel_close(g, r, rtol=1e-5)


def test_leading_dims_are_flattened() -> None:
    prob = make_problem()
    flat = loss_and_grads(chunked_kd_loss, prob, **teacher_kwargs("logits", prob, 1.0))
    shaped = {k: v.reshape(2, 25, -1) if v.dim() == 2 and k in ("hidden", "t_hidden") else v
              for k, v in prob.items()}  # fmt: skip
    logits = (prob["t_hidden"] @ prob["t_head"].T).reshape(2, 25, VOCAB)
    got = loss_and_grads(chunked_kd_loss, shaped, teacher_logits=logits)
    torch.testing.assert_close(got[0], flat[0])
    torch.testing.assert_close(got[1].reshape(TOKENS, HIDDEN), flat[1])
    torch.testing.assert_close(got[2], flat[2])


def test_all_positions_ignored_gives_zero_loss_and_gradients() -> None:
    prob = make_problem()
    labels = torch.full((TOKENS,), -100)
    loss, g_hidden, g_head = loss_and_grads(
        chunked_kd_loss, prob, labels=labels, hard_label_weight=0.5,
        **teacher_kwargs("logits", prob, 1.0),
    )  # fmt: skip
    assert loss.item() == 0.0
    assert not g_hidden.any() and not g_head.any()


def test_upstream_gradient_scales_the_result() -> None:
    prob = make_problem()
    kwargs = teacher_kwargs("logits", prob, 1.0)
    ref = loss_and_grads(lambda *a, **k: 2.5 * kd_loss(*a, **k), prob, **kwargs)
    got = loss_and_grads(lambda *a, **k: 2.5 * chunked_kd_loss(*a, **k), prob, **kwargs)
    for g, r in zip(got, ref, strict=True):
        assert_rel_close(g, r, rtol=1e-5)


def test_bf16_inputs_get_bf16_gradients() -> None:
    prob = make_problem()
    low = {k: v.bfloat16() if v.is_floating_point() else v for k, v in prob.items()}
    kwargs = dict(
        labels=prob["labels"], hard_label_weight=0.3, **teacher_kwargs("hidden", low, 1.0)
    )
    loss, g_hidden, g_head = loss_and_grads(chunked_kd_loss, low, chunk_size=8, **kwargs)
    ref = loss_and_grads(kd_loss, low, **kwargs)
    assert loss.dtype == torch.float32
    assert g_hidden.dtype == g_head.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(g_head, ref[2], rtol=2e-2, atol=1e-4)


def test_only_the_needed_gradients_and_no_graph_without_grad() -> None:
    prob = make_problem()
    kwargs = teacher_kwargs("logits", prob, 1.0)
    hidden = prob["hidden"].clone().requires_grad_()
    head = prob["head"].clone()
    chunked_kd_loss(hidden, head, **kwargs).backward()
    assert hidden.grad is not None and head.grad is None
    with torch.no_grad():
        loss = chunked_kd_loss(hidden, head, **kwargs)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, kd_loss(prob["hidden"], prob["head"], **kwargs))


def test_backward_twice_is_refused() -> None:
    prob = make_problem()
    hidden = prob["hidden"].clone().requires_grad_()
    loss = chunked_kd_loss(hidden, prob["head"], **teacher_kwargs("logits", prob, 1.0))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        loss.backward()


def test_invalid_arguments() -> None:
    prob = make_problem()
    slice_ = teacher_kwargs("topk", prob, 1.0)
    with pytest.raises(ValueError, match="full distribution"):
        chunked_kd_loss(prob["hidden"], prob["head"], divergence="reverse_kl", **slice_)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kd_loss(prob["hidden"], prob["head"], chunk_size=0, **slice_)
    with pytest.raises(ValueError, match="needs labels"):
        chunked_kd_loss(prob["hidden"], prob["head"], hard_label_weight=0.5, **slice_)


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every (contiguous) tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        # Contiguous outputs only: transposed views such as head.T ([hidden, vocab]) own no memory.
        self.shapes += [tuple(t.shape) for t in tensors if t.is_contiguous()]
        return out


@pytest.mark.parametrize("kind", ["hidden", "topk"])
def test_no_full_logits_tensor_is_ever_built(kind: str) -> None:
    """Forward and backward create no tensor with more than `chunk` rows of vocab entries; the
    same probe on the naive loss does see [tokens, vocab] tensors."""
    prob = make_problem()
    kwargs = dict(labels=prob["labels"], hard_label_weight=0.3, **teacher_kwargs(kind, prob, 1.0))
    probes = {}
    for name, fn in (("chunked", chunked_kd_loss), ("naive", kd_loss)):
        extra = {"chunk_size": 8} if name == "chunked" else {}
        with _OutputShapes() as probe:
            loss_and_grads(fn, prob, **kwargs, **extra)
        probes[name] = [s for s in probe.shapes if len(s) == 2 and s[1] == VOCAB]
    assert probes["chunked"] and max(rows for rows, _ in probes["chunked"]) <= 8
    assert max(rows for rows, _ in probes["naive"]) == TOKENS


def test_default_chunk_size() -> None:
    assert default_chunk_size(300) == 8192  # capped
    assert default_chunk_size(8192) == 1024  # 32 MiB per fp32 [chunk, vocab] buffer
    assert default_chunk_size(32768) == 256
    for vocab in (65536, 131072, 256128):
        assert default_chunk_size(vocab) == 256  # the floor that keeps the matmuls efficient
    for vocab in (1000, 5000, 20000):
        rows = default_chunk_size(vocab)
        assert rows & (rows - 1) == 0 and rows * vocab * 4 <= DEFAULT_CHUNK_BUDGET_BYTES
        assert 2 * rows * vocab * 4 > DEFAULT_CHUNK_BUDGET_BYTES  # the largest that fits
