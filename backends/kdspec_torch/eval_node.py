"""The `eval` node: every model × dataset × metric, written to ``<node>/eval.json``.

Metrics (each over at most ``max_examples`` records of a data source, in the source's order):

* ``perplexity = exp(Σ NLL / N)``, the exponential of the mean negative log-likelihood per
  predicted token (natural log), pooled over the whole dataset. Records with ``text`` are packed
  exactly as pre-training packs them (`batches.pack_documents`): each document followed by eos,
  concatenated and cut into non-overlapping blocks of ``seq_len + 1`` tokens (a tail shorter
  than a block is dropped); the model reads a block's first ``seq_len`` tokens and predicts its
  last ``seq_len``, so a block's first tokens are predicted with little context (no sliding
  window). Prompt/response records are laid out as SFT lays them out (`batches.pair_rows`,
  ``[bos] + prompt + response + [eos]`` cut to ``seq_len + 1``) and only the response tokens
  and the eos count. Perplexities of models with different tokenizers are not comparable.
* ``rouge_l``: greedy generation (at most ``max_new_tokens``) from ``[bos] + prompt``, stopped at
  eos, against ``response``: mean ROUGE-L F-measure (`kdspec.metrics`).
* ``accuracy``: greedy generation from ``prompt`` (or ``input``) against ``label``: the fraction
  of exact matches after `kdspec.metrics.normalize_answer` (numbers compared as numbers). The
  whole generation is the prediction; nothing is parsed out of it.

Prompts are left-truncated to ``seq_len`` tokens. Generations are kept for inspection in
``<node>/generations/<model>.<dataset>.<metric>.jsonl``. Each result is also appended to
``<node>/eval.partial.jsonl`` as soon as it is known, so a resumed node skips finished ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdspec.metrics import accuracy, rouge_l_corpus
from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.run.rundir import atomic_write_json, atomic_write_text
from kdspec.spec.stages.eval import EvalStage

from .batches import IGNORE_INDEX, build_token_data, read_records
from .generate import Sampling, generate_text
from .models import load_model
from .runtime import autocast, autocast_dtype, device, make_deterministic
from .tokenizer import load_tokenizer

__all__ = ["METRICS", "EvalJob", "Task", "load_eval_model", "perplexity", "run_eval"]

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
    dev: torch.device
    amp: torch.dtype | None
    node_dir: Path
    spec_dir: Path = Path(".")  # demonstrations files in `prompts` resolve against it
    generations: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    def sampling(self) -> Sampling:
        return Sampling(max_new_tokens=self.stage.max_new_tokens, temperature=0.0)


Metric = Callable[[PreTrainedModel, PreTrainedTokenizerBase, list[dict[str, Any]], EvalJob, Task],
                  float]


def _require(records: list[dict[str, Any]], fields: tuple[str, ...], task: Task) -> None:
    missing = [f for f in fields if any(f not in r for r in records)]
    if missing:
        have = ", ".join(sorted(records[0])) if records else "none"
        raise ValueError(
            f"`{task.metric}` on data `{task.dataset}` needs the field(s) "
            f"{', '.join(missing)} in every record (fields: {have}); map them with the data "
            "source's `fields:` or choose another metric")


@torch.no_grad()
def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               records: list[dict[str, Any]], job: EvalJob, task: Task) -> float:
    """``exp(Σ NLL / N)`` over the predicted tokens (module doc for the layout)."""
    if records and all("text" in r for r in records):
        layout = "packed"
    else:
        _require(records, ("prompt", "response"), task)
        layout = "pairs"
    try:
        data = build_token_data(layout, records, tokenizer, job.stage.seq_len)
    except ValueError as err:
        raise ValueError(f"perplexity on data `{task.dataset}`: {err}") from err
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(data), job.stage.batch_size):
        batch = data.batch(torch.arange(start, min(start + job.stage.batch_size, len(data))))
        batch = batch.to(job.dev)
        with autocast(job.amp, job.dev):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total_nll += float(F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
        total_tokens += batch.n_targets
    return math.exp(total_nll / total_tokens)


def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              records: list[dict[str, Any]], job: EvalJob, task: Task, key: str) -> list[str]:
    """Greedy generations from each record's `key` field (cached per model and dataset)."""
    cache_key = (task.model, task.dataset, key)
    if cache_key not in job.generations:
        prompts = [str(r[key]) for r in records]
        with autocast(job.amp, job.dev):
            job.generations[cache_key] = generate_text(
                model, tokenizer, prompts, job.sampling(), batch_size=job.stage.batch_size,
                max_prompt_tokens=job.stage.seq_len)
    return job.generations[cache_key]


