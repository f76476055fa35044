"""Resume and determinism: a run killed with SIGKILL and rerun ends with weights identical to an
uninterrupted run; micro-batching does not change the update.

The killed run is a real subprocess (this file run as a script) that SIGKILLs itself right after
a given optimizer step, between two checkpoints; the reference and the rerun run in this
process. All three use one intra-op thread (conftest sets it here, OMP_NUM_THREADS in the
worker), so they run the same kernels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import TinyRun, planned_run, stage  # noqa: E402

RESUME_STAGES = [stage("student", "pretrain", student="small", steps=10, grad_accum=2)]
KILL_AFTER = 7  # checkpoints at 4 and 8: the kill loses steps 5-7


def _worker(folder: Path, kill_after: int) -> None:
    """Run the `student` node into `folder/run`; SIGKILL this process after `kill_after`."""
    from kdspec_torch.backend import TorchBackend

    run = planned_run(RESUME_STAGES, folder / "spec", folder / "run")

    def emit(event) -> None:
        if event.kind == "progress" and event.step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    TorchBackend().run_node(run.ctx("student", emit))


def _spawn(folder: Path, kill_after: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, __file__, str(folder), str(kill_after)],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).parent)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "student" / "model" / "model.safetensors")


def test_killed_and_rerun_ends_with_identical_weights(tmp_path: Path) -> None:
    reference = planned_run(RESUME_STAGES, tmp_path / "spec", tmp_path / "reference")
    reference.run("student")

    folder = tmp_path / "killed"
    killed = _spawn(folder, KILL_AFTER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = folder / "run" / "student" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004"]
    assert not (folder / "run" / "student" / "model").exists()

    rerun = planned_run(RESUME_STAGES, folder / "spec", folder / "run")
    rerun.run("student")
    messages = [e.message for e in rerun.events if e.kind == "message"]
    assert messages == ["resumed from step-00000004 (step 4)"]
    assert [m["step"] for m in rerun.metrics("student")] == [6, 8, 10]
    expected = {m["step"]: m["loss"] for m in reference.metrics("student")}
    assert all(m["loss"] == expected[m["step"]] for m in rerun.metrics("student"))

    want, got = _weights(reference.run_dir), _weights(folder / "run")
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name


def test_grad_accumulation_gives_the_same_gradient(make_run) -> None:
    from kdspec_torch.backend import TorchBackend  # noqa: F401  (the backend imports cleanly)
    from kdspec_torch.batches import EpochSampler, build_token_data, read_records, step_batches
    from kdspec_torch.models import load_model
    from kdspec_torch.objectives.ce import CrossEntropy
    from kdspec_torch.step import forward_backward
    from kdspec_torch.tokenizer import load_tokenizer

    run: TinyRun = make_run([stage("sft", "sft", data="pairs", student="small")])
    ctx = run.ctx("sft")
    tokenizer = load_tokenizer("builtin:words", spec_dir=run.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    model = load_model(ctx.node.config["student"], ctx=ctx, role="student", tokenizer=tokenizer,
                       dev=torch.device("cpu"), trainable=True)
    records = read_records(ctx.node.config["data"], seed=0, spec_dir=run.spec_dir)
    data = build_token_data("pairs", records, tokenizer, 32)
    sampler = EpochSampler(len(data), seed=1)

    def grads(accum: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        batches = step_batches(data, sampler, 0, batch_size=8, grad_accum=accum)
        logged = forward_backward(model, CrossEntropy(), batches, amp=None,
                                  device=torch.device("cpu"))
        return logged, {n: p.grad.clone() for n, p in model.named_parameters()}

    halves = step_batches(data, sampler, 0, batch_size=8, grad_accum=2)
    assert halves[0].n_targets != halves[1].n_targets  # unequal halves: weighting matters
    (loss1, g1), (loss2, g2) = grads(1), grads(2)
    assert loss2["loss"] == pytest.approx(loss1["loss"], rel=1e-6)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-5, atol=1e-8), name


def test_grad_accumulation_gives_the_same_update(make_run) -> None:
    """batch 8 × accum 1 and 4 × 2: the same first-step loss and (nearly) the same weights."""
    one = make_run([stage("sft", "sft", data="pairs", student="small", steps=2)])
    two = make_run([stage("sft", "sft", data="pairs", student="small", steps=2, grad_accum=2)])
    one.run("sft")
    two.run("sft")

    def first_loss(run: TinyRun) -> float:
        return next(e.values["loss"] for e in run.events if e.kind == "progress")

    assert first_loss(two) == pytest.approx(first_loss(one), rel=1e-6)
    from safetensors.torch import load_file

    a = load_file(one.model_dir("sft") / "model.safetensors")
    b = load_file(two.model_dir("sft") / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
