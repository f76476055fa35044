"""The JAX model against transformers: the same checkpoint gives the same logits (fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax_helpers import build_hf_model, hf_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from kdspec_jax.model import JaxModelConfig, forward  # noqa: E402
from kdspec_jax.weights import load_hf  # noqa: E402

TOL = 1e-4
SEQ = 12  # longer than the Gemma 2 sliding window (4), so the window changes the logits

_forward = jax.jit(forward, static_argnums=1)


def _torch_logits(model: Any, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(ids), **kwargs).logits.numpy()


def _ids(seed: int = 0, batch: int = 2, seq: int = SEQ) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, (batch, seq)).astype(np.int64)


def _saved(model: Any, tmp_path: Path, **save_kwargs: Any) -> tuple[JaxModelConfig, Any]:
    model.save_pretrained(tmp_path, **save_kwargs)
    return load_hf(tmp_path)


CASES = {
    "llama": ("llama", {}),
    "llama_tied_biases": (
        "llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}
    ),
    "llama3_rope": (
        "llama",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}},
    ),
    "llama_mha": ("llama", {"num_key_value_heads": 4}),
    "qwen2": ("qwen2", {}),
    "gemma2": ("gemma2", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    model_type, overrides = CASES[case]
    model = build_hf_model(hf_config(model_type, **overrides))
    config, params = _saved(model, tmp_path)
    ids = _ids()
    expected = _torch_logits(model, ids)
    got = np.asarray(_forward(params, config, jnp.asarray(ids)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_gemma2_features_each_change_the_logits(tmp_path: Path) -> None:
    """The parity above would not notice a Gemma 2 feature that has no effect on these tiny
    models: turning each off in the JAX model must move the logits far past the tolerance."""
    model = build_hf_model(hf_config("gemma2"))
    config, params = _saved(model, tmp_path)
    ids = _ids()
    expected = _torch_logits(model, ids)
    variants = {
        "no sliding window": config.with_(layer_windows=(None,) * config.num_layers),
        "no attention softcap": config.with_(attn_logit_softcap=None),
        "no final softcap": config.with_(final_logit_softcap=None),
        "head_dim scaling": config.with_(query_pre_attn_scalar=None),
        "no embedding scale": config.with_(embed_scale=False),
    }
    for name, variant in variants.items():
        got = np.asarray(_forward(params, variant, jnp.asarray(ids)))
        assert np.abs(got - expected).max() > 100 * TOL, name


def test_padding_mask_matches_transformers(tmp_path: Path) -> None:
    """Right padding: the unpadded positions' logits equal transformers' with the same mask."""
    model = build_hf_model(hf_config("gemma2"))
    config, params = _saved(model, tmp_path)
    ids = _ids(seed=1)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    expected = _torch_logits(model, ids, mask)
    got = np.asarray(_forward(params, config, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)


def test_left_padding_hides_pad_keys(tmp_path: Path) -> None:
    """Left padding (batched generation): transformers masks the pad keys but keeps positions
    0..T-1; so does the JAX model, and changing the pad tokens changes nothing it reads."""
    model = build_hf_model(hf_config("llama"))
    config, params = _saved(model, tmp_path)
    ids = _ids(seed=2)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    expected = _torch_logits(model, ids, mask)
    got = np.asarray(_forward(params, config, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
    other = ids.copy()
    other[1, :5] = (other[1, :5] + 1) % 64
    moved = np.asarray(_forward(params, config, jnp.asarray(other), jnp.asarray(mask)))
    np.testing.assert_allclose(moved[valid], got[valid], atol=1e-6, rtol=0)


def test_sharded_bf16_checkpoint_loads(tmp_path: Path) -> None:
    """A bf16 checkpoint split into shards (how real Llama/Gemma weights ship) loads; in fp32
    it equals transformers' bf16 weights upcast."""
    model = build_hf_model(hf_config("qwen2")).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config, params = load_hf(tmp_path)
    assert params["embed_tokens"].dtype == jnp.float32
    expected = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]), expected)
    q_bias_1 = model.model.layers[1].self_attn.q_proj.bias.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["layers"]["q_bias"][1]), q_bias_1)
    # Reloaded in fp32 rather than model.float(): .to(bf16) also rounded the rotary buffer.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected_logits = _torch_logits(reloaded, _ids())
    got = np.asarray(_forward(params, config, jnp.asarray(_ids())))
    np.testing.assert_allclose(got, expected_logits, atol=TOL, rtol=0)
