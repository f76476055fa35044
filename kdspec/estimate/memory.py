"""Bytes per device: model states, activations, teacher weights, logit buffers, KV cache.

Bytes-per-parameter convention (AdamW), ``training_precision``:

- fp32 (CPU training, ``dtype_bytes=4``): 4 weights + 4 gradients + 8 Adam (m, v) = 16 B/param.
- bf16 mixed precision (``dtype_bytes=2``): 2 bf16 weights + 2 bf16 gradients + 4 fp32 master
  + 8 Adam = 16 B/param, the ZeRO paper's K = 12 optimizer bytes (arXiv 1910.02054 §3).
  torch autocast (fp32 weights and gradients, bf16 compute) also totals 16 B/param; keeping fp32
  gradients on top of a bf16 copy gives 18 (EleutherAI cookbook); no master copy gives 10.

ZeRO stage z over the data-parallel group of size dp divides optimizer states (and the fp32
master) by dp for z ≥ 1, gradients for z ≥ 2, weights for z ≥ 3; tensor parallelism t divides
all model states and, assuming sequence parallelism, the activations by t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .arch import ArchDims
from .hardware import Hardware
from .params import param_counts

Recompute = Literal["none", "selective", "full"]
FP32 = 4

# ---- the chunked KD loss: when it is used and how many rows a chunk has --------------------
# One rule for the planner (kdspec.plan.workload_map) and the torch backend
# (kdspec_torch.objectives.distill, kdspec_torch.chunked_loss), so that `kdspec plan` prices the
# memory the backend will use.

CHUNKED_AUTO_ELEMENTS = 2**27
"""``loss.chunked: auto`` picks the chunked loss when one micro-batch's ``tokens × vocab``
reaches this: 512 MiB per fp32 copy of the logits, of which naive KD holds 5."""
CHUNK_BUDGET_BYTES = 32 * 2**20
"""Bytes of ONE fp32 ``[chunk, vocab]`` buffer at the default chunk size (small vocabularies)."""
MIN_CHUNK_ROWS = 256
"""Rows per chunk at least: with fewer, the LM-head matmuls stream the ``[vocab, hidden]`` weight
for too little work (128 rows cost 1.16–1.22× the CPU time of 256; docs/benchmarks.md)."""
MAX_CHUNK_ROWS = 8192
CHUNK_ROWS_AUTO = 0
"""``chunk_tokens`` value meaning "the backend's default for this vocabulary"
(:func:`default_chunk_rows`)."""
DEFAULT_CHUNK_TOKENS = CHUNK_ROWS_AUTO
"""Tokens per chunk of a chunked (fused linear + loss) logit computation: the backend's."""


def default_chunk_rows(vocab: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk of the chunked KD loss: the largest power of two ``r`` with
    ``4·r·vocab ≤ budget_bytes`` (one fp32 ``[r, vocab]`` buffer), clamped to
    [``MIN_CHUNK_ROWS``, ``MAX_CHUNK_ROWS``]: 256 rows for vocabularies of 32k and more,
    1024 at 8k, 8192 below 1k."""
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    rows = max(1, budget_bytes // (FP32 * vocab))
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, 1 << (rows.bit_length() - 1)))


def chunked_by_default(tokens: int, vocab: int) -> bool:
    """``loss.chunked: auto``: chunk when a micro-batch's ``tokens · vocab ≥
    CHUNKED_AUTO_ELEMENTS`` (for models whose LM head the chunked loss can apply)."""
    return tokens * vocab >= CHUNKED_AUTO_ELEMENTS


def chunk_rows(chunk_tokens: int, vocab: int) -> int:
    """``chunk_tokens``, or :func:`default_chunk_rows` for ``CHUNK_ROWS_AUTO``."""
    return default_chunk_rows(vocab) if chunk_tokens == CHUNK_ROWS_AUTO else chunk_tokens


# Naive KD keeps these [tokens × vocab] fp32 buffers live at the loss's peak (in backward):
# student logits upcast to fp32, the student log-softmax saved for backward, the gradient of the
# student logits; teacher logits upcast to fp32 and the teacher probabilities (online teacher).
# The chunked loss holds at most 4 (JSD) per chunk; the same 5 are counted, a bound.
STUDENT_LOGIT_COPIES = 3
TEACHER_LOGIT_COPIES = 2
# A cached teacher slice as the loss reads it: the reader widens the cache's int32 id and
# float16 probability to an int64 id and an fp32 probability per kept entry.
CACHED_ENTRY_BYTES = 8 + 4


@dataclass(frozen=True)
class TrainingPrecision:
    """Bytes per parameter of each model state, and per activation element."""

    name: str
    weight_bytes: int
    grad_bytes: int
    master_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def bytes_per_param(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.master_bytes + self.optimizer_bytes


FP32_ADAMW = TrainingPrecision("fp32", 4, 4, 0, 8, 4)
BF16_MIXED_ADAMW = TrainingPrecision("bf16-mixed", 2, 2, 4, 8, 2)


def training_precision(dtype_bytes: int) -> TrainingPrecision:
    """4 → fp32 training (16 B/param); 2 → bf16 mixed precision with fp32 master (16 B/param)."""
    if dtype_bytes == 4:
        return FP32_ADAMW
    if dtype_bytes == 2:
        return BF16_MIXED_ADAMW
    raise ValueError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes}")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device by item; ``total`` is their sum."""

    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())


