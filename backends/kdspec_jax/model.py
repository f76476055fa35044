"""A decoder-only transformer in plain JAX: the Llama family (llama, qwen2) and Gemma 2.

The parameters are a pytree (nested dicts) of arrays; the model is the pure function
:func:`forward`. Weight matrices keep the HuggingFace layout ``[out_features, in_features]``
(``y = x @ W.T``), so loading and saving checkpoints is a renaming, never a transpose. The
decoder layers are stacked along a leading layer axis and run with ``jax.lax.scan``: one layer
is traced and compiled once, whatever the depth.

Pytree (``L`` layers, ``D`` model width, ``H``/``K`` query/key-value heads of width ``hd``,
``F`` MLP width, ``V`` vocabulary)::

    embed_tokens [V, D]
    layers/
        attn_norm [L, D]                    pre-attention RMSNorm
        q_proj [L, H·hd, D]   k_proj, v_proj [L, K·hd, D]   o_proj [L, D, H·hd]
        q_bias [L, H·hd]  k_bias, v_bias [L, K·hd]   (qwen2; llama/gemma2 with attention_bias)
        o_bias [L, D]                       (llama/gemma2 with attention_bias)
        attn_post_norm [L, D]               (gemma2: norm of the attention output)
        mlp_norm [L, D]                     pre-MLP RMSNorm
        gate_proj, up_proj [L, F, D]   down_proj [L, D, F]   (+ *_bias with llama's mlp_bias)
        mlp_post_norm [L, D]                (gemma2: norm of the MLP output)
    norm [D]                                final RMSNorm
    lm_head [V, D]                          absent when the head is tied to embed_tokens

A layer computes (Gemma 2's extra norms in brackets)::

    h = x + [post_norm](Attention(norm(x)))
    y = h + [post_norm](MLP(norm(h)))

with ``RMSNorm(x) = x / sqrt(mean(x²) + eps) · w`` (Gemma: ``· (1 + w)``), rotary position
embeddings on queries and keys, grouped-query attention (query head ``h`` reads key-value head
``h // (H/K)``), ``MLP(x) = down(act(gate(x)) ⊙ up(x))`` with ``act`` SiLU (SwiGLU) or tanh-GeLU
(Gemma), and an optional ``c·tanh(s/c)`` soft cap on attention scores and on the final logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "JaxModelConfig",
    "KVCache",
    "RopeConfig",
    "SUPPORTED_MODEL_TYPES",
    "decay_mask",
    "forward",
    "forward_cached",
    "hidden_states",
    "init_kv_cache",
    "init_params",
    "lm_head_weight",
    "logits_from_hidden",
    "param_shapes",
    "rms_norm",
    "rope_inv_freq",
]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma2")
ModelType = Literal["llama", "qwen2", "gemma2"]
Params = dict[str, Any]

_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_ROPE_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base ``theta`` and an optional frequency rescaling (``rope_type``).

    ``linear`` divides every frequency by ``factor``; ``llama3`` divides only the low
    frequencies (wavelength above ``original_max_position_embeddings / low_freq_factor``) and
    interpolates smoothly between the two bands (Llama 3.1).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> RopeConfig:
        """From a config.json: ``rope_parameters`` (transformers 5) or the older top-level
        ``rope_theta`` + ``rope_scaling``."""
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported by the JAX model "
                f"(supported: {', '.join(_ROPE_TYPES)})"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported by the JAX model")
        extra = {}
        if rope_type in ("linear", "llama3"):
            extra["factor"] = float(params["factor"])
        if rope_type == "llama3":
            extra["low_freq_factor"] = float(params["low_freq_factor"])
            extra["high_freq_factor"] = float(params["high_freq_factor"])
            extra["original_max_position_embeddings"] = int(
                params["original_max_position_embeddings"]
            )
        return cls(theta=float(theta), rope_type=rope_type, **extra)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.rope_type == "llama3":
            out["low_freq_factor"] = self.low_freq_factor
            out["high_freq_factor"] = self.high_freq_factor
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return out


@dataclass(frozen=True)
class JaxModelConfig:
    """The architecture of one model. Frozen and hashable: pass it to ``jax.jit`` as static.

    Build it from a HuggingFace config.json with :meth:`from_hf`; the Gemma 2 features are
    plain fields, so a test can switch one on in a Llama-shaped model.
    """

    model_type: ModelType
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    # Gemma 2 differences
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w); w is stored zero-centred
    sandwich_norms: bool = False  # extra RMSNorms on the attention and MLP outputs
    query_pre_attn_scalar: int | float | None = None  # scores × this**-0.5 (else head_dim's)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_windows: tuple[int | None, ...] = ()  # sliding window per layer; None = full causal

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported by the JAX model "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"activation {self.hidden_act!r} is not supported (supported: "
                f"{', '.join(_ACTIVATIONS)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )

    @property
    def query_scale(self) -> float:
        """The factor on ``q·k``: ``query_pre_attn_scalar**-0.5`` (Gemma 2), else
        ``head_dim**-0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> JaxModelConfig:
        """From a HuggingFace config.json dict (``model_type`` llama, qwen2 or gemma2).

        Missing keys take the defaults of the transformers 5 config class of that family.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported by the JAX model "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        layers = int(hf["num_hidden_layers"])
        common = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(hf),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        if model_type == "llama":
            bias = bool(hf.get("attention_bias", False))
            return cls(
                **common,
                hidden_act=hf.get("hidden_act", "silu"),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=bias,
                o_bias=bias,
                mlp_bias=bool(hf.get("mlp_bias", False)),
            )
        if model_type == "qwen2":
            return cls(
                **common,
                hidden_act=hf.get("hidden_act", "silu"),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=True,  # qwen2 always has q/k/v biases and no o_proj bias
                layer_windows=_qwen2_windows(hf, layers),
            )
        if hf.get("use_bidirectional_attention"):
            raise ValueError("gemma2 with use_bidirectional_attention is not supported")
        bias = bool(hf.get("attention_bias", False))
        return cls(
            **common,
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            qkv_bias=bias,
            o_bias=bias,
            embed_scale=True,
            norm_plus_one=True,
            sandwich_norms=True,
            query_pre_attn_scalar=_int_if_integral(hf.get("query_pre_attn_scalar", 256)),
            attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping", 50.0)),
            final_logit_softcap=_optional_float(hf.get("final_logit_softcapping", 30.0)),
            layer_windows=_gemma2_windows(hf, layers),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json keys transformers needs to rebuild this architecture."""
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "dtype": "float32",
        }
        if self.model_type == "qwen2":
            self._check_qwen2_exportable()
            out["hidden_act"] = self.hidden_act
            windows = {w for w in self.layer_windows if w is not None}
            out["use_sliding_window"] = bool(windows)
            out["sliding_window"] = windows.pop() if windows else None
            out["layer_types"] = _layer_types(self.layer_windows)
            return out
        out["head_dim"] = self.head_dim
        out["attention_bias"] = self.qkv_bias
        if self.qkv_bias != self.o_bias:
            raise ValueError(f"{self.model_type} has one attention_bias for q, k, v and o")
        if self.model_type == "llama":
            out["hidden_act"] = self.hidden_act
            out["mlp_bias"] = self.mlp_bias
            if any(w is not None for w in self.layer_windows):
                raise ValueError("llama has no sliding-window layers")
            return out
        windows = {w for w in self.layer_windows if w is not None}
        if len(windows) > 1:
            raise ValueError(f"gemma2 has one sliding_window size, got {sorted(windows)}")
        out.update(
            hidden_activation=self.hidden_act,
            query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
            attn_logit_softcapping=self.attn_logit_softcap,
            final_logit_softcapping=self.final_logit_softcap,
            sliding_window=windows.pop() if windows else self.max_position_embeddings,
            layer_types=_layer_types(self.layer_windows),
        )
        return out

    def _check_qwen2_exportable(self) -> None:
        if not self.qkv_bias or self.o_bias or self.mlp_bias:
            raise ValueError("qwen2 has q/k/v biases and no o_proj or MLP biases")
        if self.head_dim != self.hidden_size // self.num_heads:
            raise ValueError("qwen2 fixes head_dim = hidden_size / num_attention_heads")
        if len({w for w in self.layer_windows if w is not None}) > 1:
            raise ValueError("qwen2 has one sliding_window size")

    def with_(self, **changes: Any) -> JaxModelConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}


