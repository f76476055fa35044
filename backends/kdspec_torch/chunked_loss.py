"""Chunked fused-linear KD loss: the student's LM head, the KD loss and its gradient, by chunks.

At a large vocabulary the ``[tokens, vocab]`` logits dominate KD memory (8192 tokens × 256k vocab
× 4 bytes = 8.6 GB per fp32 copy), and autograd keeps several copies (student logits, their
log-softmax, the teacher's, the teacher probabilities). :func:`chunked_kd_loss` never builds one:
it walks the counted positions in chunks of ``chunk_size`` rows and, in the forward pass, computes
each chunk's logits, loss and analytic gradient ``g = ∂loss/∂z`` (``[chunk, vocab]``), folds ``g``
into ``∂/∂hidden = g @ W`` and ``∂/∂W += gᵀ @ hidden`` (fp32 accumulator), and drops the chunk.
Backward only scales the stored gradients by the incoming gradient. (The idea of Liger-Kernel's
fused linear cross-entropy, applied to the KD divergences.)

Gradients in the softmax input ``s = z / T`` with ``q = softmax(s)`` (per row; ``∂/∂z = ∂/∂s / T``):

* forward KL ``Σ p (log p − log q)``:          ``q − p``
* reverse KL ``R = Σ q (log q − log p)``:      ``q ⊙ (log q − log p − R)``
* JSD_β, ``m = βp + (1−β)q``, ``J_q = KL(q‖m)``: ``(1 − β) q ⊙ (log q − log m − J_q)``
  (from ``∂JSD/∂q_v = (1 − β) log(q_v / m_v)``: the other terms cancel)
* slice forward KL ``Σ_k p_k (log p_k − log q_{id_k})``: ``q·Σ_k p_k − scatter(ids, p)``
* hard-label CE at temperature 1: ``softmax(z) − onehot(y)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdspec.estimate.memory import CHUNK_BUDGET_BYTES, default_chunk_rows
from kdspec.estimate.memory import MIN_CHUNK_ROWS as MIN_CHUNK_ROWS  # re-exported

from .losses import check_kd_options, resolve_teacher

__all__ = ["DEFAULT_CHUNK_BUDGET_BYTES", "chunked_kd_loss", "default_chunk_size"]

DEFAULT_CHUNK_BUDGET_BYTES = CHUNK_BUDGET_BYTES
"""Bytes of ONE fp32 ``[chunk, vocab]`` buffer at the default chunk size, for small
vocabularies; a chunk holds 2 to 4 such buffers (see ``_chunk_loss_and_grad``)."""


def default_chunk_size(vocab: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk: the largest power of two whose fp32 ``[chunk, vocab]`` buffer fits in
    ``budget_bytes``, kept within [``MIN_CHUNK_ROWS``, 8192]: 256 rows for vocabularies of 32k
    and more (a 128 MiB buffer at 128k), 1024 at 8k. The estimator's own rule
    (:func:`kdspec.estimate.memory.default_chunk_rows`), so `kdspec plan` prices these chunks;
    ``MIN_CHUNK_ROWS`` is measured with ``benchmarks/kd_loss_memory.py --sweep``."""
    return default_chunk_rows(vocab, budget_bytes)


@dataclass(frozen=True)
class _Options:
    dtype: torch.dtype  # compute dtype: fp32, or fp64 for fp64 inputs
    kind: str  # teacher form: "logits", "hidden" or "topk"
    divergence: str  # effective divergence: "forward_kl", "reverse_kl" or "jsd" (0 < beta < 1)
    beta: float
    temperature: float
    hard_label_weight: float
    soft_scale: float
    ignore_index: int
    chunk_size: int
    grad_hidden: bool
    grad_weight: bool