def shard_bytes(n_bytes: float, shards: int) -> int:
    """Bytes per device when ``n_bytes`` are split over ``shards`` devices (rounded up)."""
    return math.ceil(n_bytes / shards)


def model_state_bytes(
    n_params: int, precision: TrainingPrecision, *, data_parallel: int = 1, zero_stage: int = 0,
    tensor_parallel: int = 1,
) -> dict[str, int]:
    """Weights, gradients and optimizer states (incl. the fp32 master) per device."""
    tp = tensor_parallel

    def sharded(stage: int) -> int:
        return data_parallel if zero_stage >= stage else 1

    optimizer = n_params * (precision.master_bytes + precision.optimizer_bytes)
    return {
        "weights": shard_bytes(n_params * precision.weight_bytes, tp * sharded(3)),
        "gradients": shard_bytes(n_params * precision.grad_bytes, tp * sharded(2)),
        "optimizer_states": shard_bytes(optimizer, tp * sharded(1)),
    }


def frozen_weight_bytes(
    n_params: int, dtype_bytes: int, *, data_parallel: int = 1, zero_stage: int = 0,
    tensor_parallel: int = 1,
) -> int:
    """A frozen model's weights (no gradients, no optimizer), sharded like trained weights."""
    return shard_bytes(n_params * dtype_bytes,
                  tensor_parallel * (data_parallel if zero_stage >= 3 else 1))


def zero3_gather_bytes(a: ArchDims, weight_bytes: int, *, tensor_parallel: int = 1) -> int:
    """Unsharded weights ZeRO-3/FSDP holds while computing: the larger of the embedding/head
    unit and two layers (the one computing and the one prefetched). An FSDP-style wrapping,
    one unit per layer plus a root unit, is assumed."""
    counts = param_counts(a)
    layers = a.n_layers + (a.decoder_layers if a.is_encoder_decoder else 0)
    per_layer = (counts.non_embedding - counts.output_head) / layers
    largest = max(counts.embedding + counts.output_head, 2 * per_layer)
    return shard_bytes(largest * weight_bytes, tensor_parallel)


# ---- activations (Korthikanti et al. 2022, arXiv 2205.05198 §4.1) ------------------------------


def _attention_block_bytes(
    a: ArchDims, b: int, s: int, kv_len: int, p: int, *, flash: bool, dropout: bool,
) -> int:
    """Saved tensors of one attention block: norm input, projection input, Q, K, V, the
    output-projection input (each p bytes/element), dropout masks (1 byte), and, without a
    fused kernel, the softmax output (plus dropout mask and output) of the b·H·s·kv_len scores.
    For cross-attention (kv_len = encoder tokens) the K/V projection input is the encoder
    output, saved once for the whole decoder by the caller."""
    elements = 2 * b * s * a.d_model + 2 * b * s * a.q_dim + 2 * b * kv_len * a.kv_dim
    total = p * elements + (b * s * a.d_model if dropout else 0)
    if not flash:
        scores = b * a.n_heads * s * kv_len
        total += p * scores + ((1 + p) * scores if dropout else 0)
    return total


