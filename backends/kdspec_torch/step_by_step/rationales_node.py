"""The `rationales` node: the teacher writes a rationale and a label for every training record.

Writes into the node folder:

* ``rationales.jsonl``: one line per kept example, ``{"index", "input", "rationale", "label",
  "raw", "gold"}`` (``index`` is the record's position in the data source, ``raw`` the teacher's
  whole text, ``gold`` the data's label or null);
* ``dropped.jsonl``: the examples left out, with ``raw`` and the ``reason`` (a failed request,
  a parse failure, or ``disagrees_with_gold``);
* ``stats.json``: ``examples``, ``kept``, ``failed_requests``, ``unparsed`` (and per reason),
  ``disagrees_with_gold``, ``with_gold`` and ``teacher_accuracy`` (the fraction of records with
  a gold label whose answer, read as the eval stage reads it, matches it; failed requests and
  texts without an answer count as wrong), plus the HTTP call totals for an HTTP teacher.

Teachers: a local causal LM (`local_teacher`), an OpenAI-compatible endpoint (`http_teacher`,
its response cache in ``http_cache/``), or none (`source: data`: the data's own rationales are
copied, nothing is filtered).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json, atomic_write_text

from ..batches import read_records
from ..generate import Sampling
from ..runtime import derive_seed, device, make_deterministic
from .http_teacher import CallStats, HTTPTeacherClient
from .prompts import FewShot, agrees_with_gold

__all__ = ["ARTIFACT", "Extraction", "extract", "read_rationales", "run_rationales_node"]

ARTIFACT = "rationales.jsonl"
DROPPED = "dropped.jsonl"
STATS = "stats.json"
PARTIAL = "generations.partial.jsonl"
HTTP_CACHE = "http_cache"
GENERATION_BATCH = 16  # prompts per local generation batch (the planner's estimate assumes 16)


@dataclass
class Extraction:
    """Kept rows, dropped rows and the counts of `stats.json`."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def extract(records: Sequence[Mapping[str, Any]], raws: Sequence[str | None], fewshot: FewShot,
            *, filter_gold: bool) -> Extraction:
    """Parse every teacher text (None: its request failed) and apply the gold filter."""
    out = Extraction()
    reasons: Counter[str] = Counter()
    with_gold = correct = 0
    for index, (record, raw) in enumerate(zip(records, raws, strict=True)):
        gold = record.get("label")
        gold = None if gold is None else str(gold)
        base = {"index": index, "input": str(record["input"]), "raw": raw, "gold": gold}
        parsed = fewshot.parse(raw) if raw is not None else None
        agrees = parsed is not None and parsed.ok and gold is not None and \
            agrees_with_gold(parsed.label, gold)
        # Accuracy reads the label as evaluation does, whether or not a rationale came with it.
        with_gold += gold is not None
        correct += raw is not None and gold is not None and \
            agrees_with_gold(fewshot.prediction(raw), gold)
        if parsed is None or not parsed.ok:
            reason = "request_failed" if parsed is None else parsed.failure
            reasons[reason] += 1
            out.dropped.append({**base, "reason": reason})
        elif filter_gold and gold is not None and not agrees:
            reasons["disagrees_with_gold"] += 1
            out.dropped.append({**base, "reason": "disagrees_with_gold",
                                "rationale": parsed.rationale, "label": parsed.label})
        else:
            out.rows.append({**base, "rationale": parsed.rationale, "label": parsed.label})
    unparsed = {k: v for k, v in reasons.items() if k not in ("request_failed",
                                                              "disagrees_with_gold")}
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
    stats = {"examples": len(records), "kept": len(rows), "source": "data"}
    return Extraction(rows, [], stats)


def _require(records: Sequence[Mapping[str, Any]], fields: tuple[str, ...], data: str) -> None:
    for name in fields:
        if any(name not in r for r in records):
            have = ", ".join(sorted(records[0])) if records else "none"
            raise ValueError(f"the rationales node needs `{name}` in every record of data "
                             f"`{data}` (fields: {have}); map it with the source's `fields:`")


def _api_key(http: Mapping[str, Any]) -> str | None:
    name = http.get("api_key_env")
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise RuntimeError(f"the environment variable {name} (rationales.http.api_key_env) "
                           "is not set; export the teacher's API key in it")
    return key


