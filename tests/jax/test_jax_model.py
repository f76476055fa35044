"""The JAX model's pieces against hand-computed values and invariances (no torch needed)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdspec_jax import model as m
from kdspec_jax.model import JaxModelConfig, RopeConfig, forward, init_params

_forward = jax.jit(forward, static_argnums=1, static_argnames=("remat", "compute_dtype"))

BASE = JaxModelConfig(
    model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=4,
)


def _perturbed(config: JaxModelConfig, seed: int = 0) -> dict:
    params = init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [w + 0.3 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys,
                                                                             strict=True)]
    )


def _ids(batch: int = 2, seq: int = 9, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 40, (batch, seq)))


def test_rms_norm_by_hand() -> None:
    x = jnp.array([[3.0, 4.0]])  # mean of squares 12.5
    w = jnp.array([2.0, 0.5])
    got = m.rms_norm(x, w, eps=0.0, plus_one=False)
    np.testing.assert_allclose(got, [[3 / math.sqrt(12.5) * 2, 4 / math.sqrt(12.5) * 0.5]],
                               rtol=1e-6)
    gemma = m.rms_norm(x, w, eps=0.0, plus_one=True)  # scales by 1 + w
    np.testing.assert_allclose(gemma, [[3 / math.sqrt(12.5) * 3, 4 / math.sqrt(12.5) * 1.5]],
                               rtol=1e-6)


def test_softcap_by_hand() -> None:
    np.testing.assert_allclose(m._softcap(jnp.array([0.0, 10.0, -1e6]), 5.0),
                               [0.0, 5 * math.tanh(2.0), -5.0], rtol=1e-6)
    assert m._softcap(jnp.array(7.0), None) == 7.0


def test_rope_by_hand() -> None:
    """hd = 4, θ = 100: frequencies 1 and 1/10; dims (0, 2) and (1, 3) rotate as pairs."""
    np.testing.assert_allclose(m.rope_inv_freq(RopeConfig(theta=100.0), 4), [1.0, 0.1])
    config = BASE.with_(rope=RopeConfig(theta=100.0))
    cos, sin = m._rope_tables(config, jnp.array([[3]]))
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    got = m._apply_rope(x, cos, sin).ravel()
    c0, s0, c1, s1 = math.cos(3), math.sin(3), math.cos(0.3), math.sin(0.3)
    expected = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_rope_scores_depend_only_on_distance() -> None:
    config = BASE.with_(head_dim=8)
    q, k = jax.random.normal(jax.random.key(1), (2, 8))

    def score(pq: int, pk: int) -> float:
        cos, sin = m._rope_tables(config, jnp.array([[pq, pk]]))
        rq = m._apply_rope(q.reshape(1, 1, 1, 8), cos[:, :1], sin[:, :1])
        rk = m._apply_rope(k.reshape(1, 1, 1, 8), cos[:, 1:], sin[:, 1:])
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_llama3_rope_bands_by_hand() -> None:
    """N = 16, low 1, high 4, factor 8: wavelength > 16 → f/8, < 4 → f, else blended."""
    rope = RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=16)
    base = m.rope_inv_freq(RopeConfig(theta=10000.0), 8).astype(np.float64)
    got = m.rope_inv_freq(rope, 8)
    wavelen = 2 * np.pi / base  # 6.28, 62.8, 628, 6283
    s = (16 / wavelen[0] - 1.0) / 3.0  # 6.28 is between 4 and 16: blended
    assert got[0] == pytest.approx((1 - s) * base[0] / 8 + s * base[0], rel=1e-6)
    np.testing.assert_allclose(got[1:], base[1:] / 8, rtol=1e-6)


def test_attention_mask_pattern() -> None:
    pos = jnp.arange(5)[None]
    full = m._attention_mask(pos, pos, jnp.ones((1, 5), bool), jnp.int32(10**6))[0]
    np.testing.assert_array_equal(full, np.tril(np.ones((5, 5), bool)))
    window = m._attention_mask(pos, pos, jnp.ones((1, 5), bool), jnp.int32(2))[0]
    # Query t reads keys t-1 and t (window 2 includes the query itself, as in transformers).
    np.testing.assert_array_equal(window, np.tril(np.ones((5, 5), bool)) & ~np.tril(
        np.ones((5, 5), bool), k=-2))
    padded = m._attention_mask(pos, pos, jnp.array([[1, 1, 1, 0, 0]], bool), jnp.int32(10**6))[0]
    assert not padded[:, 3:].any()


def test_gqa_equals_attention_with_repeated_kv_heads() -> None:
    """K = 2 kv heads shared by 4 query heads = 4 kv heads where heads 2k, 2k+1 copy kv head k
    (transformers' repeat_kv order)."""
    params = _perturbed(BASE)
    mha = BASE.with_(num_kv_heads=4)
    layers = dict(params["layers"])
    for name in ("k_proj", "v_proj"):
        w = layers[name].reshape(BASE.num_layers, 2, 1, BASE.head_dim, BASE.hidden_size)
        layers[name] = jnp.repeat(w, 2, axis=2).reshape(BASE.num_layers, 16, 16)
    ids = _ids()
    np.testing.assert_allclose(_forward({**params, "layers": layers}, mha, ids),
                               _forward(params, BASE, ids), atol=1e-5)


def test_causal_future_tokens_do_not_change_the_past() -> None:
    params = _perturbed(BASE)
    ids = _ids()
    changed = ids.at[:, 6:].set((ids[:, 6:] + 1) % 40)
    a, b = _forward(params, BASE, ids), _forward(params, BASE, changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3


def test_sliding_window_forgets_tokens_outside_it() -> None:
    """One layer with window 3: position 8 reads positions 6-8 only, so position 4 is
    invisible to it (two layers would see further, through position 6)."""
    config = BASE.with_(num_layers=1, layer_windows=(3,))
    params = _perturbed(config)
    ids = _ids()
    changed = ids.at[:, 4].set((ids[:, 4] + 1) % 40)
    a, b = _forward(params, config, ids), _forward(params, config, changed)
    np.testing.assert_allclose(a[:, 7:], b[:, 7:], atol=1e-6)
    assert np.abs(np.asarray(a[:, 4:7] - b[:, 4:7])).max() > 1e-3


def test_remat_gives_the_same_logits_and_gradients() -> None:
    params = _perturbed(BASE)
    ids = _ids()

    def loss(p: dict, remat: bool) -> jax.Array:
        return jnp.mean(forward(p, BASE, ids, remat=remat) ** 2)

    g0 = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
    g1 = jax.jit(jax.grad(lambda p: loss(p, True)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_is_close_to_fp32() -> None:
    params = _perturbed(BASE)
    ids = _ids()
    fp32 = _forward(params, BASE, ids)
    bf16 = _forward(params, BASE, ids, compute_dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    assert params["embed_tokens"].dtype == jnp.float32  # the caller's weights stay fp32
    err = float(jnp.abs(bf16 - fp32).max())
    assert 0 < err < 0.1 * float(jnp.abs(fp32).max())


def test_init_params() -> None:
    gemma = JaxModelConfig.from_hf({
        "model_type": "gemma2", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 8,
    })
    params = init_params(gemma, jax.random.key(0))
    assert "lm_head" not in params  # Gemma 2 ties its head by default
    assert float(jnp.abs(params["layers"]["attn_post_norm"]).max()) == 0.0  # 1 + w = 1
    llama = init_params(BASE, jax.random.key(0))
    assert float(llama["norm"].min()) == float(llama["norm"].max()) == 1.0
    assert llama["layers"]["q_proj"].shape == (2, 16, 16)
    assert llama["layers"]["k_proj"].shape == (2, 8, 16)
    assert float(jnp.std(llama["embed_tokens"])) == pytest.approx(0.02, rel=0.15)
    shapes = jax.tree_util.tree_map(jnp.shape, llama)
    expected = m.param_shapes(BASE)
    assert shapes == expected


def test_decay_mask_selects_matrices() -> None:
    mask = m.decay_mask(init_params(BASE.with_(qkv_bias=True), jax.random.key(0)))
    assert mask["embed_tokens"] and mask["lm_head"] and mask["layers"]["q_proj"]
    assert not mask["norm"] and not mask["layers"]["attn_norm"]
    assert not mask["layers"]["q_bias"]  # [L, out]: a vector per layer


HF_LLAMA = {
    "model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
}


def test_config_from_hf_defaults_and_old_rope_keys() -> None:
    old = JaxModelConfig.from_hf({**HF_LLAMA, "rope_theta": 500000.0,
                                  "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert old.rope == RopeConfig(theta=500000.0, rope_type="linear", factor=2.0)
    assert old.head_dim == 4 and not old.tie_word_embeddings
    gemma = JaxModelConfig.from_hf({**HF_LLAMA, "model_type": "gemma2", "head_dim": 8})
    assert gemma.layer_windows == (4096, None)  # sliding on even layers
    assert gemma.query_scale == 256**-0.5
    assert (gemma.attn_logit_softcap, gemma.final_logit_softcap) == (50.0, 30.0)
    qwen = JaxModelConfig.from_hf({**HF_LLAMA, "model_type": "qwen2", "use_sliding_window": True,
                                   "sliding_window": 8, "max_window_layers": 1})
    assert qwen.layer_windows == (None, 8) and qwen.qkv_bias and not qwen.o_bias
    assert JaxModelConfig.from_hf({**HF_LLAMA, "model_type": "qwen2"}).layer_windows == (
        None, None)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_config_round_trips_through_hf(model_type: str) -> None:
    config = JaxModelConfig.from_hf({**HF_LLAMA, "model_type": model_type})
    assert JaxModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type 'yarn'"),
        ({"hidden_act": "relu"}, "activation 'relu'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ],
)
def test_config_errors_name_the_problem(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JaxModelConfig.from_hf({**HF_LLAMA, **change})
