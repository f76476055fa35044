"""FLOP counts of transformer forward and backward passes, with the attention term.

Accounting follows Chinchilla (arXiv 2203.15556) App. F: a matmul of [m×k]·[k×n] costs 2·m·k·n.
Per token and layer, for a model of width d, H query heads, KV key/value heads of size hd,
MLP size d_ff, vocabulary V, attending to K keys:

    qkv projections   2·d·(H + 2·KV)·hd        (grouped-query attention: KV < H)
    scores  Q·Kᵀ      2·K·H·hd
    softmax           3·K·H                    (Chinchilla's count; not a matmul)
    values  A·V       2·K·H·hd
    output proj       2·H·hd·d
    MLP               2·3·d·d_ff gated (llama, qwen2, gemma2, T5 v1.1), 2·2·d·d_ff plain (gpt2)
    logits            2·d·V                    (once per token, not per layer)
    embedding lookup  0                        (a gather; Chinchilla counts 2·V·d, we do not)

Backward = 2 × forward (a gradient for each matmul input); training = 3 × forward; full
activation recomputation runs the forward once more: 4 × forward (≈ 8·N·D instead of 6·N·D).
Norms, activations, residual adds, RoPE and biases are not counted (each is O(d) per token).

How many keys K a query is charged for is the ``attention`` mode:

- ``"dense"`` (default; PaLM/Chinchilla convention): K = S, the whole sequence, on global layers
  and K = min(S, window) on sliding-window layers.
- ``"eager"``: K = S on every layer. What transformers' eager attention executes: it computes
  the full S×S score matrix and applies the causal and window masks afterwards.
- ``"causal"``: only the keys a query can see, K = (S + 1)/2 on average for a causal layer and
  mean_i min(i, window) for a window: what a kernel that skips masked blocks does, about half
  of ``"dense"`` at long S. Bidirectional attention (the T5 encoder, cross-attention) always
  has K = S.
"""

from __future__ import annotations

from typing import Literal

from .arch import ArchDims
from .params import param_counts

AttentionCount = Literal["dense", "eager", "causal"]
ATTENTION_MODES: tuple[str, ...] = ("dense", "eager", "causal")
BREAKDOWN_KEYS = (
    "embedding", "qkv", "attn_scores", "attn_softmax", "attn_values", "attn_out", "mlp", "logits",
)
SOFTMAX_FLOPS_PER_SCORE = 3  # Chinchilla App. F: 3·H·S² per sequence (max, exp-sum, divide)


def keys_per_query(seq_len: int, window: int | None, attention: AttentionCount) -> float:
    """Average number of keys each of ``seq_len`` causal queries is charged for (see module)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if attention == "eager":
        return float(seq_len)
    reach = seq_len if window is None else min(seq_len, window)
    if attention == "dense":
        return float(reach)
    # sum over query positions i = 1..S of min(i, w) = w(w+1)/2 + (S - w)·w
    return (reach * (reach + 1) / 2 + (seq_len - reach) * reach) / seq_len


def _zero() -> dict[str, float]:
    return dict.fromkeys(BREAKDOWN_KEYS, 0.0)


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] += value


def _attention(a: ArchDims, q_tokens: float, keys: float) -> dict[str, float]:
    """Score, softmax and value FLOPs for ``q_tokens`` queries against ``keys`` keys each."""
    return {
        "attn_scores": 2 * q_tokens * keys * a.q_dim,
        "attn_softmax": SOFTMAX_FLOPS_PER_SCORE * q_tokens * keys * a.n_heads,
        "attn_values": 2 * q_tokens * keys * a.q_dim,
    }


def _self_attention_block(a: ArchDims, tokens: float, keys: float) -> dict[str, float]:
    """Projections and attention of one self-attention block over ``tokens`` tokens."""
    block = {
        "qkv": 2 * tokens * a.d_model * (a.q_dim + 2 * a.kv_dim),
        "attn_out": 2 * tokens * a.q_dim * a.d_model,
    }
    return {**block, **_attention(a, tokens, keys)}


def _mlp(a: ArchDims, tokens: float) -> dict[str, float]:
    return {"mlp": 2 * (3 if a.mlp_is_gated else 2) * a.d_model * a.d_ff * tokens}


def _decoder_only(a: ArchDims, seq_len: int, attention: AttentionCount) -> dict[str, float]:
    total = _zero()
    for window in a.layer_windows():
        _add(total, _self_attention_block(a, seq_len, keys_per_query(seq_len, window, attention)))
        _add(total, _mlp(a, seq_len))
    total["logits"] = 2 * seq_len * a.d_model * a.vocab_size
    return total


def _cross_attention_block(a: ArchDims, q_tokens: float, source_len: int) -> dict[str, float]:
    """T5 cross-attention: queries from the decoder, keys/values projected from the encoder."""
    block = {
        "qkv": 2 * q_tokens * a.d_model * a.q_dim + 2 * source_len * a.d_model * 2 * a.kv_dim,
        "attn_out": 2 * q_tokens * a.q_dim * a.d_model,
    }
    return {**block, **_attention(a, q_tokens, source_len)}


def t5_encoder_flops(a: ArchDims, source_len: int) -> dict[str, float]:
    """Encoder forward over one input of ``source_len`` tokens (bidirectional: K = S)."""
    total = _zero()
    for _ in range(a.n_layers):
        _add(total, _self_attention_block(a, source_len, source_len))
        _add(total, _mlp(a, source_len))
    return total


def _t5(a: ArchDims, source_len: int, target_len: int, attention: AttentionCount
        ) -> dict[str, float]:
    total = t5_encoder_flops(a, source_len)
    keys = keys_per_query(target_len, None, attention)
    for _ in range(a.decoder_layers):
        _add(total, _self_attention_block(a, target_len, keys))
        _add(total, _cross_attention_block(a, target_len, source_len))
        _add(total, _mlp(a, target_len))
    total["logits"] = 2 * target_len * a.d_model * a.vocab_size
    return total


def forward_flops_breakdown(
    a: ArchDims, seq_len: int, *, target_len: int | None = None,
    attention: AttentionCount = "dense",
) -> dict[str, float]:
    """Forward FLOPs of one sequence, by term (keys: ``BREAKDOWN_KEYS``; see the module doc).

    Decoder-only: a sequence of ``seq_len`` tokens. T5: an input of ``seq_len`` tokens through
    the encoder and a target of ``target_len`` tokens through the decoder (self-attention,
    cross-attention whose K/V projections run on the ``seq_len`` encoder outputs, MLP, logits).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if a.is_encoder_decoder:
        if target_len is None or target_len <= 0:
            raise ValueError("t5 needs target_len (decoder tokens per example)")
        return _t5(a, seq_len, target_len, attention)
    if target_len is not None:
        raise ValueError(f"target_len applies to encoder-decoder models, not {a.family}")
    return _decoder_only(a, seq_len, attention)


