"""The JAX eval node: perplexity against transformers' loss and the torch backend's eval, and the
node end to end (a stage's saved model and a `models:` source; perplexity, rouge_l, accuracy;
resume from partial results)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from kdspec.data.hmm import vocabulary
from kdspec.metrics import rouge_tokens
from kdspec.plan.graph import Node, Plan
from kdspec.run.backend import NodeContext
from kdspec.spec.stages.eval import EvalStage
from kdspec_jax.backend import JaxBackend
from kdspec_jax.data import JaxTokenizer, load_tokenizer
from kdspec_jax.eval_node import EvalJob, Task, perplexity
from kdspec_jax.generate import generate_text
from kdspec_jax.model import JaxModelConfig, init_params
from kdspec_jax.models import LoadedModel, save_student

SEQ, NEW = 16, 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> JaxTokenizer:
    return load_tokenizer("builtin:words", spec_dir=folder, work_dir=folder / "tokenizer")


def tiny_model(tokenizer: JaxTokenizer, seed: int) -> LoadedModel:
    """A 2-layer llama with weights spread wide (initializer_range 0.2): greedy steps far from
    ties, so both backends pick the same tokens."""
    hf = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.2,
          **tokenizer.token_ids()}
    config = JaxModelConfig.from_hf(hf)
    return LoadedModel(config, init_params(config, jax.random.key(seed)), hf)


def _sentence(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def text_records(n: int = 12) -> list[dict]:
    rng, words = random.Random(0), vocabulary()[:40]
    return [{"text": _sentence(rng, words, 4, 15)} for _ in range(n)]


def pair_records(n: int = 12) -> list[dict]:
    rng, words = random.Random(1), vocabulary()[:40]
    return [{"prompt": _sentence(rng, words, 2, 6), "response": _sentence(rng, words, 1, 5)}
            for _ in range(n)]


def _job(tmp: Path, **stage: Any) -> EvalJob:
    fields = {"name": "eval", "kind": "eval", "models": ["m"], "data": ["d"], "seq_len": SEQ,
              "batch_size": 3, "max_new_tokens": NEW, **stage}
    return EvalJob(EvalStage.model_validate(fields), tmp)


@pytest.fixture(scope="module")
def saved(folder: Path, tokenizer: JaxTokenizer) -> dict[str, Path]:
    """The two tiny models as HF folders: `student` a stage's output, `base` a source."""
    paths = {"student": folder / "run" / "student" / "model", "base": folder / "spec" / "base"}
    for seed, path in enumerate(paths.values()):
        model = tiny_model(tokenizer, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_student(model, model.params, tokenizer, path)
    return paths


def test_perplexities_match_transformers_and_the_torch_eval(
        saved: dict[str, Path], tokenizer: JaxTokenizer, tmp_path: Path) -> None:
    """Packed text: exp of transformers' own mean loss over the packed blocks. Pairs: the
    torch backend's eval (response tokens and eos only, pooled over tokens), batch sizes 1
    and 5 (a short, filled last batch)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch_eval = pytest.importorskip("kdspec_torch.eval_node")
    from kdspec_jax.weights import load_hf

    config, params = load_hf(saved["student"])
    model = LoadedModel(config, params, {})
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        saved["student"], dtype=torch.float32).eval()
    records = text_records()
    stream = [t for ids in tokenizer.encode([r["text"] for r in records])
              for t in (*ids, tokenizer.eos_id)]
    rows = len(stream) // (SEQ + 1)
    tokens = torch.tensor(stream[: rows * (SEQ + 1)]).view(rows, SEQ + 1)
    with torch.no_grad():
        expected = math.exp(hf_model(input_ids=tokens, labels=tokens).loss.item())
    got = perplexity(model, tokenizer, records, _job(tmp_path), Task("m", "d", "perplexity"))
    assert got == pytest.approx(expected, rel=1e-5)
    assert rows >= 4 and rows % 3  # several batches of 3, the last one short

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(saved["student"])
    pairs = pair_records()
    for batch_size in (1, 5):
        torch_job = torch_eval.EvalJob(_job(tmp_path, batch_size=batch_size).stage,
                                       torch.device("cpu"), None, tmp_path)
        task = torch_eval.Task("m", "d", "perplexity")
        want = torch_eval.perplexity(hf_model, hf_tokenizer, pairs, torch_job, task)
        got = perplexity(model, tokenizer, pairs, _job(tmp_path, batch_size=batch_size),
                         Task("m", "d", "perplexity"))
        assert got == pytest.approx(want, rel=1e-5)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _data(name: str) -> dict:
    return {"name": name, "source": f"jsonl:{name}.jsonl", "split": "train", "n": None,
            "fields": {}}


def _context(spec_dir: Path, run_dir: Path, node_id: str, data: list[str], metrics: list[str],
             events: list) -> NodeContext:
    stage = {"name": node_id, "kind": "eval", "models": ["student", "base"], "data": data,
             "metrics": metrics, "seq_len": SEQ, "batch_size": 4, "max_examples": 10,
             "max_new_tokens": NEW}
    config = {"stage": stage,
              "models": {"student": {"stage": "student"},
                         "base": {"model": "base", "source": "base", "arch": None, "preset": None,
                                  "dtype": "auto", "tokenizer": None}},
              "data": {name: _data(name) for name in data},
              "tokenizer": "builtin:words", "seed": 0}
    node = Node(node_id, "eval", node_id, "eval", config, depends_on=["student"],
                inputs={"model:student": "student"})
    return NodeContext(node, Plan("tiny", [node]), None, spec_dir, run_dir, run_dir / node_id,
                       events.append)


def test_eval_node_end_to_end_and_resume(saved: dict[str, Path], tokenizer: JaxTokenizer,
                                         folder: Path) -> None:
    spec_dir, run_dir = folder / "spec", folder / "run"
    student = tiny_model(tokenizer, 0)
    # Labels are the student's own greedy continuations: its accuracy must be exactly 1.
    records = pair_records(12)
    own = generate_text(student.params, student.config, tokenizer,
                        [r["prompt"] for r in records], max_new_tokens=NEW)
    qa = [{**r, "response": y, "label": y} for r, y in zip(records, own, strict=True)]
    _write_jsonl(spec_dir / "qa.jsonl", qa)
    _write_jsonl(spec_dir / "corpus.jsonl", text_records())

    events: list = []
    metrics = ["perplexity", "rouge_l", "accuracy"]
    backend = JaxBackend()
    backend.run_node(_context(spec_dir, run_dir, "eval", ["qa"], metrics, events))
    backend.run_node(_context(spec_dir, run_dir, "eval_text", ["corpus"], ["perplexity"],
                              events))

    rows = json.loads((run_dir / "eval" / "eval.json").read_text())["results"]
    assert [(r["model"], r["dataset"], r["metric"]) for r in rows] == [
        (m, "qa", metric) for m in ("student", "base") for metric in metrics]
    value = {(r["model"], r["metric"]): r["value"] for r in rows}
    assert value[("student", "accuracy")] == 1.0
    expected_rouge = sum(1.0 if rouge_tokens(y) else 0.0 for y in own[:10]) / 10
    assert value[("student", "rouge_l")] == pytest.approx(expected_rouge)
    assert value[("base", "accuracy")] < 1.0
    assert value[("student", "perplexity")] == pytest.approx(
        perplexity(student, tokenizer, qa[:10], _job(folder, max_examples=10, batch_size=4),
                   Task("student", "qa", "perplexity")), rel=1e-6)
    text_rows = json.loads((run_dir / "eval_text" / "eval.json").read_text())["results"]
    assert [(r["model"], r["dataset"]) for r in text_rows] == [("student", "corpus"),
                                                               ("base", "corpus")]

    generations = (run_dir / "eval" / "generations" / "student.qa.accuracy.jsonl").read_text()
    lines = [json.loads(line) for line in generations.splitlines()]
    assert len(lines) == 10 and all(x["prediction"] == x["reference"] for x in lines)
    starts = [e for e in events if e.kind == "start" and e.node == "eval"]
    assert (starts[0].step, starts[0].total) == (0, 6)
    assert [e.step for e in events if e.kind == "progress" and e.node == "eval"] == [
        1, 2, 3, 4, 5, 6]

    # A rerun after an interruption computes nothing eval.partial.jsonl already holds: with
    # the models gone, only results read back can fill eval.json.
    (run_dir / "eval" / "eval.json").unlink()
    partial = (run_dir / "eval" / "eval.partial.jsonl").read_text().splitlines()
    (run_dir / "eval" / "eval.partial.jsonl").write_text("\n".join(partial) + '\n{"mod')
    for path in saved.values():
        (path / "model.safetensors").rename(path / "moved")
    try:
        again: list = []
        backend.run_node(_context(spec_dir, run_dir, "eval", ["qa"], metrics, again))
    finally:
        for path in saved.values():
            (path / "moved").rename(path / "model.safetensors")
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["results"] == rows
    assert [e.step for e in again if e.kind == "start"] == [6]
    assert np.isfinite([r["value"] for r in rows]).all()