def chunked_kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    hard_label_weight: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    soft_scale: float = 1.0,
) -> Tensor:
    """KD loss of :func:`kdspec_torch.losses.kd_loss`, computed chunk by chunk.

    ``loss = mean over counted positions of (1 − w)·soft_scale·D_T(teacher, z) + w·CE(z, y)``
    with ``z = student_hidden @ student_head_weight.T``; a position counts when its label is not
    ``ignore_index`` (all positions when ``labels`` is None). No ``T²`` unless ``soft_scale`` says
    so. ``student_hidden`` is ``[..., hidden]``, ``student_head_weight`` ``[vocab, hidden]``; the
    teacher is full logits ``[..., vocab]``, or ``teacher_hidden [..., teacher_hidden]`` with
    ``teacher_head_weight [vocab, teacher_hidden]`` (its logits are made chunk by chunk too), or a
    cached slice ``(ids, probs)`` of ``[..., K]`` (``forward_kl`` only). The teacher gets no
    gradient. ``chunk_size`` rows per chunk; None picks :func:`default_chunk_size`.

    Returns a scalar in fp32 (fp64 for fp64 inputs); gradients reach ``student_hidden`` and
    ``student_head_weight`` in their own dtypes. The gradients are computed in the forward pass,
    so a call costs the forward and backward matmuls whether or not ``backward`` follows (under
    ``torch.no_grad``, or for inputs that do not require grad, those matmuls are skipped); and
    backward hands them over without a copy, so it can run only once per call (no
    ``retain_graph``: a second backward raises).
    """
    kind = resolve_teacher(
        student_hidden,
        student_head_weight,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_head_weight=teacher_head_weight,
        teacher_topk=teacher_topk,
    )
    check_kd_options(
        divergence,
        teacher_kind=kind,
        beta=beta,
        temperature=temperature,
        labels=labels,
        hard_label_weight=hard_label_weight,
        soft_scale=soft_scale,
        lead_shape=student_hidden.shape[:-1],
    )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    opts = _Options(
        dtype=torch.promote_types(student_hidden.dtype, torch.float32),
        kind=kind,
        divergence=_effective_divergence(divergence, beta),
        beta=beta,
        temperature=temperature,
        hard_label_weight=hard_label_weight,
        soft_scale=soft_scale,
        ignore_index=ignore_index,
        chunk_size=chunk_size or default_chunk_size(student_head_weight.shape[0]),
        grad_hidden=grad_on and student_hidden.requires_grad,
        grad_weight=grad_on and student_head_weight.requires_grad,
    )
    if kind == "logits":
        teacher = (_rows(teacher_logits).detach(), None)
    elif kind == "hidden":
        teacher = (_rows(teacher_hidden).detach(), teacher_head_weight.detach())
    else:
        teacher = tuple(_rows(t).detach() for t in teacher_topk)
    flat_labels = None if labels is None else labels.reshape(-1)
    return _ChunkedKDLoss.apply(
        _rows(student_hidden), student_head_weight, *teacher, flat_labels, opts
    )


def _rows(t: Tensor) -> Tensor:
    """``[..., d]`` as ``[rows, d]``."""
    return t.reshape(-1, t.shape[-1])


def _effective_divergence(name: str, beta: float) -> str:
    # TRL's convention: JSD at beta 0 / 1 is forward / reverse KL, not the formula's limit.
    if name == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return name


