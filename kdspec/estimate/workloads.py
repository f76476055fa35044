"""Per-node estimates the planner calls: training, teacher-logit caching, generation, eval.

On-policy training (MiniLLM, GKD) lives in ``onpolicy.py`` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .arch import ArchDims
from .flops import AttentionCount
from .hardware import Hardware
from .memory import (
    DEFAULT_CHUNK_TOKENS,
    MemoryEstimate,
    generation_memory,
    inference_memory,
    training_memory,
    training_precision,
)
from .node import NodeEstimate, Part, finish, forward_part, generation_part, train_part
from .onpolicy import estimate_gkd, estimate_minillm
from .params import param_counts
from .storage import checkpoint_bytes, generated_text_bytes, teacher_cache_bytes

__all__ = [
    "NodeEstimate", "estimate_train", "estimate_teacher_logits", "estimate_generation_node",
    "estimate_eval", "estimate_minillm", "estimate_gkd",
]


def _logit_tokens(a: ArchDims, tokens: float, seq_len: int, target_len: int | None) -> float:
    """Positions that get a next-token distribution: all tokens, or T5's decoder tokens."""
    if a.is_encoder_decoder:
        if target_len is None:
            raise ValueError("t5 needs target_len")
        return tokens / seq_len * target_len
    return tokens


def estimate_train(
    student: ArchDims, *, tokens: float, seq_len: int, micro_batch: int, hardware: Hardware,
    dtype_bytes: int, teacher: ArchDims | None = None, teacher_online: bool = True,
    passes_per_example: int = 1, recompute: bool = False, chunked_loss: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, checkpoint_count: int = 1,
    save_optimizer: bool = True, target_len: int | None = None, flash_attention: bool = False,
    dropout: bool = False, attention: AttentionCount = "dense", teacher_cache_k: int = 0,
) -> NodeEstimate:
    """A training node: pretrain, sft, kd, pretrain_kd or step_by_step.

    ``tokens``: student tokens per pass (T5: encoder input tokens; each sequence of ``seq_len``
    also decodes ``target_len`` tokens). ``passes_per_example``: forward+backward passes per
    example (step_by_step: 2, label and rationale), multiplying everything. ``teacher`` with
    ``teacher_online``: a frozen teacher forward on every student token (its weights, transient
    activations and logits in memory); with ``teacher_online=False`` the teacher is read from a
    cache of ``teacher_cache_k`` entries per position and costs nothing here.
    FLOPs: ``train_flops`` (3 × forward, 4 × with ``recompute``) + teacher ``forward_flops``.
    """
    total_tokens = tokens * passes_per_example
    parts = {"student_train": train_part(
        student, tokens=total_tokens, seq_len=seq_len, micro_batch=micro_batch,
        hardware=hardware, dtype_bytes=dtype_bytes, recompute=recompute, attention=attention,
        target_len=target_len,
    )}
    online = teacher is not None and teacher_online
    if online:
        assert teacher is not None
        parts["teacher_forward"] = forward_part(
            teacher, tokens=total_tokens, seq_len=seq_len, micro_batch=micro_batch,
            hardware=hardware, dtype_bytes=dtype_bytes, attention=attention,
            target_len=target_len, is_teacher=True,
        )
    memory = training_memory(
        student, seq_len=seq_len, micro_batch=micro_batch, dtype_bytes=dtype_bytes,
        hardware=hardware, recompute=recompute, flash=flash_attention, dropout=dropout,
        target_len=target_len, teacher=teacher,
        teacher_mode="online" if online else "cached" if teacher is not None else "none",
        cache_k=teacher_cache_k, chunk_tokens=chunk_tokens if chunked_loss else None,
    )
    model_flops = parts["student_train"].flops * (3 / 4 if recompute else 1)
    precision = training_precision(dtype_bytes)
    details = {
        "student_tokens": total_tokens,
        "passes_per_example": passes_per_example,
        "micro_batches_per_replica": total_tokens / (seq_len * micro_batch * hardware.dp),
        "model_flops": model_flops + (parts["teacher_forward"].flops if online else 0.0),
        "precision": precision.name,
        "bytes_per_param": precision.bytes_per_param,
        "recompute": recompute,
        "chunked_loss": chunked_loss,
        "attention": attention,
        "student_params": param_counts(student).total,
    }
    if teacher is not None:
        details["teacher_params"] = param_counts(teacher).total
        details["teacher_online"] = teacher_online
    storage = checkpoint_count * checkpoint_bytes(student, dtype_bytes,
                                                  save_optimizer=save_optimizer)
    return finish(parts=parts, memory=memory, storage_bytes=storage, hardware=hardware,
                  details=details)


