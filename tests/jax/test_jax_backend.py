"""The JAX backend runs `pretrain` and `pretrain_kd` nodes of a tiny spec: events, checkpoints,
resume, the saved HF student, FLOPs, and the eval node's perplexity of the JAX-trained student
against the torch backend's eval of the same folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from jax_helpers import TinyRun, stage

from kdspec.plan.graph import Node, Plan
from kdspec.run.backend import NodeContext
from kdspec_jax.backend import JaxBackend
from kdspec_jax.checkpoint import latest_checkpoint
from kdspec_jax.model import forward
from kdspec_jax.weights import load_hf

KD_LOSS = {"temperature": 2.0, "hard_label_weight": 0.2}
EVAL = {"name": "eval", "kind": "eval", "models": ["student"], "data": ["held_out"],
        "metrics": ["perplexity"], "seq_len": 32, "batch_size": 4}
STAGES = [
    stage("student", "pretrain", student="small"),
    stage("kd", "pretrain_kd", student="small", teacher="big", loss=KD_LOSS),
    EVAL,
]
METRIC_KEYS = {"step", "tokens", "loss", "ce", "grad_norm", "lr", "tokens_per_s"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    folder = tmp_path_factory.mktemp("backend")
    tiny = TinyRun(STAGES, folder / "spec", folder / "run")
    tiny.run("student")
    tiny.run("kd")
    tiny.run("eval")
    return tiny


def test_pretrain_events_and_artifacts(run: TinyRun) -> None:
    (start,) = run.of_kind("start", "student")
    assert (start.step, start.total) == (0, 8)
    assert [e.step for e in run.of_kind("progress", "student")] == list(range(1, 9))
    metrics = [e.values for e in run.of_kind("metrics", "student")]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert set(metrics[0]) == METRIC_KEYS
    assert [m["tokens"] for m in metrics] == [512, 1024, 1536, 2048]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[0]["lr"] == pytest.approx(3e-3)  # warmup 2: step 1 is at the peak
    node = run.run_dir / "student"
    assert sorted(p.name for p in (node / "checkpoints").iterdir()) == [
        "step-00000004", "step-00000008"]
    measured = json.loads((node / "measured.json").read_text())
    assert (measured["steps"], measured["tokens"]) == (8, 2048)
    assert measured["flops_per_step"] > 0


def test_saved_student_is_the_trained_weights_and_loads_in_transformers(run: TinyRun) -> None:
    folder = run.run_dir / "student" / "model"
    config, params = load_hf(folder)
    checkpoint = latest_checkpoint(run.run_dir / "student" / "checkpoints")
    saved = safetensors.numpy.load_file(str(checkpoint / "state.safetensors"))
    assert int(saved[".step"]) == 8
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = ".params" + jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(leaf), saved[key], err_msg=key)

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("the cat sat on the mat .", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token == "<eos>" and len(ids) == 7
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits.numpy()
    got = np.asarray(forward(params, config, jnp.asarray([ids])))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_pretrain_kd_logs_its_terms_and_formula(run: TinyRun) -> None:
    metrics = [e.values for e in run.of_kind("metrics", "kd")]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    for m in metrics:
        assert set(m) == METRIC_KEYS | {"kd"}
        expected = 0.8 * 2.0**2 * m["kd"] + 0.2 * m["ce"]  # (1 − w)·T²·KD + w·CE
        assert m["loss"] == pytest.approx(expected, rel=1e-5)
    measured = json.loads((run.run_dir / "kd" / "measured.json").read_text())
    student = json.loads((run.run_dir / "student" / "measured.json").read_text())
    # The same student step plus the teacher's forward pass.
    assert measured["flops_per_step"] > student["flops_per_step"]


def test_resume_from_a_checkpoint_ends_with_identical_weights(run: TinyRun,
                                                              tmp_path: Path) -> None:
    """What a kill between steps 4 and 8 leaves (the step-4 checkpoint and a half-written
    temp folder) resumes at step 4 and ends bit-identical to the uninterrupted run."""
    rerun = TinyRun(STAGES, tmp_path / "spec", tmp_path / "run")
    source = run.run_dir / "student" / "checkpoints" / "step-00000004"
    target = rerun.run_dir / "student" / "checkpoints"
    shutil.copytree(source, target / source.name)
    (target / ".tmp-step-00000008-999").mkdir()
    rerun.run("student")
    messages = [e.message for e in rerun.of_kind("message", "student")]
    assert messages == ["resumed from step-00000004 (step 4)"]
    assert not list(target.glob(".tmp-*"))
    (start,) = rerun.of_kind("start", "student")
    assert start.step == 4
    expected = {e.values["step"]: e.values["loss"] for e in run.of_kind("metrics", "student")}
    resumed = [e.values for e in rerun.of_kind("metrics", "student")]
    assert [m["step"] for m in resumed] == [6, 8]
    assert all(m["loss"] == expected[m["step"]] for m in resumed)
    assert resumed[-1]["tokens"] == 2048  # the data position was restored too

    def weights(root: Path) -> dict:
        return safetensors.numpy.load_file(str(root / "student" / "model" / "model.safetensors"))

    want, got = weights(run.run_dir), weights(rerun.run_dir)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_jax_trained_student_reloaded_in_torch_has_the_reported_perplexity(
        run: TinyRun) -> None:
    """The eval node's perplexity of the JAX-trained student equals what the torch backend's
    eval computes on the saved HF folder (AutoModelForCausalLM) and the same records (the
    issue asks for 1%; fp32 on both sides agrees to ~1e-7)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch_eval = pytest.importorskip("kdspec_torch.eval_node")
    from kdspec.spec.stages.eval import EvalStage
    from kdspec_torch.batches import read_records

    (row,) = json.loads((run.run_dir / "eval" / "eval.json").read_text())["results"]
    assert (row["model"], row["dataset"], row["metric"]) == ("student", "held_out",
                                                             "perplexity")
    folder = run.run_dir / "student" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    node = run.plan.node("eval")
    records = read_records(node.config["data"]["held_out"], seed=0, spec_dir=run.spec_dir)
    job = torch_eval.EvalJob(EvalStage.model_validate(EVAL), torch.device("cpu"), None,
                             run.run_dir)
    expected = torch_eval.perplexity(model.eval(), tokenizer, records, job,
                                     torch_eval.Task("student", "held_out", "perplexity"))
    assert row["value"] == pytest.approx(expected, rel=1e-4)
    assert 1 < row["value"] < len(tokenizer)


def test_unsupported_nodes_are_refused_by_name() -> None:
    backend = JaxBackend()
    gkd = Node("g", "train", "g", "gkd", {"stage": {}})
    rationales = Node("dss.rationales", "rationales", "dss", "step_by_step", {})
    labels = Node("sft", "train", "sft", "sft", {"stage": {"labels_from": "dss"}})
    assert not any(backend.supports(node) for node in (gkd, rationales, labels))
    cases = [(gkd, "stage kind `gkd`"), (rationales, "a `rationales` node"),
             (labels, "`labels_from`")]
    for node, reason in cases:
        ctx = NodeContext(node, Plan("p", [node]), None, Path("."), Path("."), Path("."),
                          lambda event: None)
        with pytest.raises(NotImplementedError, match=f"cannot run `{node.id}`, .*{reason}"):
            backend.run_node(ctx)
    for kind in ("pretrain", "sft", "pretrain_kd", "kd"):
        assert backend.supports(Node("x", "train", "x", kind, {"stage": {}}))
