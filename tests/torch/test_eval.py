"""The eval node: perplexity against HF's own loss, field checks, and a hand-built eval node run
end to end on tiny saved models (a stage's output and a `models:` source), with resume."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kdspec.data.hmm import vocabulary  # noqa: E402
from kdspec.metrics import rouge_tokens  # noqa: E402
from kdspec.plan.graph import Node, Plan  # noqa: E402
from kdspec.run.backend import NodeContext  # noqa: E402
from kdspec.run.results import collect_results  # noqa: E402
from kdspec.spec.stages.eval import EvalStage  # noqa: E402
from kdspec_torch import eval_node  # noqa: E402
from kdspec_torch.eval_node import EvalJob, Task, perplexity, run_eval  # noqa: E402
from kdspec_torch.generate import Sampling, generate_text  # noqa: E402
from kdspec_torch.tokenizer import load_tokenizer  # noqa: E402

SEQ, NEW = 16, 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer("builtin:words", spec_dir=folder, work_dir=folder / "tokenizer")


def tiny_model(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.initializer_range = 0.2  # spread logits: greedy steps far from ties
    return LlamaForCausalLM(config).eval()


def _sentence(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def text_records(n: int = 12) -> list[dict]:
    rng, words = random.Random(0), vocabulary()[:40]
    return [{"text": _sentence(rng, words, 4, 15)} for _ in range(n)]


def pair_records(n: int = 12) -> list[dict]:
    rng, words = random.Random(1), vocabulary()[:40]
    return [{"prompt": _sentence(rng, words, 2, 6), "response": _sentence(rng, words, 1, 5)}
            for _ in range(n)]


def _job(tmp: Path, **stage) -> EvalJob:
    fields = {"name": "eval", "kind": "eval", "models": ["m"], "data": ["d"], "seq_len": SEQ,
              "batch_size": 3, "max_new_tokens": NEW, **stage}
    return EvalJob(EvalStage.model_validate(fields), torch.device("cpu"), None, tmp)


def test_packed_perplexity_is_exp_of_hf_loss(tokenizer, tmp_path):
    model, records = tiny_model(tokenizer, 0), text_records()
    stream = []
    for record in records:
        stream += tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
    rows = len(stream) // (SEQ + 1)
    tokens = torch.tensor(stream[: rows * (SEQ + 1)]).view(rows, SEQ + 1)
    with torch.no_grad():
        expected = math.exp(model(input_ids=tokens, labels=tokens).loss.item())
    got = perplexity(model, tokenizer, records, _job(tmp_path), Task("m", "d", "perplexity"))
    assert got == pytest.approx(expected, rel=1e-5)
    assert rows >= 4  # several batches of 3, the last one short


def test_pair_perplexity_counts_response_and_eos_only(tokenizer, tmp_path):
    model, records = tiny_model(tokenizer, 0), pair_records()
    nll, count = 0.0, 0
    for record in records:
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        head = [tokenizer.bos_token_id, *prompt]
        ids = torch.tensor([head + response + [tokenizer.eos_token_id]])
        labels = torch.tensor([[-100] * len(head) + response + [tokenizer.eos_token_id]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()  # mean over its targets
        nll += loss * (len(response) + 1)
        count += len(response) + 1
    expected = math.exp(nll / count)  # pooled over tokens, not a mean over records
    for batch_size in (1, 5):
        got = perplexity(model, tokenizer, records, _job(tmp_path, batch_size=batch_size),
                         Task("m", "d", "perplexity"))
        assert got == pytest.approx(expected, rel=1e-5)


def test_a_metric_without_its_fields_says_which(tokenizer, tmp_path):
    model = tiny_model(tokenizer, 0)
    with pytest.raises(ValueError, match=r"`rouge_l` on data `d` needs the field\(s\) prompt, "
                                         r"response .*fields: text"):
        eval_node.METRICS["rouge_l"](model, tokenizer, text_records(), _job(tmp_path),
                                     Task("m", "d", "rouge_l"))
    with pytest.raises(ValueError, match=r"needs the field\(s\) input, label"):
        eval_node.METRICS["accuracy"](model, tokenizer, text_records(), _job(tmp_path),
                                      Task("m", "d", "accuracy"))


# ---- the node end to end ------------------------------------------------------------------------

def _save(model, tokenizer, where: Path) -> None:
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)


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


def test_eval_node_end_to_end_and_resume(tokenizer, folder, monkeypatch):
    spec_dir, run_dir = folder / "spec", folder / "run"
    spec_dir.mkdir()
    student, base = tiny_model(tokenizer, 0), tiny_model(tokenizer, 1)
    _save(student, tokenizer, run_dir / "student" / "model")  # a stage's saved output
    _save(base, tokenizer, spec_dir / "base")  # a `models:` entry's source folder

    # Labels are the student's own greedy continuations: its accuracy must be exactly 1.
    records = pair_records(12)
    sampling = Sampling(max_new_tokens=NEW)
    own = generate_text(student, tokenizer, [r["prompt"] for r in records], sampling)
    qa = [{**r, "response": y, "label": y} for r, y in zip(records, own, strict=True)]
    _write_jsonl(spec_dir / "qa.jsonl", qa)
    _write_jsonl(spec_dir / "corpus.jsonl", text_records())

    events: list = []
    metrics = ["perplexity", "rouge_l", "accuracy"]
    run_eval(_context(spec_dir, run_dir, "eval", ["qa"], metrics, events))
    run_eval(_context(spec_dir, run_dir, "eval_text", ["corpus"], ["perplexity"], events))

    rows = json.loads((run_dir / "eval" / "eval.json").read_text())["results"]
    assert [(r["model"], r["dataset"], r["metric"]) for r in rows] == [
        (m, "qa", metric) for m in ("student", "base") for metric in metrics]
    value = {(r["model"], r["metric"]): r["value"] for r in rows}
    assert value[("student", "accuracy")] == 1.0
    expected_rouge = sum(1.0 if rouge_tokens(y) else 0.0 for y in own[:10]) / 10
    assert value[("student", "rouge_l")] == pytest.approx(expected_rouge)
    assert value[("base", "accuracy")] < 1.0
    job = _job(folder, max_examples=10, batch_size=4)
    assert value[("student", "perplexity")] == pytest.approx(
        perplexity(student, tokenizer, qa[:10], job, Task("student", "qa", "perplexity")),
        rel=1e-6)

    # `kdspec report --json` sees both eval nodes.
    reported = {(r["model"], r["dataset"], r["metric"]) for r in collect_results(run_dir)}
    assert ("base", "corpus", "perplexity") in reported and len(reported) == 8

    generations = (run_dir / "eval" / "generations" / "student.qa.accuracy.jsonl").read_text()
    lines = [json.loads(line) for line in generations.splitlines()]
    assert len(lines) == 10 and all(x["prediction"] == x["reference"] for x in lines)

    starts = [e for e in events if e.kind == "start" and e.node == "eval"]
    assert starts[0].total == 6 and starts[0].step == 0
    assert [e.step for e in events if e.kind == "progress" and e.node == "eval"] == [1, 2, 3, 4,
                                                                                    5, 6]

    # A rerun after an interruption computes nothing that eval.partial.jsonl already holds.
    (run_dir / "eval" / "eval.json").unlink()

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a finished result")

    for name in metrics:
        monkeypatch.setitem(eval_node.METRICS, name, boom)
    events.clear()
    run_eval(_context(spec_dir, run_dir, "eval", ["qa"], metrics, events))
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["results"] == rows
    assert [(e.kind, e.step) for e in events] == [("start", 6)]
