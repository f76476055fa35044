"""The `minillm` loop on tiny models: rollouts + PPO steps + the pre-training regulariser,
metrics, and resuming at a round boundary."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdspec.plan.graph import Node  # noqa: E402
from kdspec.run.backend import NodeContext  # noqa: E402
from kdspec.spec.stages.minillm import MiniLLMStage  # noqa: E402
from kdspec_torch.batches import EpochSampler, pack_documents, step_batches  # noqa: E402
from kdspec_torch.minillm.rollout import collate  # noqa: E402
from kdspec_torch.minillm.stage import (  # noqa: E402
    MiniLLMJob,
    collect_rollouts,
    ppo_step,
    pretrain_step_loss,
    steps_per_round,
    train_minillm,
)

pytestmark = pytest.mark.torch

VOCAB, PAD, BOS, EOS = 24, 0, 1, 2


def tiny(d_model: int, seed: int) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def stage(**overrides) -> MiniLLMStage:
    fields = dict(name="polish", kind="minillm", teacher="teacher", data="prompts", steps=4,
                  batch_size=2, num_rollouts=4, ppo_epochs=1, max_prompt_length=6,
                  max_length=14, seq_len=8, log_every=1, checkpoint_every=2,
                  optimizer={"lr": 1e-3})
    fields.update(overrides)
    return MiniLLMStage.model_validate(fields)


def job(tmp_path: Path, events: list, *, pretrain: bool = True, **overrides) -> MiniLLMJob:
    st = stage(**overrides)
    node = Node(st.name, "train", st.name, "minillm", {"seed": 3})
    ctx = NodeContext(node, None, None, tmp_path, tmp_path, tmp_path / st.name,  # type: ignore[arg-type]
                      events.append)
    prompts = [[BOS, 3 + i, 4 + i, 5] for i in range(6)]
    data = pack_documents([list(range(3, 20))] * 4, eos_id=EOS, seq_len=st.seq_len)
    teacher = tiny(32, seed=1).eval().requires_grad_(False)
    return MiniLLMJob(
        ctx=ctx, stage=st, student=tiny(16, seed=0), teacher=teacher, prompts=prompts,
        prompt_sampler=EpochSampler(len(prompts), 5), pretrain=data if pretrain else None,
        pretrain_sampler=EpochSampler(len(data), 6) if pretrain else None, pad_id=PAD,
        eos_id=EOS, device=torch.device("cpu"), amp=None, seed=3)


def test_pretrain_regulariser_gradient_reaches_student(tmp_path):
    j = job(tmp_path, [])
    batch = step_batches(j.pretrain, j.pretrain_sampler, 0, 2, 1)[0]
    loss, terms = pretrain_step_loss(j.student, j.teacher, batch, kd_ratio=0.5)
    loss.backward()
    assert terms["pt_loss"] == pytest.approx(0.5 * terms["lm_loss"] + 0.5 * terms["ds_loss"])
    grads = {name: p.grad for name, p in j.student.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
        name for name, g in grads.items() if g is None or g.abs().sum() == 0]
    assert all(p.grad is None for p in j.teacher.parameters())
    _, lm_only = pretrain_step_loss(j.student, None, batch, kd_ratio=0.5)
    assert "ds_loss" not in lm_only and lm_only["pt_loss"] == lm_only["lm_loss"]


@pytest.mark.parametrize("filters", [{}, {"top_k": 5, "top_p": 0.9}])
def test_first_ppo_epoch_ratio_is_the_mix_weight(tmp_path, filters):
    """At the first PPO epoch the policy has not moved, so ρ = exp(0)·w: the training forward
    reproduces the scoring pass's old log-probs (also over a top-k/top-p set)."""
    j = job(tmp_path, [], **filters)
    rollouts, stats = collect_rollouts(j, 0)
    assert stats.rollouts == 4 and len(rollouts) == 4
    logged, tokens = ppo_step(j, rollouts, None)
    batch = collate([r.prompt for r in rollouts], [r.response for r in rollouts], PAD, rollouts)
    assert logged["ratio"] == pytest.approx(batch.weights[batch.mask].mean().item(), rel=1e-5)
    assert tokens == batch.n_tokens
    assert (batch.weights[batch.mask] <= 1 / 0.8 + 1e-5).all()
    assert "pt_loss" not in logged and logged["loss"] == pytest.approx(logged["rl_loss"])


def test_grad_accum_does_not_change_the_step(tmp_path):
    grads = []
    for accum in (1, 2):
        j = job(tmp_path / str(accum), [], grad_accum=accum)
        rollouts, _ = collect_rollouts(j, 0)
        pt = step_batches(j.pretrain, j.pretrain_sampler, 0, 2, accum)
        ppo_step(j, rollouts[:2], pt)
        grads.append(torch.cat([p.grad.flatten() for p in j.student.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_loop_emits_round_and_step_metrics(tmp_path):
    events: list = []
    j = job(tmp_path, events, ppo_epochs=2, steps=3)
    assert steps_per_round(j.stage) == 4
    state = train_minillm(j)
    assert state.step == 3 and state.samples == 4
    metrics = [e.values for e in events if e.kind == "metrics"]
    rounds = [m for m in metrics if "round" in m]
    steps = [m for m in metrics if "pg_loss" in m]
    assert len(rounds) == 1 and {"reward", "rollout_len", "rev_kl"} <= rounds[0].keys()
    assert [m["step"] for m in steps] == [1, 2, 3]
    expected = {"reg_loss", "pt_loss", "lm_loss", "ds_loss", "clip_frac", "grad_norm"}
    assert expected <= steps[0].keys()
    assert [m["ppo_epoch"] for m in steps] == [0, 0, 1]
    assert (tmp_path / "polish" / "checkpoints" / "step-00000003" / "state.json").exists()


class Killed(Exception):
    pass


def test_resume_at_round_boundary_matches_uninterrupted_run(tmp_path):
    straight = job(tmp_path / "a", [])
    train_minillm(straight)

    def kill_in_round_two(event):
        if event.kind == "progress" and event.step == 3:
            raise Killed

    interrupted = job(tmp_path / "b", [])
    interrupted.ctx.emit = kill_in_round_two
    with pytest.raises(Killed):
        train_minillm(interrupted)
    events: list = []
    resumed = job(tmp_path / "b", events)
    state = train_minillm(resumed)
    assert state.step == 4
    assert any("resumed from step-00000002" in e.message for e in events)
    for a, b in zip(straight.student.parameters(), resumed.student.parameters(), strict=True):
        assert torch.equal(a, b)


def test_spec_rejects_rollout_shapes_the_loop_cannot_run():
    with pytest.raises(ValueError, match="num_rollouts .1. must be at least batch_size .2."):
        stage(num_rollouts=1, batch_size=2)
    with pytest.raises(ValueError, match="max_length .6. must exceed max_prompt_length .6."):
        stage(max_length=6)
    assert steps_per_round(stage(num_rollouts=5, batch_size=2, ppo_epochs=3)) == 6