def _mlp_block_bytes(a: ArchDims, b: int, s: int, p: int, *, dropout: bool) -> int:
    """Norm input and MLP input (b·s·d each), plus the hidden tensors backward needs:
    plain MLP: activation input and second-matmul input (2·b·s·d_ff); gated MLP: gate, up,
    act(gate) and their product (4·b·s·d_ff)."""
    hidden = (4 if a.mlp_is_gated else 2) * b * s * a.d_ff
    return p * (2 * b * s * a.d_model + hidden) + (b * s * a.d_model if dropout else 0)


def layer_activation_bytes(
    a: ArchDims, seq_len: int, micro_batch: int, *, act_bytes: int = 2, flash: bool = False,
    dropout: bool = False, source_len: int | None = None,
) -> int:
    """Activations one layer saves for backward (no recomputation).

    For a GPT layer (d_ff = 4h, multi-head attention, dropout, 16-bit) this is Korthikanti's
    ``s·b·h·(34 + 5·a·s/h)``: 11·sbh + 5·a·s²·b attention, 19·sbh MLP, 4·sbh for two
    LayerNorms. It generalises the terms to GQA (K and V are kv_dim wide), gated MLPs (4
    d_ff-wide tensors instead of 2), no dropout (the default for llama/qwen2/gemma2: no masks,
    the softmax output is the A·V input) and gemma2's two extra norms. ``flash``: a fused
    attention kernel keeps no s² tensor (its O(s) log-sum-exp is not counted). With
    ``source_len`` the layer is a T5 decoder layer with cross-attention to that many tokens.
    """
    b, s, p = micro_batch, seq_len, act_bytes
    total = _attention_block_bytes(a, b, s, s, p, flash=flash, dropout=dropout)
    total += _mlp_block_bytes(a, b, s, p, dropout=dropout)
    if a.family == "gemma2":
        total += 2 * p * b * s * a.d_model  # post-attention and post-MLP norms
    if source_len is not None:
        total += _attention_block_bytes(a, b, s, source_len, p, flash=flash, dropout=dropout)
    return total


def activation_bytes(
    a: ArchDims, seq_len: int, micro_batch: int, *, recompute: Recompute = "none",
    flash: bool = False, dropout: bool = False, act_bytes: int = 2, tensor_parallel: int = 1,
    target_len: int | None = None,
) -> int:
    """Activations saved for backward over all layers, for one micro-batch, per device.

    ``"none"``: every layer's ``layer_activation_bytes``. ``"selective"`` (Korthikanti):
    the attention core is recomputed, so no s² tensors: the same as ``flash``. ``"full"``:
    each layer keeps only its input (p·s·b·h; Korthikanti's 2sbh at 16 bits), plus one layer's
    full activations while it is recomputed in backward. Divided by ``tensor_parallel``
    (sequence parallelism assumed). T5: ``seq_len`` encoder tokens, ``target_len`` decoder
    tokens, plus the encoder output that cross-attention reads. The embedding output and the
    final norm (about one layer's sbh) are not counted; logits are ``logit_buffer_bytes``.
    """
    flash = flash or recompute == "selective"
    b, p = micro_batch, act_bytes

    def layer(s: int, source: int | None = None) -> int:
        return layer_activation_bytes(a, s, b, act_bytes=p, flash=flash, dropout=dropout,
                                      source_len=source)

    if a.is_encoder_decoder:
        if target_len is None:
            raise ValueError("t5 needs target_len")
        encoder_out = p * b * seq_len * a.d_model
        if recompute == "full":
            inputs = p * b * a.d_model * (a.n_layers * seq_len + a.decoder_layers * target_len)
            total = inputs + encoder_out + max(layer(seq_len), layer(target_len, seq_len))
        else:
            total = (a.n_layers * layer(seq_len) + a.decoder_layers * layer(target_len, seq_len)
                     + encoder_out)
    elif recompute == "full":
        total = a.n_layers * p * b * seq_len * a.d_model + layer(seq_len)
    else:
        total = a.n_layers * layer(seq_len)
    return shard_bytes(total, tensor_parallel)


