"""The JAX backend's `rationales` node and `step_by_step` objective: extraction against the torch
node's rules, the multitask loss against a hand computation and transformers, and a tiny
teacher → rationales → student run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdspec_jax.data import IGNORE_INDEX, load_tokenizer
from kdspec_jax.model import JaxModelConfig, forward, init_params
from kdspec_jax.rationales_node import extract, unsupported_reason
from kdspec_jax.step_by_step import (
    build_task_rows,
    step_by_step_objective,
    task_weights,
)
from kdspec_torch.step_by_step.prompts import FewShot

FEWSHOT = FewShot("Q: {input}\nA:", answer_format=" {rationale} The answer is {label}.")
RECORDS = [{"input": "a", "label": "5"}, {"input": "b", "label": "7"},
           {"input": "c", "label": "1"}, {"input": "d"}, {"input": "e", "label": "2"}]
RAWS = ["Two and three make 5. The answer is 5.\n\nQ: next", "So 8. The answer is 8.",
        "no answer here", "Easy. The answer is 4.", None]


def test_extract_keeps_parses_and_filters_like_the_torch_node() -> None:
    out = extract(RECORDS, RAWS, FEWSHOT, filter_gold=True)
    assert [r["index"] for r in out.rows] == [0, 3]  # 3 has no gold: kept unfiltered
    assert out.rows[0]["rationale"] == "Two and three make 5." and out.rows[0]["label"] == "5"
    assert [(d["index"], d["reason"]) for d in out.dropped] == [
        (1, "disagrees_with_gold"), (2, "no_answer"), (4, "request_failed")]
    assert out.stats["teacher_accuracy"] == pytest.approx(1 / 4)  # 4 records carry gold
    assert out.stats["unparsed"] == 1 and out.stats["failed_requests"] == 1
    unfiltered = extract(RECORDS, RAWS, FEWSHOT, filter_gold=False)
    assert [r["index"] for r in unfiltered.rows] == [0, 1, 3]


def test_extract_writes_what_the_torch_node_writes() -> None:
    torch_node = pytest.importorskip("kdspec_torch.step_by_step.rationales_node")
    for filter_gold in (True, False):
        ours = extract(RECORDS, RAWS, FEWSHOT, filter_gold=filter_gold)
        theirs = torch_node.extract(RECORDS, RAWS, FEWSHOT, filter_gold=filter_gold)
        assert json.dumps(ours.rows) == json.dumps(theirs.rows)  # same keys, same order
        assert json.dumps(ours.dropped) == json.dumps(theirs.dropped)
        assert ours.stats == theirs.stats


def test_http_and_sampled_teachers_are_refused_by_name() -> None:
    base = {"source": "teacher", "http": None, "generation": {"temperature": 0.0}}
    assert unsupported_reason({"rationales": base}) is None
    assert "HTTP" in unsupported_reason({"rationales": {**base, "http": {"base_url": "x"}}})
    sampled = {**base, "generation": {"temperature": 0.7}}
    assert "temperature" in unsupported_reason({"rationales": sampled})
    assert unsupported_reason({"rationales": {**base, "source": "data"}}) is None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tokenizer("builtin:words", spec_dir=Path("."),
                          work_dir=tmp_path_factory.mktemp("tok"))


PAIRS = [
    {"predict": ("predict: one plus two", "3"), "explain": ("explain: one plus two",
                                                           "one and two is three")},
    {"predict": ("predict: " + "very long " * 20, "1"), "explain": ("explain: x", "y")},
    {"predict": ("predict: two", "2"), "explain": ("explain: two", "it is two")},
]


def test_task_rows_drop_an_example_from_every_task_and_sit_side_by_side(tokenizer: Any) -> None:
    rows, dropped = build_task_rows(PAIRS, tokenizer, seq_len=12)
    assert dropped == 1 and len(rows) == 2 and rows.names == ("predict", "explain")
    batch = rows.batch(np.array([1, 0]))
    assert batch["input_ids"].shape == (2, 24) and batch["labels"].shape == (2, 24)
    # Row 1 of the data is PAIRS[2]; its predict half ends with target "2" then eos.
    predict_targets = batch["labels"][0, :12][batch["labels"][0, :12] != IGNORE_INDEX]
    assert predict_targets.tolist() == [*tokenizer.encode(["2"])[0], tokenizer.eos_id]


def _log_softmax_ce(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Sum of −log softmax at the labels over the counted positions, and their count."""
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    mask = labels != IGNORE_INDEX
    picked = np.take_along_axis(logp, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    return float(-(picked * mask).sum()), int(mask.sum())


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
def test_multitask_loss_is_alpha_label_ce_plus_rest_rationale_ce(tokenizer: Any,
                                                                  alpha: float) -> None:
    rows, _ = build_task_rows(PAIRS, tokenizer, seq_len=12)
    config = JaxModelConfig.from_hf({"model_type": "llama", "vocab_size": len(tokenizer),
                                     "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "num_key_value_heads": 1, "max_position_embeddings": 32})
    params = init_params(config, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in rows.batch(np.array([0, 1])).items()}
    weights = task_weights("multitask", alpha)
    objective = step_by_step_objective(config, rows.names, weights, rows.seq_len)
    total, parts = objective(params, batch, None)
    expected, n_all = 0.0, 0
    for k, name in enumerate(rows.names):
        cols = slice(12 * k, 12 * (k + 1))
        logits = np.asarray(forward(params, config, batch["input_ids"][:, cols],
                                    batch["attention_mask"][:, cols]))
        ce_sum, n = _log_softmax_ce(logits, np.asarray(batch["labels"][:, cols]))
        expected += weights[name] * ce_sum / n
        n_all += n
    # The step divides by the step's target count; the objective returns n_mb·L.
    assert float(total) / n_all == pytest.approx(expected, rel=1e-5)
    assert ("rationale_ce" in parts) == (alpha < 1.0)
    assert float(parts["label_ce"]) / n_all > 0


def test_multitask_loss_matches_transformers(tokenizer: Any, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kdspec_jax.weights import save_hf

    rows, _ = build_task_rows(PAIRS, tokenizer, seq_len=12)
    config = JaxModelConfig.from_hf({"model_type": "llama", "vocab_size": len(tokenizer),
                                     "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 2, "num_attention_heads": 2,
                                     "num_key_value_heads": 1, "max_position_embeddings": 32})
    params = init_params(config, jax.random.key(1))
    save_hf(params, config, tmp_path / "m")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", dtype=torch.float32, attn_implementation="eager").eval()
    batch = rows.batch(np.array([0, 1]))
    objective = step_by_step_objective(config, rows.names, task_weights("multitask", 0.3), 12)
    total, _ = objective(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    losses = []
    for k in range(2):
        cols = slice(12 * k, 12 * (k + 1))
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(batch["input_ids"][:, cols]).long(),
                           attention_mask=torch.as_tensor(batch["attention_mask"][:, cols])
                           ).logits
        labels = torch.as_tensor(batch["labels"][:, cols]).long()
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                        ignore_index=IGNORE_INDEX))
    reference = 0.3 * losses[0] + 0.7 * losses[1]
    n_all = int((batch["labels"] != IGNORE_INDEX).sum())
    assert float(total) / n_all == pytest.approx(float(reference), rel=1e-4)


# ---- a tiny spec: a teacher on gold rationales, its rationales, a multitask student ---------

def _spec(tmp_path: Path, **student_fields: Any) -> Any:
    from kdspec.plan.planner import build_plan
    from kdspec.spec import Spec

    arch = {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
            "d_ff": 64, "max_seq_len": 96}
    common = {"steps": 4, "batch_size": 8, "seq_len": 40, "log_every": 2,
              "checkpoint_every": 2, "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 1}}
    spec = Spec.model_validate({
        "kdspec": 1, "name": "sbs", "seed": 0, "tokenizer": "builtin:words",
        "models": {"big": {"arch": arch}, "small": {"arch": arch}},
        "data": {"arith": {"source": "builtin:arithmetic", "n": 24}},
        "stages": [
            {"name": "teacher", "kind": "step_by_step", "student": "big", "data": "arith",
             "variant": "single_task", "rationales": {"source": "data"}, **common},
            {"name": "dss", "kind": "step_by_step", "student": "small", "teacher": "teacher",
             "data": "arith", "rationales": {"template": "Q: {input}", "filter_gold": False,
                                             "generation": {"temperature": 0,
                                                            "max_new_tokens": 12}},
             **common, **student_fields},
        ]})
    plan = build_plan(spec, base_dir=tmp_path, estimate=False)
    assert not plan.errors, plan.errors
    return spec, plan


def _run(spec: Any, plan: Any, tmp_path: Path, node_id: str, events: list[Any]) -> None:
    from kdspec.run.backend import NodeContext
    from kdspec_jax.backend import JaxBackend

    node = plan.node(node_id)
    backend = JaxBackend()
    assert backend.supports(node)
    backend.run_node(NodeContext(node, plan, spec, tmp_path, tmp_path / "run",
                                 tmp_path / "run" / node_id, events.append))


@pytest.mark.slow
def test_a_tiny_teacher_writes_rationales_and_a_student_trains_on_them(tmp_path: Path) -> None:
    from kdspec.run.backend import NodeContext
    from kdspec_jax.generate import generate_text
    from kdspec_jax.models import load_model, model_tokenizer

    spec, plan = _spec(tmp_path)
    events: list[Any] = []
    _run(spec, plan, tmp_path, "teacher.rationales", events)
    run = tmp_path / "run"
    data_rows = [json.loads(x) for x in
                 (run / "teacher.rationales" / "rationales.jsonl").read_text().splitlines()]
    assert len(data_rows) == 24 and data_rows[0]["raw"] is None
    # The student of `dss` trains on the data's rationales (the artifact copied over), so the
    # train node runs whatever the 4-step teacher writes.
    (run / "dss.rationales").mkdir(parents=True)
    (run / "dss.rationales" / "rationales.jsonl").write_text(
        (run / "teacher.rationales" / "rationales.jsonl").read_text())
    _run(spec, plan, tmp_path, "teacher", events)
    _run(spec, plan, tmp_path, "dss", events)
    assert (run / "dss" / "model" / "model.safetensors").is_file()
    metrics = [e.values for e in events if e.kind == "metrics" and e.node == "dss"]
    assert [m["step"] for m in metrics] == [2, 4]
    for m in metrics:  # grad_accum 1: the logged loss is exactly the α-mix of the task CEs
        assert m["loss"] == pytest.approx(0.5 * m["label_ce"] + 0.5 * m["rationale_ce"],
                                          rel=1e-5)

    # The teacher's rationales: a 4-step teacher writes no "The answer is", so every example
    # is dropped as unparsed and the node says so; its texts are the greedy continuations.
    (run / "dss.rationales" / "rationales.jsonl").unlink()
    with pytest.raises(ValueError, match="no rationale survived"):
        _run(spec, plan, tmp_path, "dss.rationales", events)
    stats = json.loads((run / "dss.rationales" / "stats.json").read_text())
    assert stats["examples"] == 24 and stats["kept"] + stats["unparsed"] == 24
    dropped = [json.loads(x) for x in
               (run / "dss.rationales" / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == stats["unparsed"]
    ctx = NodeContext(plan.node("dss.rationales"), plan, spec, tmp_path, run,
                      run / "dss.rationales", events.append)
    ref = ctx.node.config["teacher"]
    tokenizer = model_tokenizer(ctx, ref, "teacher")
    teacher = load_model(ref, ctx=ctx, role="teacher", tokenizer=tokenizer, trainable=False)
    fewshot = FewShot.from_config(ctx.node.config["rationales"], tmp_path)
    sample = [dropped[0], dropped[-1]]
    expected = generate_text(teacher.params, teacher.config, tokenizer,
                             [fewshot.render(d["input"]) for d in sample], max_new_tokens=12,
                             batch_size=16, max_prompt_tokens=96 - 12)
    assert [d["raw"] for d in sample] == expected

    # Resume: drop the newest checkpoint and the model; the rerun ends where the first did.
    import shutil

    (run / "dss.rationales" / "rationales.jsonl").write_text(
        (run / "teacher.rationales" / "rationales.jsonl").read_text())
    first = (run / "dss" / "model" / "model.safetensors").read_bytes()
    checkpoints = sorted((run / "dss" / "checkpoints").iterdir())
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(run / "dss" / "model")
    _run(spec, plan, tmp_path, "dss", events)
    assert (run / "dss" / "model" / "model.safetensors").read_bytes() == first