def _int_if_integral(value: Any) -> int | float:
    # transformers' strict Gemma2Config types query_pre_attn_scalar as int and rejects 6.0.
    return int(value) if float(value).is_integer() else float(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _layer_types(windows: tuple[int | None, ...]) -> list[str]:
    return ["full_attention" if w is None else "sliding_attention" for w in windows]


def _windows_from_types(types: list[str], window: int | None) -> tuple[int | None, ...]:
    known = {"full_attention", "sliding_attention"}
    if not set(types) <= known:
        raise ValueError(f"layer_types must be full_attention/sliding_attention, got {types}")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _gemma2_windows(hf: Mapping[str, Any], layers: int) -> tuple[int | None, ...]:
    """Gemma 2 alternates sliding (even layers) and global attention unless ``layer_types``
    says otherwise; ``sliding_window: null`` makes every layer global."""
    window = hf.get("sliding_window", 4096)
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)
    ]
    return _windows_from_types(list(types), None if window is None else int(window))


def _qwen2_windows(hf: Mapping[str, Any], layers: int) -> tuple[int | None, ...]:
    """Qwen2 slides only with ``use_sliding_window`` (and then from ``max_window_layers`` on)."""
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    if window is None:
        return (None,) * layers
    first = int(hf.get("max_window_layers", 28))
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(layers)
    ]
    return _windows_from_types(list(types), int(window))


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def param_shapes(config: JaxModelConfig) -> Params:
    """The shape of every parameter, as the same nested dict as the params."""
    c = config
    d, f, L = c.hidden_size, c.intermediate_size, c.num_layers
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layers: dict[str, tuple[int, ...]] = {
        "attn_norm": (L, d),
        "q_proj": (L, q, d),
        "k_proj": (L, kv, d),
        "v_proj": (L, kv, d),
        "o_proj": (L, d, q),
        "mlp_norm": (L, d),
        "gate_proj": (L, f, d),
        "up_proj": (L, f, d),
        "down_proj": (L, d, f),
    }
    if c.qkv_bias:
        layers.update(q_bias=(L, q), k_bias=(L, kv), v_bias=(L, kv))
    if c.o_bias:
        layers["o_bias"] = (L, d)
    if c.mlp_bias:
        layers.update(gate_bias=(L, f), up_bias=(L, f), down_bias=(L, d))
    if c.sandwich_norms:
        layers.update(attn_post_norm=(L, d), mlp_post_norm=(L, d))
    shapes: Params = {"embed_tokens": (c.vocab_size, d), "layers": layers, "norm": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, d)
    return shapes


