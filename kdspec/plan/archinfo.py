"""Shapes of the models a plan uses, for estimates and vocabulary checks (no framework import)."""

from __future__ import annotations

from pathlib import Path

from ..estimate.arch import ArchDims
from ..estimate.presets import PRESETS, arch_from_hf_config
from ..spec import Spec
from ..spec.models import ArchConfig, ModelDef
from .resolve import ModelOrigin, local_hf_config, root_model, tokenizer_of


def tokenizer_vocab_size(name: str) -> int | None:
    """Vocabulary size of a builtin tokenizer; None when only the files could tell."""
    if not name.startswith("builtin:"):
        return None
    from ..data.tokenizer import builtin_vocab_size

    try:
        return builtin_vocab_size(name)
    except (KeyError, ValueError):
        return None


def dims_from_arch(arch: ArchConfig, vocab_size: int) -> ArchDims:
    return ArchDims(
        family=arch.family,
        vocab_size=vocab_size,
        d_model=arch.d_model,
        n_layers=arch.n_layers,
        n_heads=arch.n_heads,
        n_kv_heads=arch.n_kv_heads or arch.n_heads,
        head_dim=arch.resolved_head_dim,
        d_ff=arch.d_ff,
        tie_embeddings=arch.resolved_tie_embeddings,
        max_seq_len=arch.max_seq_len,
        n_decoder_layers=(arch.n_decoder_layers or arch.n_layers) if arch.family == "t5" else None,
        sliding_window=arch.sliding_window,
    )


def model_dims(spec: Spec, model: ModelDef | None, base_dir: Path) -> ArchDims | None:
    """The architecture of a `models:` entry, if the spec (or a local config.json) tells it."""
    if model is None:
        return None
    if model.arch is not None:
        vocab = model.arch.vocab_size or tokenizer_vocab_size(tokenizer_of(spec, model))
        return dims_from_arch(model.arch, vocab) if vocab else None
    if model.preset is not None:
        return PRESETS.get(model.preset)
    config = local_hf_config(model, base_dir)
    if config is None:
        return None
    try:
        return arch_from_hf_config(config)
    except (KeyError, ValueError, TypeError):
        return None


def origin_dims(spec: Spec, origin: ModelOrigin, base_dir: Path) -> ArchDims | None:
    """Stage outputs keep the shape of the model their chain started from."""
    return model_dims(spec, root_model(spec, origin), base_dir)


def origin_tokenizer(spec: Spec, origin: ModelOrigin) -> str:
    return tokenizer_of(spec, root_model(spec, origin))
