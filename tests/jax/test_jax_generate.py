"""KV-cache decoding and greedy generation: the cached forward equals the full forward, and
greedy generations equal the torch backend's on the same HF checkpoint."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdspec_jax.data import load_tokenizer
from kdspec_jax.generate import encode_prompts, generate_text, greedy_generate, left_pad
from kdspec_jax.model import JaxModelConfig, forward, forward_cached, init_kv_cache, init_params

GEMMA = JaxModelConfig(
    model_type="gemma2", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3,
    num_heads=4, num_kv_heads=2, head_dim=8, hidden_act="gelu_pytorch_tanh", embed_scale=True,
    norm_plus_one=True, sandwich_norms=True, query_pre_attn_scalar=12, attn_logit_softcap=3.0,
    final_logit_softcap=5.0, layer_windows=(3, None, 3))
LLAMA = JaxModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)

_forward = jax.jit(forward, static_argnums=1)
_cached = jax.jit(forward_cached, static_argnums=1)


def _params(config: JaxModelConfig) -> dict:
    """Random weights with every parameter (norms too) perturbed."""
    params = init_params(config, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys,
                                                                               strict=True)]
    return jax.tree_util.tree_unflatten(tree, noisy)


WIDTH = 16  # every reference forward runs on rows right-padded to this: one compilation


def _full_logits(params: dict, config: JaxModelConfig, rows: list[list[int]]) -> np.ndarray:
    """The full (uncached) forward over each row, right-padded to WIDTH: under the causal mask
    padding after a position never changes that position's logits."""
    ids = np.zeros((len(rows), WIDTH), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return np.asarray(_forward(params, config, jnp.asarray(ids)))


@pytest.mark.parametrize("config", [LLAMA, GEMMA], ids=["llama", "gemma2"])
def test_cached_decoding_equals_the_full_forward_per_row(config: JaxModelConfig) -> None:
    """A left-padded prefill and one-token steps give, for every row, the logits of the full
    forward over that row alone (Gemma 2's window of 3 is shorter than the sequences)."""
    params = _params(config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50, n).tolist() for n in (3, 6, 1)]
    ids, mask = left_pad(prompts, pad_id=0)
    width, steps = ids.shape[1], 4
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = init_kv_cache(config, len(prompts), width + steps)
    logits, cache = _cached(params, config, cache, ids, positions, mask, 0)
    rows, cached = [list(p) for p in prompts], []
    for step in range(steps):
        cached.append(np.asarray(logits))
        token = np.asarray(jnp.argmax(logits, axis=-1))
        rows = [row + [int(t)] for row, t in zip(rows, token, strict=True)]
        position = np.asarray([[len(row) - 1] for row in rows])
        logits, cache = _cached(params, config, cache, token[:, None], position,
                                np.ones((3, 1), bool), width + step)
    full = _full_logits(params, config, rows)
    for i, prompt in enumerate(prompts):
        for step in range(steps):
            np.testing.assert_allclose(cached[step][i], full[i, len(prompt) - 1 + step],
                                       atol=2e-5, err_msg=f"row {i}, step {step}")


def test_greedy_generate_stops_rows_at_eos() -> None:
    """Rows end at their own eos (not returned); others run to max_new_tokens. The expected
    tokens come from argmax over the full forward, one token at a time."""
    params = _params(LLAMA)
    prompts = [[5, 7, 9], [11], [2, 3, 4, 5, 6]]

    def reference(seq: list[int], eos: int, n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            token = int(np.argmax(_full_logits(params, LLAMA, [seq + out])[0, len(seq + out) - 1]))
            if token == eos:
                break
            out.append(token)
        return out

    free = [reference(p, eos=-1, n=6) for p in prompts]
    eos = free[0][2]  # row 0 stops before this token; the others may stop earlier too
    ids, mask = left_pad(prompts, pad_id=0)
    got = greedy_generate(params, LLAMA, ids, mask, max_new_tokens=6, eos_id=eos, pad_id=0)
    assert got == [reference(p, eos=eos, n=6) for p in prompts]
    assert got[0] == free[0][: free[0].index(eos)] and len(got[2]) <= 6


def test_generation_matches_the_torch_backend(tmp_path: Path) -> None:
    """The same HF checkpoint and prompts: the JAX greedy texts equal kdspec_torch's
    `generate_text` (prompt encoding, left truncation, eos handling and decoding included)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch_generate = pytest.importorskip("kdspec_torch.generate")
    from jax_helpers import build_hf_model, hf_config

    from kdspec_jax.weights import load_hf

    tokenizer = load_tokenizer("builtin:words", spec_dir=tmp_path, work_dir=tmp_path / "tok")
    tokenizer.save(tmp_path / "model")
    ids = tokenizer.token_ids()
    hf = hf_config("llama", vocab_size=len(tokenizer), initializer_range=0.2, **ids)
    model = build_hf_model(hf)
    model.save_pretrained(tmp_path / "model")
    config, params = load_hf(tmp_path / "model")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    prompts = ["the cat sat on the mat .", "3 + 4 = 7", "what is 2 + 2 ?", "a b"]
    sampling = torch_generate.Sampling(max_new_tokens=7)
    with torch.no_grad():
        expected = torch_generate.generate_text(model, hf_tokenizer, prompts, sampling,
                                                batch_size=3, max_prompt_tokens=5)
    got = generate_text(params, config, tokenizer, prompts, max_new_tokens=7, batch_size=3,
                        max_prompt_tokens=5)
    assert got == expected
    assert any(text for text in got)
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens=5)
    assert encoded[1] == tokenizer.encode(["3 + 4 = 7"])[0][-5:]  # bos cut off by truncation
    assert encoded[3][0] == tokenizer.bos_id
