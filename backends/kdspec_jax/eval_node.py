"""The `eval` node on JAX: every model × dataset × metric, written to ``<node>/eval.json``.

The torch backend's definitions and files (``kdspec_torch.eval_node``), so the report reads
both the same way:

* ``perplexity = exp(Σ NLL / N)``: the exponential of the mean negative log-likelihood (natural
  log) per predicted token, pooled over the dataset. Records with ``text`` are packed as
  pre-training packs them (each document followed by eos, cut into blocks of ``seq_len + 1``,
  the short tail dropped; a block's first ``seq_len`` tokens predict its last ``seq_len``).
  Prompt/response records are laid out as SFT lays them out (``[bos] + prompt + response +
  [eos]`` cut to ``seq_len + 1``), and only the response tokens and the eos count.
* ``rouge_l``: greedy generation (at most ``max_new_tokens``, KV cache,
  ``kdspec_jax.generate``) from ``[bos] + prompt`` against ``response``: the mean ROUGE-L
  F-measure (``kdspec.metrics``).
* ``accuracy``: greedy generation from ``prompt`` (or ``input``) against ``label``: the
  fraction of exact matches after ``kdspec.metrics.normalize_answer``.

Prompts are left-truncated to ``seq_len`` tokens. Generations are kept in
``<node>/generations/<model>.<dataset>.<metric>.jsonl``; each result is appended to
``<node>/eval.partial.jsonl`` as soon as it is known, so a resumed node skips finished ones.
``eval.json`` holds ``{"results": [{"model", "dataset", "metric", "value"}]}`` with ``model`` the
name the stage lists (a stage name or a ``models:`` name).

Every forward pass has the shape ``[batch_size, seq_len]`` (a short last batch is filled with
rows that count nothing), so each model compiles its NLL function once.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdspec.metrics import accuracy, rouge_l_corpus
from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json, atomic_write_text
from kdspec.spec.stages.eval import EvalStage

from . import losses
from .data import IGNORE_INDEX, JaxTokenizer, TokenRows, build_token_rows, read_records
from .generate import generate_text
from .model import JaxModelConfig, Params, forward
from .models import LoadedModel, load_model, model_tokenizer

__all__ = ["METRICS", "EvalJob", "Task", "batch_nll", "perplexity", "run_eval"]

PARTIAL = "eval.partial.jsonl"


@dataclass(frozen=True)
class Task:
    """One result to compute: a model (its ref name), a data source and a metric."""

    model: str
    dataset: str
    metric: str


@dataclass
class EvalJob:
    """What every metric needs besides the model and the records. Greedy generations are kept
    per (model, dataset, prompt field), so rouge_l and accuracy on one dataset generate once."""

    stage: EvalStage
    node_dir: Path
    generations: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)


Metric = Callable[[LoadedModel, JaxTokenizer, list[dict[str, Any]], EvalJob, Task], float]


def _require(records: list[dict[str, Any]], fields: tuple[str, ...], task: Task) -> None:
    missing = [f for f in fields if any(f not in r for r in records)]
    if missing:
        have = ", ".join(sorted(records[0])) if records else "none"
        raise ValueError(
            f"`{task.metric}` on data `{task.dataset}` needs the field(s) "
            f"{', '.join(missing)} in every record (fields: {have}); map them with the data "
            "source's `fields:` or choose another metric")


@functools.partial(jax.jit, static_argnums=(1,))
def batch_nll(params: Params, config: JaxModelConfig, batch: dict[str, jax.Array]) -> jax.Array:
    """``Σ −log q(y_t)`` over the batch's counted positions (``labels != -100``), fp32."""
    logits = forward(params, config, batch["input_ids"], batch.get("attention_mask"))
    terms = losses.cross_entropy_terms(logits, batch["labels"])
    return jnp.sum(jnp.where(batch["labels"] != IGNORE_INDEX, terms, 0.0))


