"""The JAX train step against the torch backend's, from the same initial weights on the same
batches: the loss, gradient norm and final weights agree, so the two backends' results differ
only through what each draws itself (initial weights and data order)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from kdspec.spec.models import ArchConfig  # noqa: E402
from kdspec.spec.stages.common import KDLoss, OptimizerConfig, ScheduleConfig  # noqa: E402
from kdspec_jax.data import (  # noqa: E402
    EpochSampler,
    build_token_rows,
    load_tokenizer,
    read_records,
    step_batch,
)
from kdspec_jax.model import JaxModelConfig, init_params  # noqa: E402
from kdspec_jax.models import LoadedModel, arch_hf_config, save_student  # noqa: E402
from kdspec_jax.optim import build_optimizer, lr_schedule  # noqa: E402
from kdspec_jax.train_step import (  # noqa: E402
    ce_objective,
    init_train_state,
    kd_objective,
    make_train_step,
)
from kdspec_torch.batches import TokenData  # noqa: E402
from kdspec_torch.objectives.ce import CrossEntropy  # noqa: E402
from kdspec_torch.objectives.distill import Distill  # noqa: E402
from kdspec_torch.optim import build_optimizer as torch_optimizer  # noqa: E402
from kdspec_torch.optim import build_scheduler  # noqa: E402
from kdspec_torch.step import forward_backward  # noqa: E402

STEPS, BATCH, ACCUM, SEQ = 5, 4, 2, 32
OPTIMIZER = OptimizerConfig(lr=3e-3, weight_decay=0.1, grad_clip=0.1)
SCHEDULE = ScheduleConfig(kind="cosine", warmup_steps=2)
LOSS = KDLoss(temperature=2.0, hard_label_weight=0.2)
STUDENT = {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
           "d_ff": 64, "max_seq_len": 64}
TEACHER = {"family": "gemma2", "d_model": 48, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
           "head_dim": 16, "d_ff": 96, "max_seq_len": 64, "sliding_window": 8}


def _model(arch: dict, tokenizer, folder: Path, seed: int) -> LoadedModel:
    """Fresh JAX weights, also saved as a HF folder for torch to load."""
    hf = arch_hf_config(ArchConfig.model_validate(arch), tokenizer)
    config = JaxModelConfig.from_hf(hf)
    model = LoadedModel(config, init_params(config, jax.random.key(seed)), hf)
    save_student(model, model.params, tokenizer, folder)
    return model


def _torch_run(folder: Path, objective, rows, sampler) -> tuple[list[float], list[float], dict]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    optimizer = torch_optimizer(model, OPTIMIZER)
    scheduler = build_scheduler(optimizer, SCHEDULE, STEPS)
    data = TokenData(torch.from_numpy(rows.tokens.astype(np.int64)),
                     torch.ones(rows.tokens.shape, dtype=torch.bool),
                     torch.full((len(rows),), SEQ + 1))
    losses, norms = [], []
    for step in range(STEPS):
        index = torch.from_numpy(sampler.indices(step * BATCH, BATCH))
        batches = [data.batch(part) for part in index.chunk(ACCUM)]
        logged = forward_backward(model, objective, batches, amp=None, device=torch.device("cpu"))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                          OPTIMIZER.grad_clip)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(logged["loss"])
    return losses, norms, {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["pretrain", "pretrain_kd"])
def test_same_weights_and_batches_give_the_torch_backends_steps(kind: str,
                                                                tmp_path: Path) -> None:
    """Five steps with grad accumulation, weight decay, clipping and warmup + cosine: JAX and
    kdspec_torch's optimizer, scheduler, `forward_backward` and objective (CE, or the KD mix
    against a Gemma 2 teacher) agree on every step's loss and gradient norm, and on the final
    weights."""
    tokenizer = load_tokenizer("builtin:words", spec_dir=tmp_path, work_dir=tmp_path / "tok")
    student = _model(STUDENT, tokenizer, tmp_path / "student", seed=0)
    records = read_records({"name": "c", "source": "builtin:hmm", "n": 24}, seed=0,
                           spec_dir=tmp_path)
    rows = build_token_rows("packed", records, tokenizer, SEQ)
    sampler = EpochSampler(len(rows), seed=3)

    optimizer = build_optimizer(OPTIMIZER, SCHEDULE, STEPS)
    teacher, frozen = None, None
    if kind == "pretrain":
        objective, torch_objective = ce_objective(student.config), CrossEntropy()
    else:
        teacher = _model(TEACHER, tokenizer, tmp_path / "teacher", seed=1)
        objective = kd_objective(student.config, teacher.config, temperature=2.0,
                                 hard_label_weight=0.2, soft_scale=4.0)
        torch_teacher = AutoModelForCausalLM.from_pretrained(
            tmp_path / "teacher", dtype=torch.float32, attn_implementation="eager").eval()
        torch_objective = Distill(LOSS, chunked=False, teacher=torch_teacher)
        frozen = teacher.params
    step = jax.jit(make_train_step(objective, optimizer,
                                   lr_fn=lr_schedule(OPTIMIZER, SCHEDULE, STEPS)))
    state = init_train_state(student.params, optimizer)
    losses, norms = [], []
    for s in range(STEPS):
        state, metrics = step(state, step_batch(rows, sampler, s, BATCH, ACCUM), frozen)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))

    want_losses, want_norms, weights = _torch_run(tmp_path / "student", torch_objective, rows,
                                                  sampler)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-4)
    assert min(norms) > OPTIMIZER.grad_clip  # every step was clipped
    save_student(student, state.params, tokenizer, tmp_path / "trained")
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained", dtype=torch.float32)
    for name, value in trained.state_dict().items():
        np.testing.assert_allclose(value.numpy(), weights[name], atol=2e-5, err_msg=name)