def _save_generations(job: EvalJob, task: Task, records: list[dict[str, Any]], key: str,
                      gold: str, predictions: list[str]) -> None:
    lines = [json.dumps({"prompt": r[key], "reference": r[gold], "prediction": y},
                        ensure_ascii=False) for r, y in zip(records, predictions, strict=True)]
    path = job.node_dir / "generations" / f"{task.model}.{task.dataset}.{task.metric}.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")


def rouge_l_metric(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   records: list[dict[str, Any]], job: EvalJob, task: Task) -> float:
    """Mean ROUGE-L F of greedy generations from `prompt` against `response`."""
    _require(records, ("prompt", "response"), task)
    predictions = _generate(model, tokenizer, records, job, task, "prompt")
    _save_generations(job, task, records, "prompt", "response", predictions)
    return rouge_l_corpus(predictions, [str(r["response"]) for r in records])


def prompted_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      records: list[dict[str, Any]], job: EvalJob, task: Task) -> float:
    """Accuracy with the stage's `prompts` entry for this model: each record's `input` in its
    (few-shot) template; the prediction is read with its answer_pattern, if any."""
    from .step_by_step.prompts import FewShot

    _require(records, ("input", "label"), task)
    fewshot = FewShot.from_config(job.stage.prompts[task.model].model_dump(), job.spec_dir)
    key = f"prompt:{task.model}"  # its own generation-cache key
    rendered = [{**r, key: fewshot.render(str(r["input"]))} for r in records]
    texts = _generate(model, tokenizer, rendered, job, task, key)
    _save_generations(job, task, rendered, key, "label", texts)
    return accuracy([fewshot.prediction(t) for t in texts], [str(r["label"]) for r in records])


def accuracy_metric(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    records: list[dict[str, Any]], job: EvalJob, task: Task) -> float:
    """Exact-match accuracy of greedy generations from `prompt` (or `input`) against `label`."""
    if task.model in job.stage.prompts:
        return prompted_accuracy(model, tokenizer, records, job, task)
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


def _tokenizer(ctx: NodeContext, ref: str, resolved: dict[str, Any]) -> PreTrainedTokenizerBase:
    """A stage's model carries its tokenizer; a `models:` entry uses its own `tokenizer` or the
    spec's."""
    if "stage" in resolved:
        folder = ctx.model_dir(f"model:{ref}")
        if folder is None or not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"stage `{resolved['stage']}` has no saved model at {folder}; run it first")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    name = resolved.get("tokenizer") or ctx.node.config["tokenizer"]
    return load_tokenizer(name, spec_dir=ctx.spec_dir, work_dir=ctx.node_dir / "tokenizer")


def load_eval_model(ctx: NodeContext, ref: str, resolved: dict[str, Any],
                    dev: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model a ref names, frozen in eval mode, and its tokenizer."""
    tokenizer = _tokenizer(ctx, ref, resolved)
    model = load_model(resolved, ctx=ctx, role=f"model:{ref}", tokenizer=tokenizer, dev=dev,
                       trainable=False)
    if model.config.is_encoder_decoder:
        raise ValueError(f"`{ref}` is an encoder-decoder model; the eval node evaluates causal "
                         "LMs only")
    return model, tokenizer


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
    """Evaluate every model of the node on every dataset with every metric; write eval.json
    (`{"results": [{"model", "dataset", "metric", "value"}]}`, `model` = the ref's name)."""
    config = ctx.node.config
    stage = EvalStage.model_validate(config["stage"])
    make_deterministic()
    dev = device()
    job = EvalJob(stage, dev, autocast_dtype("auto", dev), ctx.node_dir, ctx.spec_dir)
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
        model, tokenizer = load_eval_model(ctx, ref, resolved, dev)
        for task in todo:
            values[task] = value = METRICS[task.metric](model, tokenizer, records[task.dataset],
                                                        job, task)
            _append_partial(ctx.node_dir, task, value)
            ctx.emit(Event("progress", node, step=sum(t in values for t in tasks),
                           total=len(tasks), values={task.metric: value}, unit="metric"))
            ctx.emit(Event("message", node,
                           message=f"{ref} on {task.dataset}: {task.metric} = {value:.4g}"))
        del model
    results = [{**asdict(task), "value": values[task]} for task in tasks]
    atomic_write_json(ctx.node_dir / "eval.json", {"results": results})
