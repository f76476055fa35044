"""Build or load the transformers models a node names, and save a trained one.

A node's `student` / `teacher` config is either `{"stage": NAME}` (an earlier stage's saved
model, read from `ctx.model_dir(role)`) or a `models:` entry dumped with its name:
`{"model": NAME, "source" | "arch" | "preset": ..., "dtype": ..., "tokenizer": ...}`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kdspec.run.backend import NodeContext
from kdspec.spec.models import ArchConfig

from .runtime import derive_seed, preserved_rng

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def arch_config(arch: ArchConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config of an inline `arch:`. The vocabulary defaults to the tokenizer's
    size; dropout is off (none of the distillation recipes kdspec follows uses it)."""
    vocab = arch.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(
            f"arch vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)}"
        )
    kv_heads = arch.n_kv_heads or arch.n_heads
    tie = arch.resolved_tie_embeddings
    ids = token_ids(tokenizer)
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    common = dict(
        vocab_size=vocab,
        hidden_size=arch.d_model,
        intermediate_size=arch.d_ff,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=arch.max_seq_len,
        tie_word_embeddings=tie,
        rope_parameters=rope,
        attention_dropout=0.0,
        **ids,
    )
    family = arch.family
    if family == "llama":
        return AutoConfig.for_model("llama", head_dim=arch.resolved_head_dim, **common)
    if family == "qwen2":
        if arch.head_dim not in (None, arch.d_model // arch.n_heads):
            raise ValueError("qwen2 fixes head_dim = d_model / n_heads; drop `head_dim`")
        return AutoConfig.for_model("qwen2", **common)
    if family == "gemma2":
        return AutoConfig.for_model(
            "gemma2",
            head_dim=arch.resolved_head_dim,
            query_pre_attn_scalar=arch.resolved_head_dim,
            sliding_window=arch.sliding_window or arch.max_seq_len,
            attn_logit_softcapping=arch.attn_softcap,
            final_logit_softcapping=arch.final_softcap,
            **common,
        )
    if family == "gpt2":
        if arch.resolved_head_dim * arch.n_heads != arch.d_model or kv_heads != arch.n_heads:
            raise ValueError("gpt2 has head_dim = d_model / n_heads and no grouped-query heads")
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab,
            n_embd=arch.d_model,
            n_layer=arch.n_layers,
            n_head=arch.n_heads,
            n_inner=arch.d_ff,
            n_positions=arch.max_seq_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=tie,
            **ids,
        )
    if family == "t5":
        return AutoConfig.for_model(
            "t5",
            vocab_size=vocab,
            d_model=arch.d_model,
            d_kv=arch.resolved_head_dim,
            d_ff=arch.d_ff,
            num_layers=arch.n_layers,
            num_decoder_layers=arch.n_decoder_layers or arch.n_layers,
            num_heads=arch.n_heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            tie_word_embeddings=tie,
            decoder_start_token_id=ids["pad_token_id"],
            **ids,
        )
    raise ValueError(f"unknown model family {family!r}")


def _auto_class(config: PretrainedConfig) -> type:
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def attention_for(config: PretrainedConfig, attn: str) -> str:
    """`attn`, except eager for a model class without an SDPA path (Gemma 2's soft-capped
    attention logits, for one)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    )

    mapping = (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if config.is_encoder_decoder
               else MODEL_FOR_CAUSAL_LM_MAPPING)
    supported = getattr(mapping.get(type(config), None), "_supports_sdpa", False)
    return "eager" if attn == "sdpa" and not supported else attn


def _dtype(name: str, dev: torch.device, trainable: bool) -> torch.dtype:
    """Trained weights stay fp32 (autocast does the bf16 math); a frozen model takes its
    `dtype`, where auto is bf16 on CUDA and fp32 on the CPU."""
    if trainable:
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(
    ref: dict[str, Any],
    *,
    ctx: NodeContext,
    role: str,
    tokenizer: PreTrainedTokenizerBase,
    dev: torch.device,
    trainable: bool,
    attn: str = "sdpa",
) -> PreTrainedModel:
    """The model `ref` describes, on `dev`, in train mode when `trainable` else frozen in eval
    mode. Fresh `arch:` weights are seeded from the spec seed and the model's name, so every
    stage that starts from the same `models:` entry starts from the same weights."""
    dtype = _dtype(ref.get("dtype", "auto"), dev, trainable)
    own = ref.get("tokenizer")
    if own is not None and own != ctx.node.config.get("tokenizer"):
        raise NotImplementedError(
            f"model `{ref['model']}` names its own tokenizer {own!r}; the torch backend "
            "tokenizes every stage's data with the spec's `tokenizer`, so give the model that "
            "one (or none)")
    if "stage" in ref:
        model = _from_folder(_stage_folder(ctx, role, ref["stage"]), dtype, attn)
    elif ref.get("preset") is not None:
        raise ValueError(
            f"model `{ref['model']}` is a preset ({ref['preset']}): presets describe well-known "
            "shapes for `kdspec plan` and have no weights; give `source:` (pretrained weights) "
            "or `arch:` (fresh weights) to run it"
        )
    elif ref.get("arch") is not None:
        config = arch_config(ArchConfig.model_validate(ref["arch"]), tokenizer)
        with preserved_rng():
            torch.manual_seed(derive_seed(ctx.node.config.get("seed", 0), "init", ref["model"]))
            model = _auto_class(config).from_config(
                config, attn_implementation=attention_for(config, attn), dtype=dtype)
    else:
        model = _from_folder(_source(ctx, ref["source"]), dtype, attn)
    model.to(dev)
    if trainable:
        return model.train()
    model.requires_grad_(False)
    return model.eval()


def _stage_folder(ctx: NodeContext, role: str, stage: str) -> Path:
    folder = ctx.model_dir(role)
    if folder is None or not (folder / "config.json").exists():
        raise FileNotFoundError(f"stage `{stage}` has no saved model at {folder}; run it first")
    return folder


def _source(ctx: NodeContext, source: str) -> str | Path:
    if source.startswith("hf:"):
        return source.removeprefix("hf:")
    folder = (ctx.spec_dir / source).expanduser()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"model source {folder} has no config.json")
    return folder


def _from_folder(where: str | Path, dtype: torch.dtype, attn: str) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(where)
    return _auto_class(config).from_pretrained(where, dtype=dtype,
                                               attn_implementation=attention_for(config, attn))


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """`save_pretrained` (safetensors, config, generation config, tokenizer) into a temp folder,
    then a rename: `folder` is either absent or complete."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
