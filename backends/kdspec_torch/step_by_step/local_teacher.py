"""A local transformers causal LM as the rationale teacher: batched generation with a KV cache
(`kdspec_torch.generate.generate_text`), greedy or sampled, resumable.

Prompts are generated in chunks of `batch_size`, ordered by prompt length (less padding; a
greedy answer does not depend on its batch). Chunk `c` samples with a generator seeded by
`(seed, "rationales", c)`, so a sampled run is reproducible and a resumed one draws exactly what
an uninterrupted one would. Each finished chunk is appended as one JSON line to a partial file
in the node folder; a resumed node reads the complete lines back and generates only the rest (a
line torn by a kill is ignored and its chunk generated again).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdspec.run.backend import NodeContext

from ..generate import Sampling, generate_text
from ..models import load_model
from ..runtime import autocast, autocast_dtype, derive_seed
from ..tokenizer import load_tokenizer

__all__ = ["generate_answers", "load_teacher", "prompt_budget"]


def load_teacher(ctx: NodeContext, dev: torch.device
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The node's `teacher` (frozen, eval mode) and its tokenizer: an earlier stage's model comes
    with the tokenizer saved beside it; a `models:` entry uses its own `tokenizer` or the
    spec's."""
    ref = ctx.node.config["teacher"]
    if "stage" in ref:
        folder = ctx.model_dir("teacher")
        if folder is None or not (folder / "config.json").exists():
            raise FileNotFoundError(f"stage `{ref['stage']}` has no saved model at {folder}; "
                                    "run it first")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(ref.get("tokenizer") or ctx.node.config["tokenizer"],
                                   spec_dir=ctx.spec_dir, work_dir=ctx.node_dir / "tokenizer")
    model = load_model(ref, ctx=ctx, role="teacher", tokenizer=tokenizer, dev=dev,
                       trainable=False)
    if model.config.is_encoder_decoder:
        raise ValueError(f"the rationale teacher is a {model.config.model_type} "
                         "encoder-decoder; local teachers must be causal LMs (or serve it "
                         "behind `rationales.http`)")
    return model, tokenizer


def prompt_budget(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit beside the generation in the model's context (None: unknown).
    Longer prompts are left-truncated, dropping the first demonstrations first."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return None
    if limit <= max_new_tokens:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"teacher's {limit}-token context")
    return limit - max_new_tokens


def _read_partial(path: Path) -> dict[int, dict[str, Any]]:
    chunks: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return chunks
    for line in lines:
        try:
            row = json.loads(line)
            chunks[int(row["chunk"])] = row
        except (ValueError, KeyError, TypeError):
            continue  # torn by a kill
    return chunks


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     prompts: Sequence[str], sampling: Sampling, *, seed: int, batch_size: int,
                     partial: Path,
                     progress: Callable[[int, int], None] = lambda done, total: None,
                     ) -> list[str]:
    """The teacher's continuation of every prompt, in order (module doc for chunks and
    resume). `progress(done, total)` is called after each chunk."""
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    done = _read_partial(partial)
    texts: list[str | None] = [None] * len(prompts)
    budget = prompt_budget(model, sampling.max_new_tokens)
    amp = autocast_dtype("auto", device)
    for c, chunk in enumerate(chunks):
        row = done.get(c)
        if row is None or row["index"] != chunk:
            generator = torch.Generator(device=device)
            generator.manual_seed(derive_seed(seed, "rationales", c))
            with autocast(amp, device):
                out = generate_text(model, tokenizer, [prompts[i] for i in chunk], sampling,
                                    batch_size=batch_size, max_prompt_tokens=budget,
                                    generator=generator)
            row = {"chunk": c, "index": chunk, "text": out}
            _append(partial, row)
        for i, text in zip(row["index"], row["text"], strict=True):
            texts[i] = text
        progress(sum(len(ch) for ch in chunks[: c + 1]), len(prompts))
    return [t if t is not None else "" for t in texts]