def _ask_http(ctx: NodeContext, fewshot: FewShot, inputs: list[str]
              ) -> tuple[list[str | None], dict[str, Any]]:
    config = ctx.node.config
    http, gen = config["rationales"]["http"], config["rationales"]["generation"]
    client = HTTPTeacherClient(
        base_url=http["base_url"], model=http["model"], api_key=_api_key(http),
        cache_dir=ctx.node_dir / HTTP_CACHE, max_concurrency=http["max_concurrency"],
        timeout_s=http["timeout_s"], max_retries=http["max_retries"], seed=config["seed"])
    stop = [fewshot.stop] if fewshot.stop else []
    bodies = [client.body(fewshot.messages(text), max_tokens=gen["max_new_tokens"],
                          temperature=gen["temperature"], top_p=gen["top_p"],
                          top_k=gen["top_k"], stop=stop,
                          seed=derive_seed(config["seed"], "rationales", i) % 2**31)
              for i, text in enumerate(inputs)]
    lock = threading.Lock()

    def progress(stats: CallStats) -> None:
        with lock:  # replies arrive on worker threads; events go out one at a time
            ctx.emit(Event("progress", ctx.node.id, step=stats.done, total=stats.total,
                           unit="call", values={"cached": stats.cached, "failed": stats.failed,
                                                "prompt_tokens": stats.prompt_tokens,
                                                "completion_tokens": stats.completion_tokens}))

    replies, stats = client.complete(bodies, progress)
    transient = sum(r.transient for r in replies)
    if transient:
        # Everything answered is cached: a rerun pays only for these.
        first = next(r.error for r in replies if r.transient)
        raise RuntimeError(f"{transient} of {len(replies)} teacher requests still failed after "
                           f"{http['max_retries']} retries (first: {first}); rerun to retry "
                           "them, the answered ones are cached")
    return [r.text for r in replies], {"http": stats.as_dict()}


def _ask_local(ctx: NodeContext, fewshot: FewShot, inputs: list[str]
               ) -> tuple[list[str | None], dict[str, Any]]:
    from .local_teacher import generate_answers, load_teacher

    config = ctx.node.config
    model, tokenizer = load_teacher(ctx, device())
    sampling = Sampling.from_config(config["rationales"]["generation"])

    def progress(done: int, total: int) -> None:
        ctx.emit(Event("progress", ctx.node.id, step=done, total=total, unit="example"))

    texts = generate_answers(model, tokenizer, [fewshot.render(t) for t in inputs], sampling,
                             seed=config["seed"], batch_size=GENERATION_BATCH,
                             partial=ctx.node_dir / PARTIAL, progress=progress)
    return list(texts), {}


def _write(ctx: NodeContext, result: Extraction) -> None:
    def jsonl(rows: list[dict[str, Any]]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    atomic_write_text(ctx.node_dir / DROPPED, jsonl(result.dropped))
    atomic_write_json(ctx.node_dir / STATS, result.stats)
    atomic_write_text(ctx.node_dir / ARTIFACT, jsonl(result.rows))


def run_rationales_node(ctx: NodeContext) -> None:
    """Generate, parse, filter and write the rationales (module doc)."""
    config = ctx.node.config
    rationales = config["rationales"]
    records = read_records(config["data"], seed=config["seed"], spec_dir=ctx.spec_dir)
    data_name = config["data"]["name"]
    started = time.perf_counter()
    if rationales["source"] == "data":
        _require(records, ("input", "rationale", "label"), data_name)
        result = _from_data(records)
    else:
        _require(records, ("input",), data_name)
        make_deterministic()
        fewshot = FewShot.from_config(rationales, ctx.spec_dir)
        fewshot.check_demonstrations()
        inputs = [str(r["input"]) for r in records]
        ctx.emit(Event("start", ctx.node.id, total=len(inputs),
                       unit="call" if rationales["http"] else "example"))
        ask = _ask_http if rationales["http"] else _ask_local
        raws, extra = ask(ctx, fewshot, inputs)
        result = extract(records, raws, fewshot, filter_gold=rationales["filter_gold"])
        result.stats.update(extra)
    result.stats["seconds"] = round(time.perf_counter() - started, 3)
    _write(ctx, result)
    ctx.emit(Event("message", ctx.node.id, message=_summary(result.stats)))
    if not result.rows:
        raise ValueError(f"no rationale survived ({_summary(result.stats)}); see "
                         f"{ctx.node_dir / DROPPED} for the teacher's texts")


def _summary(stats: Mapping[str, Any]) -> str:
    text = f"kept {stats['kept']} of {stats['examples']} examples"
    if stats.get("source") == "data":
        return text + " (the data's own rationales)"
    text += (f"; unparsed {stats['unparsed']}, disagreeing with gold "
             f"{stats['disagrees_with_gold']}, failed requests {stats['failed_requests']}")
    if stats.get("teacher_accuracy") is not None:
        text += f"; teacher accuracy {stats['teacher_accuracy']:.3f}"
    return text


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
