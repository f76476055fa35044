"""HuggingFace checkpoints in and out: a folder with config.json and safetensors weights.

Loading reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``,
renames HF tensors to the JAX pytree of :mod:`kdspec_jax.model` and stacks the per-layer tensors
along a leading layer axis. Saving is the inverse: one ``model.safetensors`` with exactly the
names and ``[out, in]`` layouts transformers expects, a config.json, and optionally the
tokenizer files of another folder, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads it.

The name tables are the one place where the families differ on disk. The trap is the norm
after attention: Llama's ``post_attention_layernorm`` is the *pre-MLP* norm, while Gemma 2's is
the norm *of the attention output* (its pre-MLP norm is ``pre_feedforward_layernorm``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from .model import JaxModelConfig, Params, param_shapes

__all__ = [
    "TOKENIZER_FILES",
    "copy_tokenizer",
    "from_hf_state_dict",
    "hf_layer_names",
    "load_hf",
    "load_hf_config",
    "read_safetensors",
    "save_hf",
    "to_hf_state_dict",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Non-parameter tensors some exporters write; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------------------------
# Name tables
# --------------------------------------------------------------------------------------------


def hf_layer_names(config: JaxModelConfig) -> dict[str, str]:
    """JAX layer-parameter name → HF name after ``model.layers.{i}.``, for the parameters this
    config has."""
    names = {
        "attn_norm": "input_layernorm.weight",
        "q_proj": "self_attn.q_proj.weight",
        "k_proj": "self_attn.k_proj.weight",
        "v_proj": "self_attn.v_proj.weight",
        "o_proj": "self_attn.o_proj.weight",
        "q_bias": "self_attn.q_proj.bias",
        "k_bias": "self_attn.k_proj.bias",
        "v_bias": "self_attn.v_proj.bias",
        "o_bias": "self_attn.o_proj.bias",
        "gate_proj": "mlp.gate_proj.weight",
        "up_proj": "mlp.up_proj.weight",
        "down_proj": "mlp.down_proj.weight",
        "gate_bias": "mlp.gate_proj.bias",
        "up_bias": "mlp.up_proj.bias",
        "down_bias": "mlp.down_proj.bias",
    }
    if config.sandwich_norms:  # Gemma 2
        names.update(
            attn_post_norm="post_attention_layernorm.weight",
            mlp_norm="pre_feedforward_layernorm.weight",
            mlp_post_norm="post_feedforward_layernorm.weight",
        )
    else:  # Llama, Qwen2: the norm "after attention" is the one before the MLP
        names["mlp_norm"] = "post_attention_layernorm.weight"
    present = param_shapes(config)["layers"]
    return {k: v for k, v in names.items() if k in present}


def _top_level_names(config: JaxModelConfig) -> dict[str, str]:
    names = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head"] = "lm_head.weight"
    return names


# --------------------------------------------------------------------------------------------
# Reading safetensors
# --------------------------------------------------------------------------------------------

# safetensors dtype codes numpy has no native type for, read through ml_dtypes.
_ML_DTYPES = {"BF16": ml_dtypes.bfloat16}


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file as numpy arrays.

    ``safetensors.numpy`` reads every dtype numpy knows; bfloat16 (how Llama and Gemma
    checkpoints ship) it cannot, so such files are read from the format's header directly
    (8-byte little-endian header size, a JSON header of ``{name: {dtype, shape,
    data_offsets}}``, then the raw little-endian data).
    """
    header = _safetensors_header(path)
    if not any(v.get("dtype") in _ML_DTYPES for k, v in header.items() if k != "__metadata__"):
        return safetensors.numpy.load_file(str(path))
    return _read_raw(path, header)


def _safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def _read_raw(path: str | os.PathLike[str], header: dict[str, Any]) -> dict[str, np.ndarray]:
    numpy_codes = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                   "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code = info["dtype"]
        dtype = _ML_DTYPES.get(code) or np.dtype(numpy_codes[code])
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(dtype).reshape(info["shape"]).copy()
    return out


