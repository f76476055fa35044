"""The JAX backend runs `pretrain` and `pretrain_kd` nodes of a tiny spec: events, checkpoints,
resume, the saved HF student, and FLOPs."""

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

from kdspec_jax.backend import JaxBackend
from kdspec_jax.checkpoint import latest_checkpoint
from kdspec_jax.model import forward
from kdspec_jax.weights import load_hf

KD_LOSS = {"temperature": 2.0, "hard_label_weight": 0.2}
STAGES = [
    stage("student", "pretrain", student="small"),
    stage("kd", "pretrain_kd", student="small", teacher="big", loss=KD_LOSS),
]
METRIC_KEYS = {"step", "tokens", "loss", "ce", "grad_norm", "lr", "tokens_per_s"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    folder = tmp_path_factory.mktemp("backend")
    tiny = TinyRun(STAGES, folder / "spec", folder / "run")
    tiny.run("student")
    tiny.run("kd")
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


def test_unsupported_nodes_are_refused_by_name(tmp_path: Path) -> None:
    cached = stage("kd", "pretrain_kd", student="small", teacher="big",
                   teacher_cache={"mode": "topk", "k": 4})
    tiny = TinyRun([cached], tmp_path / "spec", tmp_path / "run")
    backend = JaxBackend()
    kinds = {node.id: node.kind for node in tiny.plan.nodes}
    assert [backend.supports(node) for node in tiny.plan.nodes] == [False] * len(kinds)
    with pytest.raises(NotImplementedError, match="cached teacher"):
        tiny.run("kd")