def inference_activation_bytes(
    a: ArchDims, seq_len: int, batch: int, *, act_bytes: int = 2, flash: bool = False,
) -> int:
    """Peak transient activations of a no-grad forward (one layer's tensors live at a time):
    the residual stream and its normalised copy, plus the larger of attention (Q, K, V and,
    without a fused kernel, scores and softmax output) and the MLP hidden tensors.
    Approximate: allocator caching and fused ops move this by tens of percent."""
    b, s, p = batch, seq_len, act_bytes
    attention = b * s * (a.q_dim + 2 * a.kv_dim) + (0 if flash else 2 * b * a.n_heads * s * s)
    mlp = (3 if a.mlp_is_gated else 1) * b * s * a.d_ff
    return p * (2 * b * s * a.d_model + max(attention, mlp))


# ---- logits and caches ---------------------------------------------------------------------


def logit_buffer_bytes(
    tokens: int, vocab_size: int, *, teacher: Literal["none", "online", "cached"] = "none",
    cache_k: int = 0, chunk_tokens: int | None = None,
) -> dict[str, int]:
    """[tokens × vocab] buffers of the loss, fp32 (4 bytes).

    Naive (unchunked): ``STUDENT_LOGIT_COPIES`` = 3 student copies (fp32 logits, log-softmax
    saved for backward, logit gradient) and, with an online teacher, ``TEACHER_LOGIT_COPIES``
    = 2 more (fp32 logits and probabilities): 5 copies for online KD, 3 for plain
    cross-entropy. A cached teacher adds its slice for the micro-batch,
    ``tokens·k·CACHED_ENTRY_BYTES`` (int64 id + fp32 probability, as the reader hands them
    over). Chunked loss (``chunk_tokens``; ``CHUNK_ROWS_AUTO`` = :func:`default_chunk_rows`):
    the same logit copies, for one chunk of rows.
    """
    live = tokens if chunk_tokens is None else min(tokens, chunk_rows(chunk_tokens, vocab_size))
    buffers = {"student_logits": STUDENT_LOGIT_COPIES * live * vocab_size * FP32}
    if teacher == "online":
        buffers["teacher_logits"] = TEACHER_LOGIT_COPIES * live * vocab_size * FP32
    elif teacher == "cached":
        # The whole micro-batch's slice is read at once, chunked or not.
        buffers["teacher_cache_slice"] = tokens * cache_k * CACHED_ENTRY_BYTES
    return buffers


def kv_cache_bytes(
    a: ArchDims, batch: int, seq_len: int, dtype_bytes: int, *, source_len: int | None = None,
) -> int:
    """KV cache: ``2 · bytes · head_dim · kv_heads · layers · tokens`` (K and V per layer).

    Sliding-window layers keep at most ``window`` tokens (transformers' sliding cache layers).
    T5: the decoder's self-attention cache over ``seq_len`` tokens plus its cross-attention
    cache over ``source_len`` encoder tokens, in every decoder layer.
    """
    per_token_layer = 2 * dtype_bytes * a.kv_dim * batch
    if a.is_encoder_decoder:
        if source_len is None:
            raise ValueError("t5 needs source_len for its cross-attention cache")
        return per_token_layer * a.decoder_layers * (seq_len + source_len)
    kept = sum(seq_len if w is None else min(seq_len, w) for w in a.layer_windows())
    return per_token_layer * kept


def weight_read_bytes(a: ArchDims, dtype_bytes: int) -> int:
    """Weight bytes one forward step reads from memory: all parameters except lookup tables, of
    which a step reads a few rows (an untied input embedding; gpt2's position embedding). A
    tied embedding is read in full by the output head."""
    unread = 0 if a.tie_embeddings else a.vocab_size * a.d_model
    if a.family == "gpt2":
        unread += a.max_seq_len * a.d_model
    return (param_counts(a).total - unread) * dtype_bytes


# ---- whole nodes -------------------------------------------------------------------------


def inference_memory(
    a: ArchDims, *, seq_len: int, batch: int, dtype_bytes: int, hardware: Hardware,
    logit_positions: int, flash: bool = False,
) -> dict[str, int]:
    """A frozen model's weights, one layer's transient activations and fp32 logits with their
    softmax (2 copies) for ``logit_positions`` positions; per device."""
    return {
        "weights": frozen_weight_bytes(param_counts(a).total, dtype_bytes,
                                       data_parallel=hardware.dp, zero_stage=hardware.zero_stage,
                                       tensor_parallel=hardware.tensor_parallel),
        "activations": shard_bytes(inference_activation_bytes(
            a, seq_len, batch, act_bytes=dtype_bytes, flash=flash), hardware.tensor_parallel),
        "logits": 2 * logit_positions * a.vocab_size * FP32,
    }


