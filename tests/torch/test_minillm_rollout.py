"""MiniLLM rollouts: batch layout, batched scoring against one-row-at-a-time forwards, and the
teacher-mixed sampler's outputs."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdspec_torch.minillm.rollout import (  # noqa: E402
    RolloutConfig,
    collate,
    encode_prompts,
    response_logits,
    sample_rollouts,
    score,
)

pytestmark = pytest.mark.torch

VOCAB, PAD, BOS, EOS = 24, 0, 1, 2


def tiny(family: str, d_model: int, seed: int) -> transformers.PreTrainedModel:
    if family == "gpt2":
        config = transformers.AutoConfig.for_model(
            "gpt2", vocab_size=VOCAB, n_embd=d_model, n_layer=1, n_head=2, n_positions=64,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    else:
        config = transformers.AutoConfig.for_model(
            "llama", vocab_size=VOCAB, hidden_size=d_model, intermediate_size=2 * d_model,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


PROMPTS = [[BOS, 5, 6, 7], [BOS, 9], [BOS, 3, 4, 5, 6, 7, 8]]
RESPONSES = [torch.tensor([10, 11, EOS]), torch.tensor([12, 13, 14, 15, 16]), torch.tensor([EOS])]


def test_collate_layout():
    batch = collate(PROMPTS, RESPONSES, PAD)
    assert batch.prompt_width == 7
    assert batch.input_ids[1].tolist() == [PAD] * 5 + [BOS, 9, 12, 13, 14, 15, 16]
    assert batch.attention_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert batch.position_ids[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0]
    assert batch.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] + [False] * 4]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_response_logits_match_unpadded_forwards(family):
    model = tiny(family, 16, seed=0)
    batch = collate(PROMPTS, RESPONSES, PAD)
    with torch.no_grad():
        batched = response_logits(model, batch)
        for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
            ids = torch.tensor([prompt + response.tolist()])
            alone = model(input_ids=ids).logits[0, len(prompt) - 1: -1]
            assert torch.allclose(batched[row, : len(response)], alone, atol=1e-5)


def test_score_formulas():
    student, teacher = tiny("llama", 16, seed=0), tiny("llama", 32, seed=1)
    config = RolloutConfig(max_prompt_length=8, max_length=16, teacher_mix_alpha=0.2,
                           temperature=2.0, reward_scaling=0.5, cliprange_reward=0.3)
    batch = collate(PROMPTS, RESPONSES, PAD)
    scores = score(student, teacher, batch, config)
    row, t = 1, 2  # any response token
    prompt, token = PROMPTS[row], RESPONSES[row][t]
    ids = torch.tensor([prompt + RESPONSES[row].tolist()])
    with torch.no_grad():
        s = student(input_ids=ids).logits[0, len(prompt) - 1 + t]
        p = teacher(input_ids=ids).logits[0, len(prompt) - 1 + t]
    log_q = (s / 2).log_softmax(-1)[token].item()
    log_p_tau = (p / 2).log_softmax(-1)[token].item()
    log_p = p.log_softmax(-1)[token].item()
    w = math.exp(log_q) / (0.2 * math.exp(log_p_tau) + 0.8 * math.exp(log_q))
    reward = max(-0.3, min(0.3, (log_p - log_q) / 0.5))
    assert scores.old_logprobs[row, t].item() == pytest.approx(log_q, abs=1e-5)
    assert scores.weights[row, t].item() == pytest.approx(w, rel=1e-5)
    assert scores.rewards[row, t].item() == pytest.approx(reward, abs=1e-5)
    assert (scores.rewards[~batch.mask] == 0).all() and (scores.weights[~batch.mask] == 0).all()


def test_sample_rollouts_shapes_and_weights():
    student, teacher = tiny("llama", 16, seed=0), tiny("llama", 32, seed=1)
    config = RolloutConfig(max_prompt_length=6, max_length=12, teacher_mix_alpha=0.0)
    rollouts, stats = sample_rollouts(student, teacher, PROMPTS, config, pad_id=PAD, eos_id=EOS,
                                      generator=torch.Generator().manual_seed(0), chunk_size=2)
    assert stats.rollouts == 3 and stats.response_tokens == sum(len(r.response) for r in rollouts)
    for r, prompt in zip(rollouts, PROMPTS, strict=True):
        assert r.prompt == prompt and 1 <= len(r.response) <= 6
        assert EOS not in r.response[:-1].tolist()  # a response ends at its first eos
        assert torch.allclose(r.weights, torch.ones_like(r.weights))  # α = 0: no correction
        assert r.keep is None


def test_top_k_one_keeps_the_greedy_token_with_probability_one():
    student, teacher = tiny("llama", 16, seed=0), tiny("llama", 32, seed=1)
    config = RolloutConfig(max_prompt_length=6, max_length=10, teacher_mix_alpha=0.0, top_k=1)
    rollouts, _ = sample_rollouts(student, teacher, PROMPTS, config, pad_id=PAD, eos_id=EOS)
    for r in rollouts:
        assert r.keep is not None and r.keep.shape == (len(r.response), VOCAB)
        assert (r.keep.sum(-1) == 1).all()  # top-1: the sampled (greedy) token only
        assert torch.allclose(r.old_logprobs, torch.zeros_like(r.old_logprobs))


def test_encode_prompts_left_truncates():
    class Tok:
        bos_token_id = BOS

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

    assert encode_prompts(Tok(), ["5 6 7 8", "9"], max_prompt_length=3) == [[6, 7, 8], [BOS, 9]]