def _padded_batch(rows: TokenRows, index: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Rows ``index`` as a batch of ``size`` rows; filler rows repeat row ``index[0]`` with
    every label ignored, so they add nothing to the sums."""
    filled = np.concatenate([index, np.full(size - len(index), index[0])])
    batch = rows.batch(filled)
    batch["labels"][len(index):] = IGNORE_INDEX
    return batch


def sequence_nll(model: LoadedModel, rows: TokenRows, batch_size: int) -> tuple[float, int]:
    """``(Σ NLL, N)`` over every counted position of ``rows``, ``batch_size`` rows a pass."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, min(start + batch_size, len(rows)))
        batch = _padded_batch(rows, index, batch_size)
        total += float(batch_nll(model.params, model.config, batch))
        count += int(np.sum(batch["labels"] != IGNORE_INDEX))
    return total, count


def perplexity(model: LoadedModel, tokenizer: JaxTokenizer, records: list[dict[str, Any]],
               job: EvalJob, task: Task) -> float:
    """``exp(Σ NLL / N)`` over the predicted tokens (module doc for the layout)."""
    if records and all("text" in r for r in records):
        layout = "packed"
    else:
        _require(records, ("prompt", "response"), task)
        layout = "pairs"
    try:
        rows = build_token_rows(layout, records, tokenizer, job.stage.seq_len)
    except ValueError as err:
        raise ValueError(f"perplexity on data `{task.dataset}`: {err}") from err
    total, count = sequence_nll(model, rows, job.stage.batch_size)
    return math.exp(total / count)


def _generate(model: LoadedModel, tokenizer: JaxTokenizer, records: list[dict[str, Any]],
              job: EvalJob, task: Task, key: str) -> list[str]:
    """Greedy generations from each record's `key` field (cached per model and dataset)."""
    cache_key = (task.model, task.dataset, key)
    if cache_key not in job.generations:
        job.generations[cache_key] = generate_text(
            model.params, model.config, tokenizer, [str(r[key]) for r in records],
            max_new_tokens=job.stage.max_new_tokens, batch_size=job.stage.batch_size,
            max_prompt_tokens=job.stage.seq_len)
    return job.generations[cache_key]


def _save_generations(job: EvalJob, task: Task, records: list[dict[str, Any]], key: str,
                      gold: str, predictions: list[str]) -> None:
    lines = [json.dumps({"prompt": r[key], "reference": r[gold], "prediction": y},
                        ensure_ascii=False) for r, y in zip(records, predictions, strict=True)]
    path = job.node_dir / "generations" / f"{task.model}.{task.dataset}.{task.metric}.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")


def rouge_l_metric(model: LoadedModel, tokenizer: JaxTokenizer, records: list[dict[str, Any]],
                   job: EvalJob, task: Task) -> float:
    """Mean ROUGE-L F of greedy generations from `prompt` against `response`."""
    _require(records, ("prompt", "response"), task)
    predictions = _generate(model, tokenizer, records, job, task, "prompt")
    _save_generations(job, task, records, "prompt", "response", predictions)
    return rouge_l_corpus(predictions, [str(r["response"]) for r in records])


def accuracy_metric(model: LoadedModel, tokenizer: JaxTokenizer, records: list[dict[str, Any]],
                    job: EvalJob, task: Task) -> float:
    """Exact-match accuracy of greedy generations from `prompt` (or `input`) against `label`."""
    key = "prompt" if records and all("prompt" in r for r in records) else "input"
    _require(records, (key, "label"), task)
    predictions = _generate(model, tokenizer, records, job, task, key)
    _save_generations(job, task, records, key, "label", predictions)
    return accuracy(predictions, [str(r["label"]) for r in records])


METRICS: dict[str, Metric] = {
    "perplexity": perplexity,
    "rouge_l": rouge_l_metric,
    "accuracy": accuracy_metric,
}


def _records(ctx: NodeContext, data: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
    records = read_records(data, seed=ctx.node.config["seed"], spec_dir=ctx.spec_dir)
    return records[:limit] if limit is not None else records


def _read_partial(node_dir: Path) -> dict[Task, float]:
    """Results of an interrupted attempt (a torn last line is skipped)."""
    found: dict[Task, float] = {}
    try:
        lines = (node_dir / PARTIAL).read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            row = json.loads(line)
            found[Task(row["model"], row["dataset"], row["metric"])] = float(row["value"])
        except (ValueError, KeyError, TypeError):
            continue
    return found


def _append_partial(node_dir: Path, task: Task, value: float) -> None:
    node_dir.mkdir(parents=True, exist_ok=True)
    with open(node_dir / PARTIAL, "a") as handle:
        handle.write(json.dumps({**asdict(task), "value": value}) + "\n")


def run_eval(ctx: NodeContext) -> None:
    """Evaluate every model of the node on every dataset with every metric; write eval.json."""
    config = ctx.node.config
    stage = EvalStage.model_validate(config["stage"])
    job = EvalJob(stage, ctx.node_dir)
    records = {name: _records(ctx, data, stage.max_examples)
               for name, data in config["data"].items()}
    tasks = [Task(ref, name, metric) for ref in config["models"] for name in records
             for metric in stage.metrics]
    values = _read_partial(ctx.node_dir)
    node = ctx.node.id
    ctx.emit(Event("start", node, step=sum(t in values for t in tasks), total=len(tasks),
                   unit="metric"))
    for ref, resolved in config["models"].items():
        todo = [t for t in tasks if t.model == ref and t not in values]
        if not todo:
            continue
        role = f"model:{ref}"
        tokenizer = model_tokenizer(ctx, resolved, role)
        model = load_model(resolved, ctx=ctx, role=role, tokenizer=tokenizer, trainable=False)
        for task in todo:
            values[task] = value = METRICS[task.metric](model, tokenizer, records[task.dataset],
                                                        job, task)
            _append_partial(ctx.node_dir, task, value)
            ctx.emit(Event("progress", node, step=sum(t in values for t in tasks),
                           total=len(tasks), values={task.metric: value}, unit="metric"))
            ctx.emit(Event("message", node,
                           message=f"{ref} on {task.dataset}: {task.metric} = {value:.4g}"))
    results = [{**asdict(task), "value": values[task]} for task in tasks]
    atomic_write_json(ctx.node_dir / "eval.json", {"results": results})
