"""The `rationales` node on JAX: a local teacher writes a rationale and a label for every record.

The torch backend's node (``kdspec_torch.step_by_step.rationales_node``) with the same files, so
either backend's `step_by_step` trainer reads either backend's artifact:

* ``rationales.jsonl``: one line per kept example, ``{"index", "input", "raw", "gold",
  "rationale", "label"}`` (``index`` the record's position in the data, ``raw`` the teacher's
  whole text, ``gold`` the data's label or null);
* ``dropped.jsonl``: the examples left out, with ``raw`` and the ``reason`` (a parse failure or
  ``disagrees_with_gold``);
* ``stats.json``: ``examples``, ``kept``, ``failed_requests``, ``unparsed`` (and per reason),
  ``disagrees_with_gold``, ``filter_gold``, ``with_gold``, ``teacher_accuracy`` (the fraction of
  records with a gold label whose answer, read as the eval stage reads it, matches it),
  ``seconds``.

Prompting, parsing and the gold filter are the torch package's pure-Python ``prompts`` module
(it imports no torch). Generation is greedy with the KV cache (`kdspec_jax.generate`); prompts
are ``[bos] + few-shot prompt``, left-truncated to the teacher's context minus
``max_new_tokens`` (dropping the first demonstrations first), as in torch. Prompts run in chunks
of `GENERATION_BATCH` ordered by length; each finished chunk is appended to
``generations.partial.jsonl`` (the torch node's format), so a killed node resumes where it
stopped.

Not covered: sampled generation (``temperature > 0``) and HTTP teachers (the torch package's
client is standard-library only, but kept out here until it has a JAX-side test); both are
refused by `unsupported_reason` before a run starts. ``source: data`` copies the data's own
rationales, as in torch.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json, atomic_write_text
from kdspec_torch.step_by_step.prompts import FewShot, agrees_with_gold

from .data import JaxTokenizer, read_records
from .generate import generate_text
from .models import LoadedModel, load_model, model_tokenizer

__all__ = ["ARTIFACT", "Extraction", "extract", "generate_answers", "read_rationales",
           "run_rationales_node", "unsupported_reason"]

ARTIFACT = "rationales.jsonl"
DROPPED = "dropped.jsonl"
STATS = "stats.json"
PARTIAL = "generations.partial.jsonl"
GENERATION_BATCH = 16  # prompts per generation batch, as the torch node (and the planner)


def unsupported_reason(config: Mapping[str, Any]) -> str | None:
    """Why this backend cannot run a rationales node of `config` (None: it can)."""
    rationales = config.get("rationales")
    if not rationales:
        return "a `rationales` node without its `rationales` config (plan it from a spec)"
    if rationales["source"] == "data":
        return None
    if rationales.get("http"):
        return ("an HTTP teacher (`rationales.http`); the jax backend runs local teachers "
                "only: run this node with `--backend torch`")
    if float(rationales["generation"].get("temperature", 0.0)) != 0.0:
        return ("sampled rationale generation (temperature > 0); the jax backend's rationales "
                "node generates greedily: set `rationales.generation.temperature: 0`")
    return None


@dataclass
class Extraction:
    """Kept rows, dropped rows and the counts of `stats.json`."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def extract(records: Sequence[Mapping[str, Any]], raws: Sequence[str | None], fewshot: FewShot,
            *, filter_gold: bool) -> Extraction:
    """Parse every teacher text (None: no text, a failed request) and apply the gold filter:
    the torch node's rules, row for row."""
    out = Extraction()
    reasons: Counter[str] = Counter()
    with_gold = correct = 0
    for index, (record, raw) in enumerate(zip(records, raws, strict=True)):
        gold = None if record.get("label") is None else str(record["label"])
        base = {"index": index, "input": str(record["input"]), "raw": raw, "gold": gold}
        parsed = fewshot.parse(raw) if raw is not None else None
        with_gold += gold is not None
        # Accuracy reads the label as evaluation does, whether or not a rationale came with it.
        correct += raw is not None and gold is not None and \
            agrees_with_gold(fewshot.prediction(raw), gold)
        if parsed is None or not parsed.ok:
            reason = "request_failed" if parsed is None else parsed.failure
            reasons[reason] += 1
            out.dropped.append({**base, "reason": reason})
        elif filter_gold and gold is not None and not agrees_with_gold(parsed.label, gold):
            reasons["disagrees_with_gold"] += 1
            out.dropped.append({**base, "reason": "disagrees_with_gold",
                                "rationale": parsed.rationale, "label": parsed.label})
        else:
            out.rows.append({**base, "rationale": parsed.rationale, "label": parsed.label})
    unparsed = {k: v for k, v in reasons.items()
                if k not in ("request_failed", "disagrees_with_gold")}
    out.stats = {
        "examples": len(records), "kept": len(out.rows),
        "failed_requests": reasons["request_failed"],
        "unparsed": sum(unparsed.values()), "unparsed_by_reason": dict(sorted(unparsed.items())),
        "disagrees_with_gold": reasons["disagrees_with_gold"], "filter_gold": filter_gold,
        "with_gold": with_gold,
        "teacher_accuracy": correct / with_gold if with_gold else None,
    }
    return out


def _from_data(records: Sequence[Mapping[str, Any]]) -> Extraction:
    """`source: data`: the records' own rationales and labels, all kept."""
    rows = [{"index": i, "input": str(r["input"]), "rationale": str(r["rationale"]),
             "label": str(r["label"]), "raw": None, "gold": str(r["label"])}
            for i, r in enumerate(records)]
    return Extraction(rows, [], {"examples": len(records), "kept": len(rows), "source": "data"})


