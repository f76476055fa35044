"""Model declarations: where a model's weights and shape come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel

Family = Literal["llama", "qwen2", "gemma2", "gpt2", "t5"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

# Families whose input embedding and output head share weights by default, as transformers 5
# builds them from a config (its T5Config forces tied weights; a v1.1 checkpoint loaded with
# from_pretrained keeps its separate head).
TIED_BY_DEFAULT = {"gemma2", "gpt2", "t5"}


class ArchConfig(StrictModel):
    """An inline architecture: the model is built from these sizes with fresh weights."""

    family: Family = Field(description="Model family, as transformers names it.")
    vocab_size: int | None = Field(
        None, gt=0, description="Vocabulary size; defaults to the spec tokenizer's size."
    )
    d_model: int = Field(gt=0, description="Hidden size (hidden_size / n_embd / d_model).")
    n_layers: int = Field(gt=0, description="Number of decoder layers (T5: encoder layers).")
    n_heads: int = Field(gt=0, description="Attention heads.")
    n_kv_heads: int | None = Field(
        None, gt=0, description="Key/value heads for grouped-query attention; default n_heads."
    )
    head_dim: int | None = Field(
        None, gt=0, description="Per-head size; default d_model / n_heads."
    )
    d_ff: int = Field(gt=0, description="MLP intermediate size (gated for llama/qwen2/gemma2/t5).")
    max_seq_len: int = Field(2048, gt=0, description="Maximum positions (learned for gpt2).")
    tie_embeddings: bool | None = Field(
        None, description="Share input embedding and output head; default per family."
    )
    n_decoder_layers: int | None = Field(
        None, gt=0, description="T5 only: decoder layers; default n_layers."
    )
    sliding_window: int | None = Field(
        None, gt=0, description="Gemma 2 only: window of the local (every other) attention layers."
    )
    attn_softcap: float | None = Field(
        None, gt=0, description="Gemma 2 only: attention-logit soft cap (50 in Gemma 2)."
    )
    final_softcap: float | None = Field(
        None, gt=0, description="Gemma 2 only: final-logit soft cap (30 in Gemma 2)."
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (llama, qwen2, gemma2).")

    @model_validator(mode="after")
    def _check_shapes(self) -> ArchConfig:
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                "or give head_dim"
            )
        gemma_only = ("sliding_window", "attn_softcap", "final_softcap")
        if self.family != "gemma2" and any(getattr(self, f) is not None for f in gemma_only):
            raise ValueError(f"{', '.join(gemma_only)} apply to family gemma2 only")
        if self.family != "t5" and self.n_decoder_layers is not None:
            raise ValueError("n_decoder_layers applies to family t5 only")
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_tie_embeddings(self) -> bool:
        if self.tie_embeddings is None:
            return self.family in TIED_BY_DEFAULT
        return self.tie_embeddings


class ModelDef(StrictModel):
    """A named model: exactly one of `source`, `arch` or `preset`."""

    source: str | None = Field(
        None,
        description="Pretrained weights: `hf:ORG/NAME` (a hub id) or a local folder with "
        "config.json (relative paths are relative to the spec file).",
    )
    arch: ArchConfig | None = Field(None, description="Inline architecture, fresh weights.")
    preset: str | None = Field(
        None,
        description="A built-in architecture of well-known sizes (e.g. gemma2-2b, gpt2-xl, "
        "llama-2-7b, t5-v1_1-base); see `kdspec presets`. Fresh weights; for planning.",
    )
    dtype: DType = Field("auto", description="Weight dtype: auto = fp32 on CPU, bf16 on GPU/TPU.")
    tokenizer: str | None = Field(
        None, description="This model's tokenizer if it differs from the spec's `tokenizer`."
    )

    @model_validator(mode="after")
    def _exactly_one_origin(self) -> ModelDef:
        given = [k for k in ("source", "arch", "preset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a model needs exactly one of `source`, `arch` or `preset`"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self
