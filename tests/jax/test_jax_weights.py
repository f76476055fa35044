"""HF folders in and out: JAX-saved students load in transformers; errors name the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from kdspec_jax.model import JaxModelConfig, forward, init_params
from kdspec_jax.weights import (
    copy_tokenizer,
    hf_layer_names,
    load_hf,
    read_safetensors,
    save_hf,
    to_hf_state_dict,
)

_forward = jax.jit(forward, static_argnums=1)

LLAMA = JaxModelConfig(
    model_type="llama", vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=4,
)
QWEN2 = JaxModelConfig.from_hf({
    "model_type": "qwen2", "vocab_size": 48, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
})
GEMMA2 = JaxModelConfig.from_hf({
    "model_type": "gemma2", "vocab_size": 48, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
    "sliding_window": 3, "query_pre_attn_scalar": 6, "attn_logit_softcapping": 4.0,
    "final_logit_softcapping": 6.0,
})
CONFIGS = {"llama": LLAMA, "qwen2": QWEN2, "gemma2": GEMMA2}


def _random_params(config: JaxModelConfig, seed: int = 0) -> dict:
    """Fresh params with every leaf perturbed (norms and biases start constant)."""
    params = init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [w + 0.2 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 48, (2, 10))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_folder_loads_in_transformers(name: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = CONFIGS[name]
    params = _random_params(config)
    save_hf(params, config, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(model).__name__ == config.to_hf()["architectures"][0]
    ids = _ids()
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(_forward(params, config, jnp.asarray(ids)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_exact(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    params = _random_params(config, seed=3)
    save_hf(params, config, tmp_path)
    loaded_config, loaded = load_hf(tmp_path)
    assert loaded_config == config
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tensor_names_and_layouts_are_transformers(tmp_path: Path) -> None:
    """Names and [out, in] layouts by hand for Gemma 2, whose norm names are the trap: its
    post_attention_layernorm normalises the attention output, pre_feedforward_layernorm is
    the MLP's input norm; tied, so no lm_head."""
    params = _random_params(GEMMA2)
    save_hf(params, GEMMA2, tmp_path)
    tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    assert tensors["model.layers.2.self_attn.q_proj.weight"].shape == (32, 16)
    assert tensors["model.layers.2.self_attn.k_proj.weight"].shape == (8, 16)
    assert tensors["model.layers.0.self_attn.o_proj.weight"].shape == (16, 32)
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (16, 24)
    np.testing.assert_array_equal(
        tensors["model.layers.1.post_attention_layernorm.weight"],
        np.asarray(params["layers"]["attn_post_norm"][1]),
    )
    np.testing.assert_array_equal(
        tensors["model.layers.1.pre_feedforward_layernorm.weight"],
        np.asarray(params["layers"]["mlp_norm"][1]),
    )
    assert len(tensors) == 2 + 3 * 11  # embed + final norm, 11 per layer (7 matrices, 4 norms)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert config["sliding_window"] == 3
    assert hf_layer_names(LLAMA)["mlp_norm"] == "post_attention_layernorm.weight"


def test_base_config_keeps_token_ids(tmp_path: Path) -> None:
    base = {"model_type": "llama", "eos_token_id": 7, "bos_token_id": 5, "hidden_size": 999,
            "rope_theta": 1.0}
    save_hf(_random_params(LLAMA), LLAMA, tmp_path, base_config=base)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (7, 5)
    assert config["hidden_size"] == 16  # the architecture always comes from the JAX config
    assert "rope_theta" not in config  # superseded by rope_parameters


def test_tokenizer_files_are_copied(tmp_path: Path) -> None:
    source = tmp_path / "tok"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    (source / "tokenizer_config.json").write_text("{}")
    (source / "unrelated.bin").write_text("x")
    out = save_hf(_random_params(LLAMA), LLAMA, tmp_path / "model", tokenizer_dir=source)
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "tokenizer_config.json").exists()
    assert not (out / "unrelated.bin").exists()
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        copy_tokenizer(tmp_path / "empty", tmp_path / "elsewhere")
    assert copy_tokenizer(source, tmp_path / "new") == ["tokenizer.json", "tokenizer_config.json"]


def _write(folder: Path, tensors: dict, config: JaxModelConfig) -> None:
    folder.mkdir(exist_ok=True)
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf()))


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    tensors = to_hf_state_dict(_random_params(LLAMA), LLAMA)
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    _write(tmp_path / "a", missing, LLAMA)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        load_hf(tmp_path / "a")
    _write(tmp_path / "b", {**tensors, "model.layers.0.extra.weight": np.ones(2, np.float32)},
           LLAMA)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.extra\.weight"):
        load_hf(tmp_path / "b")
    wrong = {**tensors, "model.norm.weight": np.ones(3, np.float32)}
    _write(tmp_path / "c", wrong, LLAMA)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        load_hf(tmp_path / "c")


def test_tied_checkpoint_with_lm_head_copy_loads(tmp_path: Path) -> None:
    """Some exporters write lm_head.weight even when tied; it is the embedding, so ignored."""
    tensors = to_hf_state_dict(_random_params(GEMMA2), GEMMA2)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    _write(tmp_path, tensors, GEMMA2)
    _, params = load_hf(tmp_path)
    assert "lm_head" not in params


def test_bf16_reader_matches_safetensors_layout(tmp_path: Path) -> None:
    """The header reader, used for bf16 files, against a file written by safetensors itself."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    values = torch.tensor([[1.5, -2.25, 3.0], [0.0, 1e-3, -7.0]])
    save_file({"w": values.to(torch.bfloat16), "i": torch.arange(4)}, str(tmp_path / "x.st"))
    read = read_safetensors(tmp_path / "x.st")
    np.testing.assert_array_equal(read["w"].astype(np.float32),
                                  values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(read["i"], np.arange(4))


def test_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA.to_hf()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)