def generation_memory(
    a: ArchDims, *, batch: int, prompt_tokens: int, new_tokens: int, dtype_bytes: int,
    hardware: Hardware,
) -> dict[str, int]:
    """Weights, the KV cache at full length, the prefill's transient activations, and the
    last position's logits (``generate`` keeps one position per step)."""
    memory = inference_memory(a, seq_len=prompt_tokens, batch=batch, dtype_bytes=dtype_bytes,
                               hardware=hardware, logit_positions=batch)
    final = new_tokens if a.is_encoder_decoder else prompt_tokens + new_tokens
    source = prompt_tokens if a.is_encoder_decoder else None
    cache = kv_cache_bytes(a, batch, final, dtype_bytes, source_len=source)
    memory["kv_cache"] = shard_bytes(cache, hardware.tensor_parallel)
    return memory


# ---- a whole training step -----------------------------------------------------------------


def training_memory(
    student: ArchDims, *, seq_len: int, micro_batch: int, dtype_bytes: int, hardware: Hardware,
    recompute: bool = False, flash: bool = False, dropout: bool = False,
    target_len: int | None = None, teacher: ArchDims | None = None,
    teacher_mode: Literal["none", "online", "cached"] = "none", cache_k: int = 0,
    chunk_tokens: int | None = None,
) -> MemoryEstimate:
    """Peak bytes per device of one training micro-batch: model states (``model_state_bytes``;
    with ZeRO-3 also the unsharded units in use, ``zero3_gather_bytes``), activations
    (``activation_bytes``), a frozen online teacher's weights and its transient forward
    activations, and the loss's logit buffers (``logit_buffer_bytes``; the student's
    vocabulary, over the tokens that get logits: decoder tokens for T5). ``chunk_tokens``
    (None: naive loss) prices the chunked loss, plus its fp32 head-gradient accumulator when
    gradients are 16-bit."""
    precision = training_precision(dtype_bytes)
    layout = {"data_parallel": hardware.dp, "zero_stage": hardware.zero_stage,
              "tensor_parallel": hardware.tensor_parallel}
    breakdown = model_state_bytes(param_counts(student).total, precision, **layout)
    if hardware.zero_stage >= 3 and hardware.dp > 1:
        breakdown["zero3_gathered_weights"] = zero3_gather_bytes(
            student, precision.weight_bytes, tensor_parallel=hardware.tensor_parallel)
    breakdown["activations"] = activation_bytes(
        student, seq_len, micro_batch, recompute="full" if recompute else "none", flash=flash,
        dropout=dropout, act_bytes=precision.activation_bytes,
        tensor_parallel=hardware.tensor_parallel, target_len=target_len,
    )
    if teacher is not None and teacher_mode == "online":
        breakdown["teacher_weights"] = frozen_weight_bytes(
            param_counts(teacher).total, dtype_bytes, **layout)
        if hardware.zero_stage >= 3 and hardware.dp > 1:
            breakdown["teacher_zero3_gathered_weights"] = zero3_gather_bytes(
                teacher, dtype_bytes, tensor_parallel=hardware.tensor_parallel)
        breakdown["teacher_activations"] = shard_bytes(inference_activation_bytes(
            teacher, seq_len, micro_batch, act_bytes=precision.activation_bytes, flash=flash,
        ), hardware.tensor_parallel)
    logit_tokens = micro_batch * (target_len if student.is_encoder_decoder and target_len
                                  else seq_len)
    breakdown.update(logit_buffer_bytes(
        logit_tokens, student.vocab_size, teacher=teacher_mode if teacher else "none",
        cache_k=cache_k, chunk_tokens=chunk_tokens,
    ))
    if chunk_tokens is not None and precision.grad_bytes != FP32:
        # The chunked loss accumulates the head-weight gradient in fp32 from its first chunk
        # and casts it at the end; with fp32 gradients that buffer becomes `.grad` itself.
        breakdown["chunked_head_grad_fp32"] = student.vocab_size * student.d_model * FP32
    return MemoryEstimate(breakdown)
