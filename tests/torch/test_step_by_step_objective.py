"""The step_by_step objective: loss weighting against hand-computed values and against the
transformers models' own losses, the per-task layouts, and decoder-only and T5 students training
on the rationales artifact (multitask, single-task and label-only)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_ARCH, TinyRun  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM  # noqa: E402

from kdspec.plan.planner import build_plan  # noqa: E402
from kdspec.spec import Spec  # noqa: E402
from kdspec.spec.models import ArchConfig  # noqa: E402
from kdspec_torch.batches import EpochSampler, order_seed  # noqa: E402
from kdspec_torch.models import arch_config, load_model  # noqa: E402
from kdspec_torch.objectives.base import Setup  # noqa: E402
from kdspec_torch.runtime import derive_seed  # noqa: E402
from kdspec_torch.step_by_step import objective as sbs  # noqa: E402
from kdspec_torch.step_by_step.rationales_node import (  # noqa: E402
    read_rationales,
    run_rationales_node,
)
from kdspec_torch.tokenizer import load_tokenizer  # noqa: E402
from kdspec_torch.trainer import TrainJob, train  # noqa: E402

T5_ARCH = {"family": "t5", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
           "max_seq_len": 64}
SEQ = 64


# ---- the formula -------------------------------------------------------------------------------

def test_task_weights_and_weighted_loss_by_hand() -> None:
    assert sbs.task_weights("multitask", 0.3) == {"predict": 0.3, "explain": pytest.approx(0.7)}
    assert sbs.task_weights("single_task", 0.3) == {"single": 1.0}
    assert sbs.task_weights("label_only", 0.5) == {"label": 1.0}
    losses = {"predict": torch.tensor(2.0), "explain": torch.tensor(4.0)}
    got = sbs.weighted_task_loss(losses, sbs.task_weights("multitask", 0.3))
    assert float(got) == pytest.approx(0.3 * 2.0 + 0.7 * 4.0)  # 3.4


class _FixedLogits(torch.nn.Module):
    """A 'causal LM' returning the logits it was given, whatever the input."""

    def __init__(self, logits: dict[int, torch.Tensor]):
        super().__init__()
        self.by_width = logits
        self.config = SimpleNamespace(is_encoder_decoder=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.by_width[input_ids.shape[1]])


def test_loss_counts_target_tokens_only_by_hand() -> None:
    """predict: one target whose probability is 2/(1+2+1) = 1/2 -> CE = ln 2; explain: two
    targets under uniform logits over 3 tokens -> CE = ln 3. Prompt positions carry huge logits
    for the wrong token and must not count. α = 0.25: L = 0.25·ln 2 + 0.75·ln 3."""
    ln2 = math.log(2.0)
    predict_logits = torch.tensor([[[50.0, -50, -50], [0, ln2, 0]]])  # [1, 2, 3]
    explain_logits = torch.tensor([[[50.0, -50, -50], [0, 0, 0], [0, 0, 0]]])  # [1, 3, 3]
    model = _FixedLogits({2: predict_logits, 3: explain_logits})
    ignore = -100
    batch = sbs.TaskBatch({
        "predict": sbs.Batch(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[ignore, 1]]),
                             None, torch.tensor([0])),
        "explain": sbs.Batch(torch.zeros(1, 3, dtype=torch.long),
                             torch.tensor([[ignore, 2, 0]]), None, torch.tensor([0])),
    }, torch.tensor([0]))
    loss, terms = sbs.StepByStepLoss(sbs.task_weights("multitask", 0.25)).loss(model, batch)
    assert float(loss) == pytest.approx(0.25 * ln2 + 0.75 * math.log(3.0), rel=1e-6)
    assert terms == {"label_ce": pytest.approx(ln2, rel=1e-6),
                     "rationale_ce": pytest.approx(math.log(3.0), rel=1e-6)}
    assert batch.n_targets == 3
    # α = 1 runs the predict task only.
    loss, terms = sbs.StepByStepLoss(sbs.task_weights("multitask", 1.0)).loss(model, batch)
    assert float(loss) == pytest.approx(ln2, rel=1e-6) and set(terms) == {"label_ce"}


# ---- layouts and the transformers reference ----------------------------------------------------

RECORDS = [
    {"input": "Tom has 3 apples and buys 5 more. How many apples does Tom have now?",
     "rationale": "Tom starts with 3 apples. He buys 5 more, so 3 + 5 = 8.", "label": "8"},
    {"input": "Anna has 4 pens and gives away 2. How many pens does Anna have left?",
     "rationale": "Anna starts with 4 pens. She gives away 2, so 4 - 2 = 2.", "label": "2"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer("builtin:words", spec_dir=Path("."),
                          work_dir=tmp_path_factory.mktemp("tok"))


def _model(arch: dict, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    config = arch_config(ArchConfig.model_validate(arch), tokenizer)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_config(config)


def _pairs(variant: str) -> list[dict]:
    return [sbs.training_tasks(r, variant) for r in RECORDS]


def test_causal_rows_hold_prompt_then_target(tokenizer) -> None:
    data, dropped = sbs.build_task_data(_pairs("multitask"), tokenizer, SEQ,
                                        encoder_decoder=False)
    assert dropped == 0 and len(data) == 2 and set(data.tasks) == {"predict", "explain"}
    rows = data.tasks["predict"]
    ids = tokenizer("predict: " + RECORDS[0]["input"], add_special_tokens=False)["input_ids"]
    label = tokenizer("8", add_special_tokens=False)["input_ids"]
    head = [tokenizer.bos_token_id, *ids]
    length = len(head) + len(label) + 1
    assert rows.tokens[0, :length].tolist() == [*head, *label, tokenizer.eos_token_id]
    assert rows.tokens[0, length:].eq(tokenizer.pad_token_id).all()
    assert rows.targets[0].nonzero().flatten().tolist() == list(range(len(head), length))
    batch = data.batch(torch.tensor([1, 0]))
    assert batch.index.tolist() == [1, 0]
    assert batch.tasks["explain"].labels[1].ne(-100).sum() == len(tokenizer(
        RECORDS[0]["rationale"], add_special_tokens=False)["input_ids"]) + 1


def test_an_example_too_long_for_any_task_is_dropped_from_all(tokenizer) -> None:
    pairs = [{"predict": ("Tom", "4"), "explain": ("Tom has 3 apples and", "so")},  # 1 + 5 > 4
             {"predict": ("Tom", "4"), "explain": ("Tom has 3", "so")}]  # 1 + 3 <= 4: fits
    data, dropped = sbs.build_task_data(pairs, tokenizer, 4, encoder_decoder=False)
    assert dropped == 1 and len(data) == 1
    assert len(data.tasks["predict"]) == len(data.tasks["explain"]) == 1
    assert data.tasks["explain"].tokens[0, 1:4].tolist() == tokenizer(
        "Tom has 3", add_special_tokens=False)["input_ids"]


def test_seq2seq_rows_end_in_eos_and_trim_to_the_batch(tokenizer) -> None:
    data, dropped = sbs.build_task_data(_pairs("single_task"), tokenizer, SEQ,
                                        encoder_decoder=True)
    assert dropped == 0
    one = data.batch(torch.tensor([1])).tasks["single"]
    source = tokenizer("predict: " + RECORDS[1]["input"], add_special_tokens=False)["input_ids"]
    target = tokenizer("Anna starts with 4 pens. She gives away 2, so 4 - 2 = 2. The answer "
                       "is 2.", add_special_tokens=False)["input_ids"]
    assert one.input_ids[0].tolist() == [*source, tokenizer.eos_token_id]
    assert one.labels[0].tolist() == [*target, tokenizer.eos_token_id]
    assert one.attention_mask.all()
    assert one.n_tokens == len(source) + 1 + len(target) + 1
    both = data.batch(torch.tensor([0, 1])).tasks["single"]
    widths = [int(row.ne(-100).sum()) for row in both.labels]
    assert both.labels.shape[1] == max(widths) and widths[1] == len(target) + 1
    assert both.labels[0, widths[0]:].eq(-100).all() and both.labels[1, widths[1]:].eq(-100).all()


@pytest.mark.parametrize("arch", [TINY_ARCH, T5_ARCH], ids=["llama", "t5"])
def test_loss_equals_the_models_own_losses(arch, tokenizer) -> None:
    """α·(HF loss on predict) + (1-α)·(HF loss on explain): transformers' loss with `labels`
    is an independent implementation of the masked, shifted mean CE."""
    model = _model(arch, tokenizer).eval()
    enc_dec = model.config.is_encoder_decoder
    data, _ = sbs.build_task_data(_pairs("multitask"), tokenizer, SEQ, encoder_decoder=enc_dec)
    batch = data.batch(torch.tensor([0, 1]))
    alpha = 0.3
    loss, _ = sbs.StepByStepLoss(sbs.task_weights("multitask", alpha)).loss(model, batch)

    def hf_loss(task: str) -> torch.Tensor:
        if enc_dec:
            b = batch.tasks[task]
            return model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                         labels=b.labels).loss
        rows = data.tasks[task]
        labels = rows.tokens.masked_fill(~rows.targets, -100)
        mask = (torch.arange(rows.tokens.shape[1]) < rows.lengths[:, None]).long()
        return model(input_ids=rows.tokens, attention_mask=mask, labels=labels).loss

    expected = alpha * hf_loss("predict") + (1 - alpha) * hf_loss("explain")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_fraction_is_the_trainers_seeded_draw() -> None:
    rows = [{"i": i} for i in range(10)]
    half = sbs.select_fraction(rows, 0.5, seed=3)
    assert len(half) == 5 and half == sbs.select_fraction(rows, 0.5, seed=3)
    assert half == __import__("random").Random(derive_seed(3, "fraction")).sample(rows, 5)
    assert sbs.select_fraction(rows, None, seed=3) is rows
    assert len(sbs.select_fraction(rows, 0.01, seed=3)) == 1


# ---- students training on a rationales artifact ------------------------------------------------

def _stage(name: str, kind: str, student: str, **fields) -> dict:
    return {"name": name, "kind": kind, "student": student, "data": "arith", "steps": 12,
            "batch_size": 8, "seq_len": SEQ, "log_every": 4, "checkpoint_every": 12,
            "optimizer": {"lr": 3e-3}, **fields}


STAGES = [
    _stage("gold", "step_by_step", "small", rationales={"source": "data"}),
    _stage("gold_t5", "step_by_step", "t5", rationales={"source": "data"}, alpha=0.7),
    _stage("single_t5", "step_by_step", "t5", rationales={"source": "data"},
           variant="single_task"),
    _stage("labels", "sft", "small", labels_from="gold", train_fraction=0.5),
    _stage("labels_t5", "sft", "t5", labels_from="gold"),
]


def _train(run: TinyRun, node_id: str) -> None:
    """What the torch backend's train node does, with the step_by_step data and objective."""
    ctx = run.ctx(node_id)
    stage = next(s for s in run.spec.stages if s.name == node_id)
    tokenizer = load_tokenizer("builtin:words", spec_dir=run.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    student = load_model(ctx.node.config["student"], ctx=ctx, role="student",
                         tokenizer=tokenizer, dev=torch.device("cpu"), trainable=True)
    setup = Setup(ctx, stage, tokenizer, student, torch.device("cpu"))
    data = sbs.load_data(setup)
    sampler = EpochSampler(len(data), order_seed(0, ctx.node.config["data"]))
    train(TrainJob(ctx, stage, student, sbs.build(setup), data, sampler, torch.device("cpu"),
                   None))
    run.finished.add(node_id)


def tiny_run(stages: list[dict], folder: Path, **spec: object) -> TinyRun:
    """A planned TinyRun on `n` builtin arithmetic records (`data: arith`)."""
    (folder / "spec").mkdir(parents=True, exist_ok=True)
    (folder / "run").mkdir(exist_ok=True)
    the_spec = Spec.model_validate({
        "kdspec": 1, "name": "sbs", "seed": 0, "tokenizer": "builtin:words",
        "models": {"small": {"arch": TINY_ARCH}, "t5": {"arch": T5_ARCH}},
        "data": {"arith": {"source": "builtin:arithmetic", "n": 48}}, "stages": stages,
        **spec})
    plan = build_plan(the_spec, base_dir=folder / "spec", estimate=False)
    assert not plan.errors, plan.errors
    return TinyRun(the_spec, plan, folder / "spec", folder / "run")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> TinyRun:
    run = tiny_run(STAGES, tmp_path_factory.mktemp("sbs"))
    for node in run.plan.nodes:
        if node.kind == "rationales":
            run_rationales_node(run.ctx(node.id))
            run.finished.add(node.id)
    for node in run.plan.nodes:
        if node.kind == "train":
            _train(run, node.id)
    return run


def test_rationales_from_data_are_the_gold_records(pipeline: TinyRun) -> None:
    rows = read_rationales(pipeline.ctx("gold"))
    assert len(rows) == 48
    assert set(rows[0]) == {"index", "input", "rationale", "label", "raw", "gold"}
    assert rows[0]["label"] == rows[0]["gold"] and rows[0]["raw"] is None
    # stages with the same rationale settings share one node
    assert pipeline.plan.node("gold_t5").inputs["rationales"] == "gold.rationales"


@pytest.mark.parametrize(("node", "terms"), [
    ("gold", {"label_ce", "rationale_ce"}), ("gold_t5", {"label_ce", "rationale_ce"}),
    ("single_t5", {"ce"}), ("labels", {"ce"}), ("labels_t5", {"ce"})])
def test_students_train(pipeline: TinyRun, node: str, terms: set[str]) -> None:
    metrics = pipeline.metrics(node)
    assert [m["step"] for m in metrics] == [4, 8, 12]
    assert terms <= set(metrics[0])
    assert metrics[-1]["loss"] < metrics[0]["loss"], metrics
    if terms == {"label_ce", "rationale_ce"}:
        alpha = 0.7 if node == "gold_t5" else 0.5
        for m in metrics:
            assert m["loss"] == pytest.approx(
                alpha * m["label_ce"] + (1 - alpha) * m["rationale_ce"], rel=1e-5)


def test_label_only_trains_on_the_fraction(pipeline: TinyRun) -> None:
    messages = [e.message for e in pipeline.events if e.node == "labels" and e.kind == "message"]
    assert any("training on 24 examples × 1 task(s)" in m for m in messages), messages
