"""kdspec_torch.generate: greedy decoding against HF `generate`, the KV-cache path against a full
forward, the sampling filters against HF's warpers and hand-computed values, sampling
frequencies, eos handling, returned log-probs and teacher-mixed sampling."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kdspec_torch.generate import (  # noqa: E402
    Sampling,
    generate,
    left_pad,
    sampling_probs,
    warp_logits,
)

VOCAB, PAD = 48, 0


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=2)
    # Larger-than-default init spreads the logits, so greedy steps are not near-ties.
    config.initializer_range = 0.2
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(0)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [[1, 5, 9], [1, 7, 3, 11, 20, 4, 8], [1, 30, 31, 6, 12]]
    return left_pad(prompts, PAD)


def test_left_pad():
    ids, mask = left_pad([[5], [6, 7, 8]], pad_id=0)
    assert ids.tolist() == [[0, 0, 5], [6, 7, 8]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], pad_id=0)


def _hf_greedy(model, ids, mask, n, eos):
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                         pad_token_id=PAD, eos_token_id=eos)
    return out[:, ids.shape[1]:]


def test_greedy_equals_hf_generate_on_a_left_padded_batch(model, batch):
    ids, mask = batch
    free = generate(model, ids, mask, Sampling(max_new_tokens=12), eos_token_id=None,
                    pad_token_id=PAD)
    assert free.tokens.tolist() == _hf_greedy(model, ids, mask, 12, eos=None).tolist()
    assert free.mask.all() and not free.finished.any()

    # Make the 4th token of row 1 an eos: that row must stop there, the others run on.
    eos = int(free.tokens[1, 3])
    out = generate(model, ids, mask, Sampling(max_new_tokens=12), eos_token_id=eos,
                   pad_token_id=PAD)
    expected = _hf_greedy(model, ids, mask, 12, eos=eos)
    assert out.tokens.tolist() == expected.tolist()
    first_eos = (free.tokens[1] == eos).nonzero()[0].item()
    assert bool(out.finished[1]) and out.lengths[1] == first_eos + 1
    assert (out.tokens[1, first_eos + 1:] == PAD).all() and not out.mask[1, first_eos + 1:].any()
    assert out.token_lists()[1] == free.tokens[1, :first_eos].tolist()


def other_family(family: str):
    torch.manual_seed(0)
    ids = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    if family == "gpt2":  # learned positions
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                          n_positions=64, **ids)).eval()
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **ids)
    if family == "gemma2":  # a sliding window shorter than prompt + generation
        return Gemma2ForCausalLM(Gemma2Config(head_dim=8, sliding_window=4, **sizes)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "qwen2"])
def test_greedy_equals_hf_generate_for_other_families(family, batch):
    model, (ids, mask) = other_family(family), batch
    out = generate(model, ids, mask, Sampling(max_new_tokens=10), eos_token_id=None,
                   pad_token_id=PAD)
    assert out.tokens.tolist() == _hf_greedy(model, ids, mask, 10, eos=None).tolist()


def test_padded_rows_continue_as_they_would_alone(model, batch):
    ids, mask = batch
    together = generate(model, ids, mask, Sampling(max_new_tokens=6), eos_token_id=None,
                        pad_token_id=PAD)
    for row in range(ids.shape[0]):
        alone = ids[row, mask[row].bool()][None]
        single = generate(model, alone, torch.ones_like(alone), Sampling(max_new_tokens=6),
                          eos_token_id=None, pad_token_id=PAD)
        assert single.tokens[0].tolist() == together.tokens[row].tolist()


def test_cached_logits_equal_a_full_forward(model, batch):
    ids, mask = batch
    out = generate(model, ids, mask, Sampling(max_new_tokens=5), eos_token_id=None,
                   pad_token_id=PAD, output_logits=True, output_logprobs=True)
    full_ids, full_mask = out.sequences()
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask,
                       position_ids=positions).logits
    p, n = ids.shape[1], out.tokens.shape[1]
    expected = logits[:, p - 1:p - 1 + n]  # the logits that predicted each new token
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-4)
    picked = expected.log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, picked, atol=1e-4, rtol=1e-4)
    assert (out.sample_logprobs == 0).all()  # greedy: a point mass


def test_warp_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # Mass before 0.15 is 0.8 >= 0.7: keep {0.5, 0.3}, renormalised.
    probs = sampling_probs(logits, Sampling(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # Mass before 0.3 is 0.5 >= 0.5: only the top token.
    probs = sampling_probs(logits, Sampling(temperature=1.0, top_p=0.5))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    probs = sampling_probs(logits, Sampling(temperature=1.0, top_k=3))
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    # T = 2: softmax(log p / 2) ∝ sqrt(p).
    root = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    probs = sampling_probs(logits, Sampling(temperature=2.0))
    torch.testing.assert_close(probs, root / root.sum())
    with pytest.raises(ValueError, match="greedy"):
        warp_logits(logits, Sampling())


@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)])
def test_warp_matches_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3)) * 2
    ours = warp_logits(logits, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))
    hf = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        hf = TopKLogitsWarper(top_k)(None, hf)
    if top_p < 1:
        hf = TopPLogitsWarper(top_p)(None, hf)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    torch.testing.assert_close(ours.softmax(-1), hf.softmax(-1))


def test_sampling_frequencies_follow_the_model(model):
    """One sampled step from 4000 copies of a prompt: frequencies within 5 standard errors."""
    rows = 4000
    ids = torch.tensor([[1, 5, 9]]).repeat(rows, 1)
    sampling = Sampling(max_new_tokens=1, temperature=1.0)
    out = generate(model, ids, torch.ones_like(ids), sampling, eos_token_id=None,
                   pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = model(ids[:1]).logits[0, -1].softmax(-1)
    freq = torch.bincount(out.tokens[:, 0], minlength=VOCAB).float() / rows
    stderr = (probs * (1 - probs) / rows).sqrt()
    assert ((freq - probs).abs() <= 5 * stderr + 1e-3).all()


def test_sampling_is_seeded_and_logprobs_are_consistent(model, batch):
    ids, mask = batch
    sampling = Sampling(max_new_tokens=8, temperature=1.0)

    def run(seed):
        return generate(model, ids, mask, sampling, eos_token_id=2, pad_token_id=PAD,
                        generator=torch.Generator().manual_seed(seed), output_logprobs=True)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    # At T = 1 without filters the sampling distribution is the model's own.
    live = a.mask
    torch.testing.assert_close(a.sample_logprobs[live], a.logprobs[live])
    assert (a.sample_logprobs[~live] == 0).all()


def test_top_k_one_sampling_is_greedy(model, batch):
    ids, mask = batch
    greedy = generate(model, ids, mask, Sampling(max_new_tokens=6), eos_token_id=None,
                      pad_token_id=PAD)
    sampled = generate(model, ids, mask, Sampling(max_new_tokens=6, temperature=1.0, top_k=1),
                       eos_token_id=None, pad_token_id=PAD,
                       generator=torch.Generator().manual_seed(1), output_logprobs=True)
    assert torch.equal(greedy.tokens, sampled.tokens)
    assert (sampled.sample_logprobs == 0).all()


def test_teacher_mixed_sampling_endpoints(model, batch):
    ids, mask = batch
    other = tiny_llama(1)
    sampling = Sampling(max_new_tokens=6, temperature=1.0)

    def run(policy, **kw):
        return generate(policy, ids, mask, sampling, eos_token_id=None, pad_token_id=PAD,
                        generator=torch.Generator().manual_seed(5), output_logprobs=True, **kw)

    # α = 1 draws from the mix model alone (same generator state, same probabilities).
    mixed = run(model, mix_model=other, mix_alpha=1.0)
    alone = run(other)
    assert torch.equal(mixed.tokens, alone.tokens)
    torch.testing.assert_close(mixed.sample_logprobs, alone.logprobs)
    # α = 0 draws from the policy alone; logprobs are always the policy's.
    assert torch.equal(run(model, mix_model=other, mix_alpha=0.0).tokens, run(model).tokens)
    assert not torch.allclose(mixed.logprobs, mixed.sample_logprobs)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate(model, ids, mask, Sampling(), eos_token_id=None, pad_token_id=PAD,
                 mix_model=other, mix_alpha=0.2)


def test_sampling_validation():
    assert Sampling.from_config({"max_new_tokens": 9, "temperature": 0.5, "top_k": 3,
                                 "top_p": 0.9}) == Sampling(9, 0.5, 3, 0.9)
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"max_new_tokens": 0}, {"top_k": -2}):
        with pytest.raises(ValueError):
            Sampling(**bad)
    assert math.isclose(Sampling.from_config({}).top_p, 1.0)