class _ChunkedKDLoss(torch.autograd.Function):
    """Loss in forward; backward hands out the gradients computed there, scaled."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        teacher_a: Tensor,
        teacher_b: Tensor | None,
        labels: Tensor | None,
        opts: _Options,
    ) -> Tensor:
        loss, grad_hidden, grad_weight = _loss_and_grads(
            hidden, weight, teacher_a, teacher_b, labels, opts
        )
        # Kept on ctx rather than save_for_backward, so that backward can let go of them: the
        # grad then has no other owner and AccumulateGrad adopts it as `.grad` instead of copying
        # it (a second [vocab, hidden] fp32 copy at the peak otherwise).
        ctx.grads = [grad_hidden, grad_weight]
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_kd_loss computes its gradients in the forward pass and hands them out "
                "once: backward through it cannot run twice (retain_graph)"
            )
        grads, ctx.grads = ctx.grads, None
        out = [
            _scaled_grad(grads.pop(0), grad_output, dtype, needed)
            for dtype, needed in zip(ctx.dtypes, ctx.needs_input_grad[:2], strict=True)
        ]
        return (*out, None, None, None, None)


def _scaled_grad(
    grad: Tensor | None, grad_output: Tensor, dtype: torch.dtype, needed: bool
) -> Tensor | None:
    if grad is None or not needed:
        return None
    # In place: nothing else holds `grad` (a loss is usually backpropagated with grad 1).
    return grad.mul_(grad_output).to(dtype)


def _loss_and_grads(
    hidden: Tensor,
    weight: Tensor,
    teacher_a: Tensor,
    teacher_b: Tensor | None,
    labels: Tensor | None,
    opts: _Options,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Mean loss over counted rows, and its gradients w.r.t. ``hidden`` and ``weight``, all in
    the compute dtype (fp32, or fp64 for fp64 inputs)."""
    dtype = opts.dtype
    if labels is None:
        counted = torch.arange(hidden.shape[0], device=hidden.device)
    else:
        counted = (labels != opts.ignore_index).nonzero().squeeze(-1)
    n = counted.numel()
    # Converted once, not per chunk (a no-op for fp32 weights).
    head = weight.to(dtype)
    teacher_head = teacher_b.to(dtype) if opts.kind == "hidden" else teacher_b
    grad_hidden = _zeros_if(opts.grad_hidden, hidden, dtype)
    grad_weight = _zeros_if(opts.grad_weight, weight, dtype)
    loss_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, n, opts.chunk_size):
        idx = counted[start : start + opts.chunk_size]
        h = hidden.index_select(0, idx).to(dtype)
        y = None if labels is None else labels.index_select(0, idx)
        teacher = _Teacher(teacher_a, teacher_head, idx, opts)
        loss_rows, g = _chunk_loss_and_grad(h, head, teacher, y, n, opts)
        loss_sum += loss_rows.sum(dtype=torch.float64)
        if grad_hidden is not None:
            grad_hidden.index_copy_(0, idx, g @ head)
        if grad_weight is not None:
            grad_weight.addmm_(g.T, h)
        del g
    return (loss_sum / max(n, 1)).to(dtype), grad_hidden, grad_weight


def _zeros_if(needed: bool, like: Tensor, dtype: torch.dtype) -> Tensor | None:
    return torch.zeros(like.shape, dtype=dtype, device=like.device) if needed else None


@dataclass
class _Teacher:
    """A chunk's teacher. The kernel asks for it and holds the only reference to its
    ``[chunk, vocab]`` buffer, so it can free it early."""

    source: Tensor  # logits or hidden states [rows, *]; or slice ids [rows, K]
    extra: Tensor | None  # None; or the teacher head [vocab, hidden]; or slice probs [rows, K]
    idx: Tensor
    opts: _Options

    def log_probs(self) -> Tensor:
        """``log softmax(teacher logits / T)`` of the chunk, in a fresh buffer."""
        rows = self.source.index_select(0, self.idx).to(self.opts.dtype)
        if self.opts.kind == "hidden":
            rows = rows @ self.extra.T
        return _log_softmax(rows, self.opts.temperature)

    def slice(self) -> tuple[Tensor, Tensor]:
        ids = self.source.index_select(0, self.idx).long()
        return ids, self.extra.index_select(0, self.idx).to(self.opts.dtype)