def estimate_teacher_logits(
    teacher: ArchDims, *, tokens: float, seq_len: int, k: int, hardware: Hardware,
    dtype_bytes: int, micro_batch: int = 1, prob_bytes: int = 4, target_len: int | None = None,
    attention: AttentionCount = "dense", flash_attention: bool = False,
) -> NodeEstimate:
    """Cache a teacher's top-K (or sampled-K) distribution: one teacher forward over ``tokens``
    ``teacher_cache_bytes`` on disk: ``positions · k · (4-byte int32 id + prob_bytes)`` plus a
    manifest; ``prob_bytes`` 4 for fp32 probabilities, 2 for fp16/bf16. Positions are the
    tokens (T5: decoder tokens)."""
    part = forward_part(teacher, tokens=tokens, seq_len=seq_len, micro_batch=micro_batch,
                        hardware=hardware, dtype_bytes=dtype_bytes, attention=attention,
                        target_len=target_len, is_teacher=True)
    positions = _logit_tokens(teacher, tokens, seq_len, target_len)
    storage = teacher_cache_bytes(positions, k, prob_bytes=prob_bytes)
    logit_positions = micro_batch * (target_len if teacher.is_encoder_decoder and target_len
                                     else seq_len)
    memory = MemoryEstimate(inference_memory(
        teacher, seq_len=seq_len, batch=micro_batch, dtype_bytes=dtype_bytes, hardware=hardware,
        logit_positions=logit_positions, flash=flash_attention,
    ))
    details = {"positions": positions, "k": k, "bytes_per_position": k * (4 + prob_bytes),
               "prob_bytes": prob_bytes, "teacher_params": param_counts(teacher).total,
               "attention": attention}
    return finish(parts={"teacher_forward": part}, memory=memory,
                  storage_bytes=storage,
                  hardware=hardware, details=details)


def estimate_generation_node(
    teacher: ArchDims | None, *, n_examples: int, prompt_tokens: int, new_tokens: int,
    batch: int, hardware: Hardware, dtype_bytes: int, attention: AttentionCount = "dense",
) -> NodeEstimate:
    """Teacher generation (rationales, seqkd targets). ``teacher=None``: a remote (HTTP)
    teacher, which costs no FLOPs or time on our hardware; the details give the calls and the
    tokens it will be billed for. Storage: ``generated_text_bytes``."""
    storage = generated_text_bytes(n_examples, new_tokens)
    details: dict[str, object] = {
        "calls": n_examples,
        "prompt_tokens": n_examples * prompt_tokens,
        "completion_tokens": n_examples * new_tokens,
    }
    if teacher is None:
        details["remote"] = True
        return finish(parts={}, memory=MemoryEstimate({}), storage_bytes=storage,
                      hardware=hardware, details=details)
    part = generation_part([teacher], n_sequences=n_examples, batch=batch,
                           prompt_len=prompt_tokens, new_tokens=new_tokens, hardware=hardware,
                           dtype_bytes=dtype_bytes, n_teachers=1, attention=attention)
    memory = MemoryEstimate(generation_memory(
        teacher, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        dtype_bytes=dtype_bytes, hardware=hardware,
    ))
    details.update(remote=False, batch=batch, teacher_params=param_counts(teacher).total)
    return finish(parts={"teacher_generation": part}, memory=memory, storage_bytes=storage,
                  hardware=hardware, details=details)


def estimate_eval(
    models: Sequence[ArchDims], *, hardware: Hardware, dtype_bytes: int, tokens: float = 0,
    seq_len: int = 1, n_examples: int = 0, prompt_tokens: int = 0, gen_tokens: int = 0,
    batch: int = 1, attention: AttentionCount = "dense",
) -> NodeEstimate:
    """Evaluate each of ``models`` in turn: a forward over ``tokens`` (loss/perplexity, in
    sequences of ``seq_len``) and ``n_examples`` generations of ``gen_tokens`` after
    ``prompt_tokens`` (task metrics). Memory is the largest single model's."""
    parts: dict[str, Part] = {}
    peak: dict[str, int] = {}
    for i, a in enumerate(models):
        memory: dict[str, int] = {}
        if tokens > 0:
            target = seq_len if a.is_encoder_decoder else None
            parts[f"model{i}_forward"] = forward_part(
                a, tokens=tokens, seq_len=seq_len, micro_batch=batch, hardware=hardware,
                dtype_bytes=dtype_bytes, attention=attention, target_len=target)
            memory = inference_memory(a, seq_len=seq_len, batch=batch, dtype_bytes=dtype_bytes,
                                       hardware=hardware, logit_positions=batch * seq_len)
        if n_examples > 0 and gen_tokens > 0:
            parts[f"model{i}_generation"] = generation_part(
                [a], n_sequences=n_examples, batch=batch, prompt_len=prompt_tokens,
                new_tokens=gen_tokens, hardware=hardware, dtype_bytes=dtype_bytes,
                attention=attention)
            gen = generation_memory(a, batch=batch, prompt_tokens=prompt_tokens,
                                     new_tokens=gen_tokens, dtype_bytes=dtype_bytes,
                                     hardware=hardware)
            memory = gen if sum(gen.values()) > sum(memory.values()) else memory
        if sum(memory.values()) > sum(peak.values()):
            peak = memory
    details = {"models": len(models), "eval_tokens": tokens, "examples": n_examples,
               "note": "T5 models are scored with target_len = seq_len"}
    return finish(parts=parts, memory=MemoryEstimate(peak), storage_bytes=0, hardware=hardware,
                  details=details)