def _require(records: Sequence[Mapping[str, Any]], fields: tuple[str, ...], data: str) -> None:
    for name in fields:
        if any(name not in r for r in records):
            have = ", ".join(sorted(records[0])) if records else "none"
            raise ValueError(f"the rationales node needs `{name}` in every record of data "
                             f"`{data}` (fields: {have}); map it with the source's `fields:`")


def _read_partial(path: Path) -> dict[int, dict[str, Any]]:
    """Finished chunks of an earlier run (a line torn by a kill is skipped)."""
    chunks: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return chunks
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            chunks[int(row["chunk"])] = row
        except (ValueError, KeyError, TypeError):
            continue
    return chunks


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


def prompt_budget(hf_config: Mapping[str, Any], max_new_tokens: int) -> int | None:
    """Prompt tokens that fit beside the generation in the teacher's context (None: unknown)."""
    limit = hf_config.get("max_position_embeddings")
    if limit is None:
        return None
    if limit <= max_new_tokens:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"teacher's {limit}-token context")
    return int(limit) - max_new_tokens


def generate_answers(model: LoadedModel, tokenizer: JaxTokenizer, prompts: Sequence[str], *,
                     max_new_tokens: int, partial: Path, batch_size: int = GENERATION_BATCH,
                     progress: Callable[[int, int], None] = lambda done, total: None,
                     ) -> list[str]:
    """The teacher's greedy continuation of every prompt, in order (module doc for chunks and
    resume)."""
    lengths = [len(ids) for ids in tokenizer.encode(list(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    done = _read_partial(partial)
    texts: list[str] = [""] * len(prompts)
    budget = prompt_budget(model.hf_config, max_new_tokens)
    for c, chunk in enumerate(chunks):
        row = done.get(c)
        if row is None or row["index"] != chunk:
            out = generate_text(model.params, model.config, tokenizer,
                                [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                                batch_size=batch_size, max_prompt_tokens=budget)
            row = {"chunk": c, "index": chunk, "text": out}
            _append(partial, row)
        for i, text in zip(row["index"], row["text"], strict=True):
            texts[i] = text
        progress(sum(len(ch) for ch in chunks[: c + 1]), len(prompts))
    return texts


def _ask_local(ctx: NodeContext, fewshot: FewShot, inputs: list[str]) -> list[str]:
    ref = ctx.node.config["teacher"]
    tokenizer = model_tokenizer(ctx, ref, "teacher")
    model = load_model(ref, ctx=ctx, role="teacher", tokenizer=tokenizer, trainable=False)

    def progress(done: int, total: int) -> None:
        ctx.emit(Event("progress", ctx.node.id, step=done, total=total, unit="example"))

    generation = ctx.node.config["rationales"]["generation"]
    return generate_answers(model, tokenizer, [fewshot.render(t) for t in inputs],
                            max_new_tokens=int(generation["max_new_tokens"]),
                            partial=ctx.node_dir / PARTIAL, progress=progress)


def _write(ctx: NodeContext, result: Extraction) -> None:
    def jsonl(rows: list[dict[str, Any]]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    atomic_write_text(ctx.node_dir / DROPPED, jsonl(result.dropped))
    atomic_write_json(ctx.node_dir / STATS, result.stats)
    atomic_write_text(ctx.node_dir / ARTIFACT, jsonl(result.rows))  # last: marks the node done


def _summary(stats: Mapping[str, Any]) -> str:
    text = f"kept {stats['kept']} of {stats['examples']} examples"
    if stats.get("source") == "data":
        return text + " (the data's own rationales)"
    text += (f"; unparsed {stats['unparsed']}, disagreeing with gold "
             f"{stats['disagrees_with_gold']}, failed requests {stats['failed_requests']}")
    if stats.get("teacher_accuracy") is not None:
        text += f"; teacher accuracy {stats['teacher_accuracy']:.3f}"
    return text


def run_rationales_node(ctx: NodeContext) -> None:
    """Generate, parse, filter and write the rationales (module doc)."""
    config = ctx.node.config
    reason = unsupported_reason(config)
    if reason is not None:
        raise NotImplementedError(f"the jax backend cannot run `{ctx.node.id}`: {reason}")
    rationales = config["rationales"]
    records = read_records(config["data"], seed=config["seed"], spec_dir=ctx.spec_dir)
    data_name = config["data"]["name"]
    started = time.perf_counter()
    if rationales["source"] == "data":
        _require(records, ("input", "rationale", "label"), data_name)
        result = _from_data(records)
    else:
        _require(records, ("input",), data_name)
        fewshot = FewShot.from_config(rationales, ctx.spec_dir)
        fewshot.check_demonstrations()
        inputs = [str(r["input"]) for r in records]
        ctx.emit(Event("start", ctx.node.id, total=len(inputs), unit="example"))
        raws = _ask_local(ctx, fewshot, inputs)
        result = extract(records, raws, fewshot, filter_gold=rationales["filter_gold"])
    result.stats["seconds"] = round(time.perf_counter() - started, 3)
    _write(ctx, result)
    ctx.emit(Event("message", ctx.node.id, message=_summary(result.stats)))
    if not result.rows:
        raise ValueError(f"no rationale survived ({_summary(result.stats)}); see "
                         f"{ctx.node_dir / DROPPED} for the teacher's texts")


def read_rationales(ctx: NodeContext) -> list[dict[str, Any]]:
    """The rows of the `rationales` node this node takes as input (`inputs["rationales"]`)."""
    folder = ctx.input_dir("rationales")
    if folder is None:
        raise KeyError(f"node `{ctx.node.id}` has no `rationales` input")
    path = folder / ARTIFACT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `{ctx.node.inputs['rationales']}` "
                                "first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
