"""Read a Hugging Face ``config.json`` (as a dict) into ``ArchDims``: pure dict parsing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .arch import ArchDims

Config = Mapping[str, Any]


def _get(config: Config, key: str, default: Any = None) -> Any:
    """``config[key]``, treating an explicit null like a missing key."""
    value = config.get(key)
    return default if value is None else value


def _require(config: Config, *keys: str) -> None:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        kind = config.get("model_type")
        raise ValueError(f"{kind} config.json lacks {', '.join(missing)}")


def _reject_true(config: Config, *flags: str) -> None:
    """Options that change the parameter count in ways ``ArchDims`` does not represent."""
    on = [f for f in flags if config.get(f)]
    if on:
        raise ValueError(
            f"{config.get('model_type')} config with {', '.join(on)} = true is not supported by "
            "the estimator (its parameter and FLOP counts would be wrong)"
        )


def _llama_like(config: Config, family: str, tie_default: bool) -> ArchDims:
    _require(config, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")
    heads = config["num_attention_heads"]
    return ArchDims(
        family=family,  # type: ignore[arg-type]
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=_get(config, "num_key_value_heads", heads),
        head_dim=_get(config, "head_dim", config["hidden_size"] // heads),
        d_ff=config["intermediate_size"],
        tie_embeddings=bool(_get(config, "tie_word_embeddings", tie_default)),
        max_seq_len=_get(config, "max_position_embeddings", 2048),
    )


def _llama(config: Config) -> ArchDims:
    _reject_true(config, "attention_bias", "mlp_bias")
    return _llama_like(config, "llama", tie_default=False)


def _qwen2(config: Config) -> ArchDims:
    _reject_true(config, "use_sliding_window")
    return _llama_like(config, "qwen2", tie_default=False)


def _gemma2(config: Config) -> ArchDims:
    arch = _llama_like({"head_dim": 256, **config}, "gemma2", tie_default=True)
    window = _get(config, "sliding_window", 4096)
    layer_types = config.get("layer_types")
    if layer_types is not None:
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention"
                    for i in range(arch.n_layers)]
        if list(layer_types) != expected:
            raise ValueError(
                "gemma2 layer_types other than alternating sliding/full (sliding first) are not "
                "supported by the estimator"
            )
    return replace(arch, sliding_window=window)


def _gpt2(config: Config) -> ArchDims:
    _require(config, "vocab_size", "n_embd", "n_layer", "n_head")
    d, heads = config["n_embd"], config["n_head"]
    return ArchDims(
        family="gpt2",
        vocab_size=config["vocab_size"],
        d_model=d,
        n_layers=config["n_layer"],
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        d_ff=_get(config, "n_inner", 4 * d),
        tie_embeddings=bool(_get(config, "tie_word_embeddings", True)),
        max_seq_len=_get(config, "n_positions", 1024),
    )


def _t5(config: Config) -> ArchDims:
    _require(config, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    projection = _get(config, "feed_forward_proj", "relu")
    if projection not in ("relu", "gated-gelu", "gated-relu", "gelu", "gated-silu", "silu"):
        raise ValueError(f"t5 feed_forward_proj {projection!r} is not supported by the estimator")
    heads = config["num_heads"]
    return ArchDims(
        family="t5",
        vocab_size=config["vocab_size"],
        d_model=config["d_model"],
        n_layers=config["num_layers"],
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=config["d_kv"],
        d_ff=config["d_ff"],
        tie_embeddings=bool(_get(config, "tie_word_embeddings", True)),
        max_seq_len=_get(config, "n_positions", 512),
        n_decoder_layers=_get(config, "num_decoder_layers", config["num_layers"]),
        gated_mlp=None if projection.startswith("gated-") else False,  # None: gated (v1.1)
        relative_attention_num_buckets=_get(config, "relative_attention_num_buckets", 32),
    )


_READERS: dict[str, Callable[[Config], ArchDims]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gemma2": _gemma2,
    "gpt2": _gpt2,
    "t5": _t5,
}


def arch_from_hf_config(config: Config) -> ArchDims:
    """``ArchDims`` from a transformers ``config.json`` dict (``model_type`` selects the family).

    Defaults for absent keys follow each transformers config class (e.g. gemma2 ties its
    embeddings and uses head_dim 256; T5Config ties unless ``tie_word_embeddings`` is false,
    which T5 v1.1 sets). Options that change the parameter count but that ``ArchDims`` cannot
    express (llama ``attention_bias``, qwen2 ``use_sliding_window``) are rejected, not ignored.
    """
    model_type = config.get("model_type")
    reader = _READERS.get(str(model_type))
    if reader is None:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the estimator; "
            f"supported: {', '.join(_READERS)}"
        )
    return reader(config)
