"""The `gkd` objective: response sources (on-policy with probability lmbda, seq_kd), rows
built from generations, and the generalised JSD against an independent formula."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdspec.spec.stages.gkd import GKDStage  # noqa: E402
from kdspec_torch.batches import IGNORE_INDEX, pair_rows  # noqa: E402
from kdspec_torch.generate import generate, left_pad  # noqa: E402
from kdspec_torch.objectives.base import logits  # noqa: E402
from kdspec_torch.objectives.gkd import GKD, completion_batch, row_prompts  # noqa: E402

pytestmark = pytest.mark.torch

VOCAB, PAD, BOS, EOS = 20, 0, 1, 2


def tiny(d_model: int, seed: int) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def gkd_stage(**overrides) -> GKDStage:
    fields = dict(name="gkd", kind="gkd", teacher="teacher", data="pairs", steps=1, seq_len=10,
                  max_new_tokens=5)
    fields.update(overrides)
    return GKDStage.model_validate(fields)


def pairs_batch():
    data = pair_rows([[5, 6, 7], [8], [9, 10]], [[11, 12], [13, 14, 15], [16]], bos_id=BOS,
                     eos_id=EOS, pad_id=PAD, seq_len=10)
    return data.batch(torch.arange(len(data)))


def objective(coin_value: float = 1.0, **overrides) -> GKD:
    teacher = tiny(32, seed=1).eval().requires_grad_(False)
    return GKD(gkd_stage(**overrides), teacher, pad_id=PAD, eos_id=EOS, coin=lambda: coin_value)


def reference_jsd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> float:
    """The generalised JSD from probabilities, term by term (Agarwal et al., Eq. 1)."""
    q, p = student.double().softmax(-1), teacher.double().softmax(-1)
    m = beta * p + (1 - beta) * q
    per_token = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    return float(per_token[mask].mean())


def test_row_prompts_are_bos_plus_prompt():
    assert row_prompts(pairs_batch()) == [[BOS, 5, 6, 7], [BOS, 8], [BOS, 9, 10]]


def test_completion_batch_targets_and_truncation():
    batch = completion_batch([[BOS, 5, 6], [BOS, 5]], [[7, 8, EOS], [9, 9, 9, 9, 9]], seq_len=5,
                             pad_id=PAD, index=torch.tensor([4, 7]))
    assert batch.input_ids.tolist() == [[BOS, 5, 6, 7, 8], [BOS, 5, 9, 9, 9]]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [[x, x, 7, 8, EOS], [x, 9, 9, 9, 9]]
    assert batch.index.tolist() == [4, 7]
    short = completion_batch([[BOS, 5]], [[EOS]], seq_len=5, pad_id=PAD, index=torch.tensor([0]))
    assert short.labels.tolist() == [[x, EOS, x, x, x]]
    assert short.attention_mask.tolist() == [[1, 1, 1, 0, 0]]


@pytest.mark.parametrize(("coin", "seq_kd", "expected"), [
    (0.3, False, "student"), (0.5, False, "student"), (0.7, False, "data"), (0.7, True, "teacher"),
])
def test_response_source(coin, seq_kd, expected):
    assert objective(coin, lmbda=0.5, seq_kd=seq_kd).source() == expected


def test_on_policy_fraction_follows_lmbda():
    rng = random.Random(0)
    gkd = GKD(gkd_stage(lmbda=0.3), tiny(8, 0), pad_id=PAD, eos_id=EOS, coin=rng.random)
    share = sum(gkd.source() == "student" for _ in range(2000)) / 2000
    assert share == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_off_policy_loss_is_the_generalised_jsd(beta):
    gkd = objective(coin_value=1.0, lmbda=0.0, beta=beta)  # u = 1 > lmbda: the dataset's pairs
    student, batch = tiny(16, seed=0), pairs_batch()
    loss, terms = gkd.loss(student, batch)
    mask = batch.labels != IGNORE_INDEX
    with torch.no_grad():
        s, t = logits(student, batch), logits(gkd.teacher, batch)
    if beta == 0.0:  # special-cased to KL(p_T ‖ q_S), as TRL does
        expected = float((t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)[mask]
                         .mean())
    elif beta == 1.0:  # KL(q_S ‖ p_T)
        expected = float((s.softmax(-1) * (s.log_softmax(-1) - t.log_softmax(-1))).sum(-1)[mask]
                         .mean())
    else:
        expected = reference_jsd(s, t, mask, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms["on_policy"] == 0.0
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in gkd.teacher.parameters())


def test_on_policy_batch_holds_the_students_samples():
    gkd = objective(coin_value=0.0, lmbda=0.5)
    student, batch = tiny(16, seed=0), pairs_batch()
    student.train()
    torch.manual_seed(11)
    sampled = gkd.sample(student, batch)
    assert student.training  # restored after sampling in eval mode
    torch.manual_seed(11)
    ids, mask = left_pad(row_prompts(batch), PAD)
    ref = generate(student.eval(), ids, mask, gkd.sampling, eos_token_id=EOS, pad_token_id=PAD)
    for row, prompt in enumerate(row_prompts(batch)):
        completion = ref.tokens[row, : int(ref.lengths[row])].tolist()
        targets = sampled.labels[row][sampled.labels[row] != IGNORE_INDEX].tolist()
        assert sampled.input_ids[row, : len(prompt)].tolist() == prompt
        assert targets == completion[: 10 - len(prompt) + 1]
    assert sampled.index.tolist() == batch.index.tolist()


def test_on_policy_loss_runs_on_generated_rows():
    gkd = objective(coin_value=0.0, lmbda=1.0, temperature=0.9)
    loss, terms = gkd.loss(tiny(16, seed=0), pairs_batch())
    assert terms["on_policy"] == 1.0 and math.isfinite(loss.item()) and loss.item() >= 0