def _is_norm(name: str) -> bool:
    return name == "norm" or name.endswith("_norm")


def init_params(config: JaxModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Fresh parameters as transformers initialises these families: matrices from
    ``N(0, initializer_range²)``, biases 0, norm scales 1 (Gemma: 0, since it scales by 1 + w)."""
    shapes = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys, strict=True):
        name = path[-1].key
        if _is_norm(name):
            fill = 0.0 if config.norm_plus_one else 1.0
            leaves.append(jnp.full(shape, fill, dtype))
        elif name.endswith("_bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append(config.initializer_range * jax.random.normal(k, shape, dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def decay_mask(params: Params) -> Params:
    """True for the weight matrices (embeddings, head, projections), False for norm scales and
    biases: weight decay applies to matrices only, as in the torch backend. A leaf under
    ``layers`` has one extra leading (layer) axis, so its own rank is ``ndim - 1``."""

    def is_matrix(path: tuple[Any, ...], leaf: Any) -> bool:
        stacked = any(getattr(k, "key", None) == "layers" for k in path)
        return jnp.ndim(leaf) - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def lm_head_weight(params: Params, config: JaxModelConfig) -> jax.Array:
    """The output projection ``[V, D]``: the embedding matrix when tied."""
    return params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float, plus_one: bool) -> jax.Array:
    """``x / sqrt(mean(x²) + eps) · w`` over the last dim (``· (1 + w)`` when ``plus_one``),
    computed in fp32 and returned in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = weight.astype(jnp.float32)
    if plus_one:
        scale = 1.0 + scale
    return (normed * scale).astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies ``θ^(-2i/hd)`` for ``i < hd/2``, rescaled by the rope type.

    llama3: with wavelength ``λ = 2π/f``, ``λ_low = N/low_freq_factor`` and
    ``λ_high = N/high_freq_factor`` (``N`` the original context): ``f/factor`` where
    ``λ > λ_low``, ``f`` where ``λ < λ_high``, and in between
    ``(1 − s)·f/factor + s·f`` with ``s = (N/λ − low_freq_factor)/(high − low)``.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        n = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = n / rope.low_freq_factor
        high_wavelen = n / rope.high_freq_factor
        smooth = (n / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > low_wavelen,
            inv_freq / rope.factor,
            np.where(wavelen < high_wavelen, inv_freq, blended),
        )
    return inv_freq.astype(np.float32)


def _rope_tables(
    config: JaxModelConfig, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` ``[B, T, hd]`` (each frequency repeated for both halves)."""
    inv_freq = jnp.asarray(rope_inv_freq(config.rope, config.head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, hd]``: ``x·cos + rotate_half(x)·sin`` with
    ``rotate_half([a, b]) = [−b, a]`` (the half-split pairing HF checkpoints are laid out for)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap · tanh(x / cap)``: smooth clamp to ``(−cap, cap)``; identity when ``cap`` is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def _linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ W.T + b`` with ``W`` in the HF layout ``[out, in]``."""
    y = jnp.einsum("...i,oi->...o", x, weight)
    return y if bias is None else y + bias


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=True)  # gelu_pytorch_tanh


def _attention_mask(
    q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array, window: jax.Array
) -> jax.Array:
    """``[B, T, S]`` True where a query at position ``q_pos [B, T]`` may read a key at
    ``k_pos [B, S]``: causal (``pos_s ≤ pos_t``), inside the window (``pos_s > pos_t − window``)
    and not padding (``key_valid [B, S]``)."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (k <= q) & (k > q - window)
    return allowed & key_valid[:, None, :]


def _qkv(
    config: JaxModelConfig, p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries ``[B, T, H, hd]`` and keys, values ``[B, T, K, hd]`` of ``x [B, T, D]``, with
    rotary embeddings applied to queries and keys."""
    c = config
    b, t, _ = x.shape
    q = _linear(x, p["q_proj"], p.get("q_bias")).reshape(b, t, c.num_heads, c.head_dim)
    k = _linear(x, p["k_proj"], p.get("k_bias")).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = _linear(x, p["v_proj"], p.get("v_bias")).reshape(b, t, c.num_kv_heads, c.head_dim)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


def _attend(
    config: JaxModelConfig, p: Params, q: jax.Array, k: jax.Array, v: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    """Grouped-query attention of queries ``[B, T, H, hd]`` over keys and values
    ``[B, S, K, hd]`` under ``mask [B, T, S]``, through the output projection: ``[B, T, D]``."""
    c = config
    b, t = q.shape[:2]
    groups = c.num_heads // c.num_kv_heads
    # Query head h = kv_head·groups + g reads kv head h // groups (HF's repeat_kv order).
    q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = _softcap(scores * c.query_scale, c.attn_logit_softcap)
    # A finite fill keeps fully masked rows (queries on left padding) uniform instead of NaN.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, c.num_heads * c.head_dim)
    return _linear(out, p["o_proj"], p.get("o_bias"))


def _attention(
    config: JaxModelConfig,
    p: Params,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    """Grouped-query self-attention of one layer on ``x [B, T, D]``."""
    q, k, v = _qkv(config, p, x, cos, sin)
    return _attend(config, p, q, k, v, mask)


def _mlp(config: JaxModelConfig, p: Params, x: jax.Array) -> jax.Array:
    """``down(act(gate(x)) ⊙ up(x))``."""
    gate = _activation(config.hidden_act, _linear(x, p["gate_proj"], p.get("gate_bias")))
    up = _linear(x, p["up_proj"], p.get("up_bias"))
    return _linear(gate * up, p["down_proj"], p.get("down_bias"))


def _decoder_layer(
    config: JaxModelConfig,
    p: Params,
    x: jax.Array,
    attention: Callable[[jax.Array], tuple[jax.Array, Any]],
) -> tuple[jax.Array, Any]:
    """One pre-norm residual layer (Gemma 2: with the output norms too). ``attention`` maps
    the normed input to the attention output and anything else to return (a KV-cache
    update)."""
    c = config

    def norm(h: jax.Array, name: str) -> jax.Array:
        return rms_norm(h, p[name], eps=c.rms_norm_eps, plus_one=c.norm_plus_one)

    h, extra = attention(norm(x, "attn_norm"))
    if c.sandwich_norms:
        h = norm(h, "attn_post_norm")
    x = x + h
    h = _mlp(c, p, norm(x, "mlp_norm"))
    if c.sandwich_norms:
        h = norm(h, "mlp_post_norm")
    return x + h, extra


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _embed(params: Params, config: JaxModelConfig, input_ids: jax.Array) -> jax.Array:
    x = jnp.take(params["embed_tokens"], input_ids, axis=0)
    if config.embed_scale:
        # Rounded to the weights' dtype first, as transformers does (sqrt(3072) → 55.5 in bf16).
        x = x * jnp.asarray(math.sqrt(config.hidden_size), x.dtype)
    return x


def _windows(config: JaxModelConfig) -> jax.Array:
    """Each layer's attention window ``[L]``. A window wider than any distance is the same as
    none, so every layer can share one scan body."""
    full = np.iinfo(np.int32).max // 2
    return jnp.asarray([full if w is None else w for w in config.layer_windows], jnp.int32)


def hidden_states(
    params: Params,
    config: JaxModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    compute_dtype: Any = None,
    remat: bool = False,
) -> jax.Array:
    """The final-norm hidden states ``[B, T, D]`` of ``input_ids [B, T]``.

    ``attention_mask [B, T]`` (1 = token, 0 = padding) hides padding keys; ``positions``
    default to ``0..T-1`` per row, as transformers' forward does without ``position_ids``.
    ``compute_dtype`` (e.g. ``jnp.bfloat16``) casts the weights for the matmuls; norms,
    attention softmax and rotary embeddings stay fp32. ``remat`` recomputes each layer's
    activations in the backward pass instead of storing them.
    """
    c = config
    b, t = input_ids.shape
    if compute_dtype is not None:
        params = jax.tree_util.tree_map(lambda w: w.astype(compute_dtype), params)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    key_valid = (
        jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    )
    x = _embed(params, c, input_ids)
    cos, sin = _rope_tables(c, positions)
    windows = _windows(c)

    def layer(h: jax.Array, xs: tuple[Params, jax.Array]) -> tuple[jax.Array, None]:
        layer_params, window = xs
        mask = _attention_mask(positions, positions, key_valid, window)

        def attention(normed: jax.Array) -> tuple[jax.Array, None]:
            return _attention(c, layer_params, normed, cos, sin, mask), None

        return _decoder_layer(c, layer_params, h, attention)

    if remat:
        layer = jax.checkpoint(layer)
    x, _ = jax.lax.scan(layer, x, (params["layers"], windows))
    return rms_norm(x, params["norm"], eps=c.rms_norm_eps, plus_one=c.norm_plus_one)


def logits_from_hidden(params: Params, config: JaxModelConfig, hidden: jax.Array) -> jax.Array:
    """``softcap(hidden @ head.T)`` in fp32 ``[..., V]``."""
    head = lm_head_weight(params, config).astype(hidden.dtype)
    logits = jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)
    return _softcap(logits, config.final_logit_softcap)


def forward(
    params: Params,
    config: JaxModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    compute_dtype: Any = None,
    remat: bool = False,
) -> jax.Array:
    """Next-token logits ``[B, T, V]`` (fp32) of ``input_ids [B, T]``; see
    :func:`hidden_states` for the arguments. Pure: ``jax.jit(forward, static_argnums=1)``."""
    hidden = hidden_states(
        params,
        config,
        input_ids,
        attention_mask,
        positions=positions,
        compute_dtype=compute_dtype,
        remat=remat,
    )
    if compute_dtype is not None:
        params = {**params, "embed_tokens": params["embed_tokens"].astype(compute_dtype)}
        if "lm_head" in params:
            params["lm_head"] = params["lm_head"].astype(compute_dtype)
    return logits_from_hidden(params, config, hidden)


# --------------------------------------------------------------------------------------------
# Incremental decoding with a KV cache
# --------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Keys and values of every layer for ``S`` slots per row, with each slot's position and
    whether it holds a real token (False: not written yet, or left padding)."""

    k: jax.Array  # [L, B, S, K, hd]
    v: jax.Array  # [L, B, S, K, hd]
    positions: jax.Array  # [B, S] int32
    valid: jax.Array  # [B, S] bool


def init_kv_cache(config: JaxModelConfig, batch: int, length: int,
                  dtype: Any = jnp.float32) -> KVCache:
    """An empty cache of ``length`` slots per row."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), bool))


def forward_cached(
    params: Params,
    config: JaxModelConfig,
    cache: KVCache,
    input_ids: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    index: jax.Array | int,
    *,
    last_only: bool = True,
) -> tuple[jax.Array, KVCache]:
    """Run ``input_ids [B, T]`` (at ``positions [B, T]``; ``valid [B, T]`` False for padding)
    into cache slots ``[index, index + T)`` and return their logits (fp32; ``[B, V]`` of the
    last position when ``last_only``, else ``[B, T, V]``) and the updated cache.

    A query at position ``t`` reads every valid cached slot (the new ones included) at a
    position ``s`` with ``t − window < s ≤ t``: the same attention as :func:`forward` over the
    whole sequence, so a prefill of a left-padded prompt (positions ``cumsum(mask) − 1``)
    followed by one-token steps at the next positions gives :func:`forward`'s logits for
    each row as if it were alone and unpadded. ``index`` may be traced (one compilation
    serves every step)."""
    c = config
    positions = positions.astype(jnp.int32)
    cache_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, index, 1)
    cache_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid.astype(bool), index, 1)
    x = _embed(params, c, input_ids)
    cos, sin = _rope_tables(c, positions)

    def layer(h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        layer_params, window, k_cache, v_cache = xs
        mask = _attention_mask(positions, cache_positions, cache_valid, window)

        def attention(normed: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            q, k, v = _qkv(c, layer_params, normed, cos, sin)
            k_all = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype),
                                                        index, 1)
            v_all = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype),
                                                        index, 1)
            return _attend(c, layer_params, q, k_all, v_all, mask), (k_all, v_all)

        return _decoder_layer(c, layer_params, h, attention)

    x, (k_new, v_new) = jax.lax.scan(layer, x, (params["layers"], _windows(c), cache.k, cache.v))
    hidden = rms_norm(x, params["norm"], eps=c.rms_norm_eps, plus_one=c.norm_plus_one)
    if last_only:
        hidden = hidden[:, -1]
    logits = logits_from_hidden(params, c, hidden)
    return logits, KVCache(k_new, v_new, cache_positions, cache_valid)
