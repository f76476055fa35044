"""The shape of a transformer, as the estimator needs it (no weights, no framework)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Family = Literal["llama", "qwen2", "gemma2", "gpt2", "t5"]
FAMILIES: tuple[str, ...] = get_args(Family)


@dataclass(frozen=True)
class ArchDims:
    """Sizes of one model, enough to count its parameters, FLOPs and memory.

    ``n_layers`` is the number of decoder layers, or for T5 the number of encoder layers (the
    decoder has ``n_decoder_layers``, default ``n_layers``). ``d_ff`` is the MLP intermediate size:
    each of gate and up for a gated MLP (llama, qwen2, gemma2, T5 v1.1), the single hidden layer
    for a plain one (gpt2, original T5). ``sliding_window`` (gemma2 only): the local layers, every
    other layer starting with layer 0 as transformers builds Gemma 2, attend to at most this many
    keys.
    """

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    tie_embeddings: bool
    max_seq_len: int = 2048
    n_decoder_layers: int | None = None
    sliding_window: int | None = None
    gated_mlp: bool | None = None
    """None = the family's default: plain for gpt2, gated for the others (original T5: False)."""
    relative_attention_num_buckets: int = 32
    """T5 only: rows of the relative-position bias table (one table per stack)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                 "max_seq_len", "relative_attention_num_buckets")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.n_decoder_layers is not None and self.family != "t5":
            raise ValueError("n_decoder_layers applies to family t5 only")
        if self.sliding_window is not None:
            if self.family != "gemma2":
                raise ValueError("sliding_window applies to family gemma2 only")
            if self.sliding_window <= 0:
                raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.family == "gpt2" and self.gated_mlp:
            raise ValueError("gpt2 has a plain (non-gated) MLP")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family == "t5"

    @property
    def mlp_is_gated(self) -> bool:
        if self.gated_mlp is None:
            return self.family != "gpt2"
        return self.gated_mlp

    @property
    def decoder_layers(self) -> int:
        """Layers that produce the output tokens (all layers of a decoder-only model)."""
        if self.family == "t5":
            return self.n_decoder_layers or self.n_layers
        return self.n_layers

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_windows(self) -> list[int | None]:
        """Each decoder layer's attention window (None = global), in layer order.

        Gemma 2 alternates local and global layers, local first (transformers:
        ``layer_types[i] = "sliding_attention" if i % 2 == 0``).
        """
        if self.sliding_window is None:
            return [None] * self.decoder_layers
        return [self.sliding_window if i % 2 == 0 else None for i in range(self.decoder_layers)]
