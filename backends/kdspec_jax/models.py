"""Build or load the models a node names, and save a trained one as a HF folder.

A node's `student` / `teacher` / `model:<ref>` config is either `{"stage": NAME}` (an earlier
stage's saved model, read from `ctx.model_dir(role)`) or a `models:` entry dumped with its
name: `{"model": NAME, "source" | "arch" | "preset": ..., "dtype": ..., "tokenizer": ...}` (the
torch backend's `kdspec_torch.models` contract).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kdspec.run.backend import NodeContext
from kdspec.spec.models import ArchConfig

from .data import JaxTokenizer, derive_seed, load_tokenizer
from .model import JaxModelConfig, Params, init_params
from .weights import load_hf, load_hf_config, save_hf

__all__ = [
    "JAX_FAMILIES",
    "LoadedModel",
    "arch_hf_config",
    "compute_dtype",
    "load_model",
    "model_tokenizer",
    "save_student",
]

JAX_FAMILIES = ("llama", "qwen2", "gemma2")


@dataclass
class LoadedModel:
    config: JaxModelConfig
    params: Params
    hf_config: dict[str, Any]  # config.json keys to keep when saving (token ids, ...)


def arch_hf_config(arch: ArchConfig, tokenizer: JaxTokenizer) -> dict[str, Any]:
    """The HF config.json of an inline `arch:`, as the torch backend builds it (vocabulary
    defaults to the tokenizer's; Gemma 2's query_pre_attn_scalar is head_dim and its window
    defaults to max_seq_len)."""
    if arch.family not in JAX_FAMILIES:
        raise NotImplementedError(
            f"the jax backend's model covers {', '.join(JAX_FAMILIES)}, not {arch.family}")
    vocab = arch.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"arch vocab_size {vocab} is smaller than the tokenizer's "
                         f"{len(tokenizer)}")
    hf: dict[str, Any] = {
        "model_type": arch.family,
        "vocab_size": vocab,
        "hidden_size": arch.d_model,
        "intermediate_size": arch.d_ff,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "num_key_value_heads": arch.n_kv_heads or arch.n_heads,
        "max_position_embeddings": arch.max_seq_len,
        "tie_word_embeddings": arch.resolved_tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        **tokenizer.token_ids(),
    }
    if arch.family == "qwen2":
        if arch.head_dim not in (None, arch.d_model // arch.n_heads):
            raise ValueError("qwen2 fixes head_dim = d_model / n_heads; drop `head_dim`")
        return hf
    hf["head_dim"] = arch.resolved_head_dim
    if arch.family == "gemma2":
        hf.update(query_pre_attn_scalar=arch.resolved_head_dim,
                  sliding_window=arch.sliding_window or arch.max_seq_len,
                  attn_logit_softcapping=arch.attn_softcap,
                  final_logit_softcapping=arch.final_softcap)
    return hf


def _param_dtype(ref: dict[str, Any], trainable: bool) -> Any:
    """Trained weights stay fp32 (bf16 only in the matmuls); a frozen model takes its `dtype`
    (auto: bf16 on accelerators, fp32 on the CPU)."""
    name = ref.get("dtype", "auto")
    if trainable or name == "float32" or (name == "auto" and jax.default_backend() == "cpu"):
        return jnp.float32
    return jnp.float16 if name == "float16" else jnp.bfloat16


def compute_dtype(precision: str) -> Any:
    """`auto`: fp32 on the CPU, bf16 matmuls on accelerators; weights stay fp32 either way."""
    if precision == "fp32" or (precision == "auto" and jax.default_backend() == "cpu"):
        return None
    return jnp.bfloat16


def load_model(ref: dict[str, Any], *, ctx: NodeContext, role: str, tokenizer: JaxTokenizer,
               trainable: bool) -> LoadedModel:
    """The model `ref` (a node's `student` / `teacher` / `model:<ref>` config) describes.
    Fresh `arch:` weights come from a key derived from the spec seed and the model's name, so
    every stage that starts from the same `models:` entry starts from the same weights."""
    own = ref.get("tokenizer")
    if own is not None and own != ctx.node.config.get("tokenizer"):
        raise NotImplementedError(
            f"model `{ref.get('model')}` names its own tokenizer {own!r}; the jax backend "
            "tokenizes every stage's data with the spec's `tokenizer`")
    dtype = _param_dtype(ref, trainable)
    if "stage" in ref:
        return _from_folder(stage_folder(ctx, role, ref["stage"]), dtype)
    if ref.get("preset") is not None:
        raise ValueError(f"model `{ref['model']}` is a preset ({ref['preset']}): presets have no "
                         "weights; give `source:` or `arch:` to run it")
    if ref.get("arch") is not None:
        hf = arch_hf_config(ArchConfig.model_validate(ref["arch"]), tokenizer)
        config = JaxModelConfig.from_hf(hf)
        seed = derive_seed(ctx.node.config.get("seed", 0), "init", ref["model"])
        params = init_params(config, jax.random.key(seed % 2**32), dtype)
        return LoadedModel(config, params, hf)
    return _from_folder(source_folder(ctx, ref["source"]), dtype)


def stage_folder(ctx: NodeContext, role: str, stage: str) -> Path:
    """The saved HF folder of stage `stage`, which fills `role` of this node."""
    folder = ctx.model_dir(role)
    if folder is None or not (folder / "config.json").exists():
        raise FileNotFoundError(f"stage `{stage}` has no saved model at {folder}; run it first")
    return folder


def source_folder(ctx: NodeContext, source: str) -> Path:
    """A `models:` entry's local `source:` folder (relative to the spec file)."""
    if source.startswith("hf:"):
        raise NotImplementedError(
            f"model source {source!r}: the jax backend loads local folders only; download it "
            "(huggingface-cli download ID --local-dir DIR) and give the folder")
    folder = (ctx.spec_dir / source).expanduser()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"model source {folder} has no config.json")
    return folder


def _from_folder(folder: Path, dtype: Any) -> LoadedModel:
    config, params = load_hf(folder, dtype=dtype)
    return LoadedModel(config, params, load_hf_config(folder))


def model_tokenizer(ctx: NodeContext, ref: dict[str, Any], role: str) -> JaxTokenizer:
    """The tokenizer a model (filling `role`) is evaluated with: a stage's model carries its
    own (saved beside it); a `models:` entry uses its `tokenizer` or the spec's."""
    if "stage" in ref:
        folder = stage_folder(ctx, role, ref["stage"])
        return load_tokenizer(str(folder), spec_dir=ctx.spec_dir, work_dir=ctx.node_dir)
    name = ref.get("tokenizer") or ctx.node.config["tokenizer"]
    return load_tokenizer(name, spec_dir=ctx.spec_dir, work_dir=ctx.node_dir / "tokenizer")


def save_student(model: LoadedModel, params: Params, tokenizer: JaxTokenizer,
                 folder: Path) -> None:
    """The HF folder (config, safetensors, tokenizer) built in a temp folder, then renamed:
    `folder` is either absent or complete."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    base = {**model.hf_config, **tokenizer.token_ids()}
    save_hf(params, model.config, tmp, base_config=base)
    tokenizer.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