def _read_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    if (folder / WEIGHTS_FILE).exists():
        return read_safetensors(folder / WEIGHTS_FILE)
    if (folder / INDEX_FILE).exists():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(folder / shard))
        return tensors
    raise FileNotFoundError(
        f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors checkpoints "
        "are supported)"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_hf_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw config.json of a HF model folder."""
    return json.loads((Path(folder) / CONFIG_FILE).read_text())


def load_hf(
    folder: str | os.PathLike[str], *, dtype: Any = jnp.float32
) -> tuple[JaxModelConfig, Params]:
    """Load a HF llama / qwen2 / gemma2 checkpoint folder as ``(config, params)``.

    Every parameter is cast to ``dtype``. Missing or unexpected tensors and wrong shapes raise
    ``ValueError`` naming them; a tied model's ``lm_head.weight``, if the file has one, is
    ignored (transformers ties it to the embeddings on load too).
    """
    folder = Path(folder)
    config = JaxModelConfig.from_hf(load_hf_config(folder))
    tensors = _read_checkpoint(folder)
    params = from_hf_state_dict(tensors, config, dtype=dtype)
    return config, params


def from_hf_state_dict(
    tensors: Mapping[str, np.ndarray], config: JaxModelConfig, *, dtype: Any = jnp.float32
) -> Params:
    """HF-named tensors → the JAX pytree (layers stacked), checked against the config."""
    shapes = param_shapes(config)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        array = tensors[name]
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape}")
        used.add(name)
        return array

    params: Params = {}
    for key, hf_name in _top_level_names(config).items():
        params[key] = take(hf_name, shapes[key])
    layers = {}
    for key, suffix in hf_layer_names(config).items():
        per_layer = shapes["layers"][key][1:]
        layers[key] = np.stack(
            [take(f"model.layers.{i}.{suffix}", per_layer) for i in range(config.num_layers)]
        )
    params["layers"] = layers
    _check_unused(tensors, used, config)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), params)


def _check_unused(tensors: Iterable[str], used: set[str], config: JaxModelConfig) -> None:
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(
        n for n in tensors
        if n not in used and n not in ignorable and not n.endswith(_IGNORED_SUFFIXES)
    )
    if extra:
        shown = ", ".join(extra[:8]) + (" …" if len(extra) > 8 else "")
        raise ValueError(
            f"checkpoint has {len(extra)} tensor(s) the {config.model_type} config does not "
            f"explain: {shown}"
        )


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def to_hf_state_dict(
    params: Params, config: JaxModelConfig, *, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """The JAX pytree → HF-named numpy tensors (layers unstacked), cast to ``dtype``."""
    host = jax.device_get(params)
    out: dict[str, np.ndarray] = {}
    for key, hf_name in _top_level_names(config).items():
        out[hf_name] = np.ascontiguousarray(np.asarray(host[key], dtype=dtype))
    for key, suffix in hf_layer_names(config).items():
        stacked = np.asarray(host["layers"][key], dtype=dtype)
        for i in range(config.num_layers):
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(stacked[i])
    return out


def save_hf(
    params: Params,
    config: JaxModelConfig,
    folder: str | os.PathLike[str],
    *,
    base_config: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    dtype: Any = np.float32,
) -> Path:
    """Write ``params`` as a HF model folder that ``AutoModelForCausalLM.from_pretrained``
    loads: config.json, model.safetensors and the tokenizer files found in ``tokenizer_dir``.

    ``base_config`` (e.g. the config.json the model was loaded from) keeps the keys the JAX
    config does not model, such as the special token ids; the architecture keys always come
    from ``config``. ``dtype`` is float32 or float16 (``safetensors.numpy`` has no bfloat16).
    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = {**(base_config or {}), **config.to_hf()}
    hf_config["dtype"] = np.dtype(dtype).name
    for stale in ("torch_dtype", "rope_theta", "rope_scaling"):  # superseded keys
        hf_config.pop(stale, None)
    tensors = to_hf_state_dict(params, config, dtype=dtype)
    _atomic_write(
        folder / WEIGHTS_FILE,
        lambda p: safetensors.numpy.save_file(tensors, p, metadata={"format": "pt"}),
    )
    _atomic_write(
        folder / CONFIG_FILE,
        lambda p: Path(p).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n"),
    )
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, folder)
    return folder


def copy_tokenizer(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer files of ``source`` (those in :data:`TOKENIZER_FILES` that exist)
    into ``dest``; returns their names. A folder without any is an error."""
    source, dest = Path(source), Path(dest)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {source} (looked for {TOKENIZER_FILES})")
    dest.mkdir(parents=True, exist_ok=True)
    for name in copied:
        _atomic_write(dest / name, lambda p, n=name: shutil.copyfile(source / n, p))
    return copied


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
