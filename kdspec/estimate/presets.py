"""Architectures of well-known models, for planning without downloading anything.

Sizes are those of the published configs (Hugging Face config.json, or the t5x gin files for
T5 v1.1); each entry says where a figure departs from the checkpoint.
"""

from __future__ import annotations

from .arch import ArchDims
from .hf_config import arch_from_hf_config

__all__ = ["PRESETS", "get_preset", "arch_from_hf_config"]

# Gemma 2 (arXiv 2408.00118, Table 1): the report counts a 256,128-row embedding, which gives its
# published 590,118,912 / 917,962,752 / 1,180,237,824 embedding parameters. The released
# checkpoints' config.json has vocab_size 256,000 (arch_from_hf_config of it gives that).
_GEMMA2_VOCAB = 256_128


def _gemma2(d: int, layers: int, heads: int, kv: int, head_dim: int, d_ff: int) -> ArchDims:
    return ArchDims("gemma2", _GEMMA2_VOCAB, d, layers, heads, kv, head_dim, d_ff,
                    tie_embeddings=True, max_seq_len=8192, sliding_window=4096)


def _gpt2(d: int, layers: int, heads: int) -> ArchDims:
    return ArchDims("gpt2", 50_257, d, layers, heads, heads, d // heads, 4 * d,
                    tie_embeddings=True, max_seq_len=1024)


def _llama2(d: int, layers: int, heads: int, d_ff: int) -> ArchDims:
    return ArchDims("llama", 32_000, d, layers, heads, heads, d // heads, d_ff,
                    tie_embeddings=False, max_seq_len=4096)


def _qwen2(vocab: int, d: int, layers: int, heads: int, kv: int, d_ff: int, tied: bool) -> ArchDims:
    return ArchDims("qwen2", vocab, d, layers, heads, kv, d // heads, d_ff,
                    tie_embeddings=tied, max_seq_len=32_768)


def _t5_v1_1(d: int, layers: int, heads: int, d_ff: int) -> ArchDims:
    # T5 v1.1: gated-GELU MLP, head size 64 (d_kv), untied head, 32 relative-position buckets.
    return ArchDims("t5", 32_128, d, layers, heads, heads, 64, d_ff, tie_embeddings=False,
                    max_seq_len=512, n_decoder_layers=layers)


PRESETS: dict[str, ArchDims] = {
    "gemma2-2b": _gemma2(2304, 26, 8, 4, 256, 9216),
    "gemma2-9b": _gemma2(3584, 42, 16, 8, 256, 14336),
    "gemma2-27b": _gemma2(4608, 46, 32, 16, 128, 36864),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "llama-2-7b": _llama2(4096, 32, 32, 11008),
    "llama-2-13b": _llama2(5120, 40, 40, 13824),
    "qwen2-0.5b": _qwen2(151_936, 896, 24, 14, 2, 4864, tied=True),
    "qwen2-1.5b": _qwen2(151_936, 1536, 28, 12, 2, 8960, tied=True),
    "qwen2-7b": _qwen2(152_064, 3584, 28, 28, 4, 18944, tied=False),
    "t5-v1_1-small": _t5_v1_1(512, 8, 6, 1024),
    "t5-v1_1-base": _t5_v1_1(768, 12, 12, 2048),
    "t5-v1_1-large": _t5_v1_1(1024, 24, 16, 2816),
    "t5-v1_1-xl": _t5_v1_1(2048, 24, 32, 5120),
    "t5-v1_1-xxl": _t5_v1_1(4096, 24, 64, 10240),
}


def get_preset(name: str) -> ArchDims:
    """The preset called ``name``; the error lists the valid names and the closest one."""
    try:
        return PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(
            f"unknown preset {name!r}{hint}; presets: {', '.join(sorted(PRESETS))}"
        ) from None
