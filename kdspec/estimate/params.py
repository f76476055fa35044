"""Exact parameter counts, as Hugging Face transformers builds each family."""

from __future__ import annotations

from dataclasses import dataclass

from .arch import ArchDims


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model, split the way papers quote them.

    ``embedding``: the input token embedding ``V·d`` (plus the learned absolute position embedding
    ``max_seq_len·d`` for gpt2). A tied output head shares it and is not counted again.
    ``non_embedding``: everything else, including an untied output head (``output_head``, also
    given on its own), norms, biases and T5's relative-position bias tables. This matches the
    Gemma 2 report's "embedding / non-embedding" split. ``total = embedding + non_embedding``.
    """

    embedding: int
    non_embedding: int
    total: int
    output_head: int = 0


def _attention_params(a: ArchDims, *, bias: bool) -> int:
    """q, k, v and output projections; ``bias``: q/k/v biases (qwen2)."""
    weights = a.d_model * (a.q_dim + 2 * a.kv_dim) + a.q_dim * a.d_model
    return weights + (a.q_dim + 2 * a.kv_dim if bias else 0)


def _mlp_params(a: ArchDims) -> int:
    return (3 if a.mlp_is_gated else 2) * a.d_model * a.d_ff


def _decoder_only_layer(a: ArchDims) -> int:
    """llama/qwen2: 2 RMSNorms per layer; gemma2: 4 (pre/post attention, pre/post MLP)."""
    norms = {"llama": 2, "qwen2": 2, "gemma2": 4}[a.family]
    return _attention_params(a, bias=a.family == "qwen2") + _mlp_params(a) + norms * a.d_model


def _gpt2_layer(a: ArchDims) -> int:
    """Conv1D c_attn/c_proj/c_fc/c_proj, all with biases; two LayerNorms with weight and bias."""
    attention = _attention_params(a, bias=False) + 3 * a.q_dim + a.d_model
    mlp = _mlp_params(a) + a.d_ff + a.d_model
    return attention + mlp + 2 * 2 * a.d_model


def _t5_stacks(a: ArchDims) -> int:
    """Encoder and decoder blocks (no biases, RMS-style norms with weight only).

    Encoder block: self-attention + norm, MLP + norm. Decoder block: self-attention + norm,
    cross-attention + norm, MLP + norm. Each stack has one relative-position bias table
    (buckets × heads, in its first block; cross-attention has none) and a final norm.
    """
    attention = _attention_params(a, bias=False)
    encoder_block = attention + _mlp_params(a) + 2 * a.d_model
    decoder_block = 2 * attention + _mlp_params(a) + 3 * a.d_model
    per_stack = a.relative_attention_num_buckets * a.n_heads + a.d_model
    return a.n_layers * encoder_block + a.decoder_layers * decoder_block + 2 * per_stack


def param_counts(a: ArchDims) -> ParamCounts:
    """Count parameters exactly as ``sum(p.numel() for p in model.parameters())`` would.

    llama/qwen2/gemma2: per layer ``d·(H+2·KV)·hd + H·hd·d`` attention (+ ``(H+2·KV)·hd`` q/k/v
    biases for qwen2), ``3·d·d_ff`` gated MLP, 2 (gemma2: 4) RMSNorm weights of size d; a final
    norm; ``V·d`` output head unless tied. gpt2: learned positions, Conv1D weights and biases,
    LayerNorm weights and biases, tied head. t5: see ``_t5_stacks``; one shared embedding for
    encoder and decoder inputs; ``V·d`` head unless tied (T5 v1.1 is untied).
    """
    token_embedding = a.vocab_size * a.d_model
    head = 0 if a.tie_embeddings else token_embedding
    if a.family == "gpt2":
        embedding = token_embedding + a.max_seq_len * a.d_model
        body = a.n_layers * _gpt2_layer(a) + 2 * a.d_model
    elif a.family == "t5":
        embedding = token_embedding
        body = _t5_stacks(a)
    else:
        embedding = token_embedding
        body = a.n_layers * _decoder_only_layer(a) + a.d_model
    non_embedding = body + head
    return ParamCounts(embedding, non_embedding, embedding + non_embedding, head)