def forward_flops(
    a: ArchDims, tokens: float, seq_len: int, *, target_len: int | None = None,
    attention: AttentionCount = "dense",
) -> float:
    """Forward FLOPs over ``tokens`` tokens in sequences of ``seq_len``.

    ``tokens / seq_len`` sequences, each costing ``sum(forward_flops_breakdown(...))``. For T5,
    ``tokens`` counts encoder input tokens and each sequence also decodes ``target_len`` tokens.
    """
    per_sequence = sum(forward_flops_breakdown(
        a, seq_len, target_len=target_len, attention=attention).values())
    return per_sequence * tokens / seq_len


def forward_flops_per_token(
    a: ArchDims, seq_len: int, *, attention: AttentionCount = "dense",
) -> float:
    """Forward FLOPs per token of a decoder-only model at context ``seq_len``."""
    return forward_flops(a, seq_len, seq_len, attention=attention) / seq_len


def train_flops(
    a: ArchDims, tokens: float, seq_len: int, recompute: bool = False, *,
    target_len: int | None = None, attention: AttentionCount = "dense",
) -> float:
    """Training FLOPs: forward + backward (2 × forward) = 3 × forward; with full activation
    recomputation one more forward in the backward pass: 4 × forward (≈ 8·N·D)."""
    passes = 4 if recompute else 3
    return passes * forward_flops(a, tokens, seq_len, target_len=target_len, attention=attention)


def six_n_d(a: ArchDims, tokens: float) -> float:
    """The ``6·N·D`` rule of thumb with N = all parameters (Chinchilla's convention; Kaplan's
    uses non-embedding N). For a check against ``train_flops``: it omits attention, and counts
    an untied input embedding (a lookup, 0 FLOPs) as if it were a matmul."""
    return 6 * param_counts(a).total * tokens


def decode_token_flops(
    a: ArchDims, context_len: int, *, source_len: int | None = None,
) -> float:
    """Forward FLOPs for one new token with a KV cache, attending to ``context_len`` keys
    (capped at the window on sliding layers), including its logits. Linear in the number of
    keys attended: ``decode_token_flops(a, 0)`` is the part that does not grow with context.

    T5: one decoder token, self-attention over ``context_len`` decoder keys and cross-attention
    over ``source_len`` encoder keys whose K/V were projected once at prefill (not counted here).
    """
    total = _zero()
    layers = a.layer_windows() if not a.is_encoder_decoder else [None] * a.decoder_layers
    for window in layers:
        keys = context_len if window is None else min(context_len, window)
        _add(total, _self_attention_block(a, 1, keys))
        _add(total, _mlp(a, 1))
        if a.is_encoder_decoder:
            if source_len is None:
                raise ValueError("t5 decoding needs source_len (encoder tokens)")
            cross = _cross_attention_block(a, 1, source_len)
            cross["qkv"] = 2 * a.d_model * a.q_dim  # K/V of the source were cached at prefill
            _add(total, cross)
    total["logits"] = 2 * a.d_model * a.vocab_size
    return sum(total.values())


def prefill_flops(
    a: ArchDims, prompt_len: int, *, attention: AttentionCount = "dense",
) -> float:
    """Forward FLOPs to prefill one prompt before decoding.

    Decoder-only: the full forward over ``prompt_len`` tokens but logits for the last position
    only (transformers' ``generate`` passes ``logits_to_keep=1``). T5: the encoder over the
    prompt and each decoder layer's cross-attention K/V projections of it; the decoder's first
    step is counted as a decode step.
    """
    if a.is_encoder_decoder:
        encoder = sum(t5_encoder_flops(a, prompt_len).values())
        cross_kv = a.decoder_layers * 2 * prompt_len * a.d_model * 2 * a.kv_dim
        return encoder + cross_kv
    full = forward_flops_breakdown(a, prompt_len, attention=attention)
    full["logits"] = 2 * a.d_model * a.vocab_size
    return sum(full.values())