def _chunk_loss_and_grad(
    h: Tensor, head: Tensor, teacher: _Teacher, labels: Tensor | None, n: int, opts: _Options
) -> tuple[Tensor, Tensor]:
    """Per-row loss of a chunk of hidden states ``h`` and the gradient ``∂(Σ rows / n)/∂z`` in
    its logits ``z = h @ headᵀ``.

    The student's log-probs become ``q`` and then the gradient in place, so a chunk holds at most
    2 (slice), 3 (forward and reverse KL) or 4 (JSD) ``[chunk, vocab]`` buffers at once, plus one
    for hard labels at ``T != 1``.
    """
    t = opts.temperature
    w = opts.hard_label_weight
    # ∂loss/∂z = c_div·∂div/∂s + c_q·q + (hard-label terms), the mean's 1/n folded in.
    c_div = (1.0 - w) * opts.soft_scale / (t * n)
    c_q = w / n if t == 1.0 else 0.0  # at T = 1 the hard-label softmax(z) is q itself
    z = h @ head.T
    hard_rows = hard_probs = None
    if w > 0:
        target = labels[:, None]
        if t != 1.0:
            hard_probs = F.log_softmax(z, dim=1)
            hard_rows = -hard_probs.gather(1, target).squeeze(1)
            hard_probs.exp_()
    log_q = _log_softmax(z, t)
    del z
    if w > 0 and t == 1.0:
        hard_rows = -log_q.gather(1, target).squeeze(1)
    kernel = _slice_forward_kl if opts.kind == "topk" else _KERNELS[opts.divergence]
    div, grad = kernel(log_q, teacher, opts.beta, c_div, c_q)
    loss = div.mul_((1.0 - w) * opts.soft_scale)
    if w > 0:
        loss.add_(hard_rows, alpha=w)
        if hard_probs is not None:
            grad.add_(hard_probs, alpha=w / n)
        grad.scatter_add_(1, target, torch.full(target.shape, -w / n, dtype=grad.dtype))
    return loss, grad


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """``log softmax(logits / T)`` (``logits`` is scaled in place), with ``-inf`` raised to the
    dtype's lowest finite value so that ``0 · (log a − log b)`` is 0, not NaN (its exp is still
    exactly 0)."""
    if temperature != 1.0:
        logits.div_(temperature)
    out = F.log_softmax(logits, dim=1)
    return out.clamp_min_(torch.finfo(out.dtype).min)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_v a_v b_v`` per row, without an ``a ⊙ b`` buffer (a batched matmul)."""
    return torch.einsum("rv,rv->r", a, b)


# Kernels: (log q, teacher, beta, c_div, c_q) -> (divergence per row,
# c_div·∂divergence/∂s + c_q·q). They overwrite log q (it ends as the gradient).


def _forward_kl(
    log_q: Tensor, teacher: _Teacher, beta: float, c_div: float, c_q: float
) -> tuple[Tensor, Tensor]:
    log_p = teacher.log_probs()
    p = log_p.exp()
    div = _rowdot(p, log_p.sub_(log_q))
    del log_p
    q = log_q.exp_()
    return div, q.mul_(c_div + c_q).sub_(p, alpha=c_div)


def _reverse_kl(
    log_q: Tensor, teacher: _Teacher, beta: float, c_div: float, c_q: float
) -> tuple[Tensor, Tensor]:
    log_p = teacher.log_probs()
    diff = torch.sub(log_q, log_p, out=log_p)
    q = log_q.exp_()
    div = _rowdot(q, diff)
    return div, diff.sub_(div[:, None]).mul_(c_div).add_(c_q).mul_(q)


def _jsd(
    log_q: Tensor, teacher: _Teacher, beta: float, c_div: float, c_q: float
) -> tuple[Tensor, Tensor]:
    log_p = teacher.log_probs()
    log_m = log_p + math.log(beta)
    torch.logaddexp(log_m, log_q + math.log1p(-beta), out=log_m)
    p = log_p.exp()
    kl_pm = _rowdot(p, log_p.sub_(log_m))
    del p, log_p
    diff = torch.sub(log_q, log_m, out=log_m)
    q = log_q.exp_()
    kl_qm = _rowdot(q, diff)
    div = kl_pm.mul_(beta).add_(kl_qm, alpha=1.0 - beta)
    grad = diff.sub_(kl_qm[:, None]).mul_(c_div * (1.0 - beta)).add_(c_q).mul_(q)
    return div, grad


_KERNELS = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd}


def _slice_forward_kl(
    log_q: Tensor, teacher: _Teacher, beta: float, c_div: float, c_q: float
) -> tuple[Tensor, Tensor]:
    ids, probs = teacher.slice()
    support = probs > 0
    log_p = torch.where(support, probs, torch.ones_like(probs)).log()
    diff = torch.where(support, log_p - log_q.gather(1, ids), torch.zeros_like(probs))
    div = (probs * diff).sum(dim=1)
    q = log_q.exp_()
    grad = q.mul_(probs.sum(dim=1, keepdim=True).mul_(c_div).add_(c_q))
    return div, grad.scatter_add_(1, ids, probs.mul(-c_div))
