"""`seqkd`: sequence-level KD (Kim & Rush 2016), the MiniLLM paper's SeqKD baseline.

Before training, the teacher answers every training prompt (`[bos] + prompt` as the pair rows
hold it) with the stage's `generation` settings (greedy by default); the student is then
trained with cross-entropy on those answers:

    L = −(1/|ŷ|) Σ_t log q(ŷ_t | prompt, ŷ_<t),   ŷ = the teacher's answer + eos.

The answers are generated once and cached in `<node>/seqkd_generations.jsonl` (token ids and
decoded text, one line per training row), so a resumed node does not generate again; the
executor wipes the node folder when its fingerprint changes. A sampled generation is seeded by
(seed, stage name). (The official LMOps SeqKD samples the teacher at temperature 1 and then
trains with the KD mix `kd_ratio` 0.5 on the teacher's data; kdspec's default is the classic
greedy SeqKD with plain CE; set `generation.temperature: 1` for the sampled variant.)

The trainer calls `prepare_data(setup, data)` after cutting the dataset into pair rows and
trains on the rows it returns.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_text

from ..batches import TokenData, pair_rows
from ..generate import Sampling, generate, left_pad
from ..runtime import derive_seed
from .base import Setup
from .ce import CrossEntropy
from .ce import build as _build_ce

LAYOUT = "pairs"
CACHE = "seqkd_generations.jsonl"

__all__ = ["CACHE", "LAYOUT", "build", "prepare_data", "row_prompts", "teacher_responses"]


def row_prompts(data: TokenData) -> list[list[int]]:
    """Each pair row's prompt (`[bos] + prompt`): its tokens before the first target."""
    first = data.targets.int().argmax(dim=1)
    return [data.tokens[row, : int(j)].tolist() for row, j in enumerate(first)]


@torch.no_grad()
def teacher_responses(teacher: PreTrainedModel, prompts: list[list[int]], sampling: Sampling, *,
                      pad_id: int, eos_id: int, batch_size: int,
                      generator: torch.Generator | None = None) -> list[list[int]]:
    """The teacher's answer to each prompt, without its eos, in the prompts' order. Prompts are
    batched in order of length (less padding; greedy answers do not depend on the batching)."""
    device = next(teacher.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad_id)
        out = generate(teacher, ids.to(device), mask.to(device), sampling, eos_token_id=eos_id,
                       pad_token_id=pad_id, generator=generator)
        for i, tokens in zip(chunk, out.token_lists(), strict=True):
            answers[i] = tokens
    return answers


def _read_cache(path: Path, prompts: list[list[int]]) -> list[list[int]] | None:
    """The cached answers if the cache holds exactly these prompts, else None."""
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if [line["prompt_ids"] for line in lines] != prompts:
        return None
    return [line["response_ids"] for line in lines]


def _write_cache(path: Path, prompts: list[list[int]], answers: list[list[int]],
                 texts: list[str]) -> None:
    lines = [json.dumps({"prompt_ids": p, "response_ids": a, "response": t})
             for p, a, t in zip(prompts, answers, texts, strict=True)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _generate(setup: Setup, prompts: list[list[int]]) -> list[list[int]]:
    from ..models import load_model

    stage, tok = setup.stage, setup.tokenizer
    teacher = load_model(setup.config["teacher"], ctx=setup.ctx, role="teacher", tokenizer=tok,
                         dev=setup.device, trainable=False)
    generator = torch.Generator(device=setup.device)
    generator.manual_seed(derive_seed(setup.config["seed"], "seqkd", stage.name))
    sampling = Sampling.from_config(stage.generation)
    started = time.perf_counter()
    answers = teacher_responses(teacher, prompts, sampling, pad_id=tok.pad_token_id,
                                eos_id=tok.eos_token_id, batch_size=stage.batch_size,
                                generator=generator)
    setup.ctx.emit(Event("message", setup.ctx.node.id, message=(
        f"the teacher answered {len(prompts)} prompts in {time.perf_counter() - started:.1f}s")))
    return answers


def prepare_data(setup: Setup, data: TokenData) -> TokenData:
    """The pair rows with every response replaced by the teacher's answer (cached)."""
    tok = setup.tokenizer
    prompts = row_prompts(data)
    path = setup.ctx.node_dir / CACHE
    answers = _read_cache(path, prompts)
    if answers is None:
        answers = _generate(setup, prompts)
        _write_cache(path, prompts, answers, tok.batch_decode(answers, skip_special_tokens=True))
    skip = 1 if tok.bos_token_id is not None else 0  # pair_rows adds the bos back
    return pair_rows([p[skip:] for p in prompts], answers, bos_id=tok.bos_token_id,
                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seq_len=data.seq_len)


def build(setup: Setup) -> CrossEntropy:
    return _build_ce(setup)
