"""The JAX backend's data rows, sampler, tokenizer, checkpoints and arch configs."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdspec.spec.models import ArchConfig
from kdspec_jax.checkpoint import (
    Progress,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kdspec_jax.data import (
    EpochSampler,
    derive_seed,
    load_tokenizer,
    pack_documents,
    pair_rows,
    step_batch,
)
from kdspec_jax.model import JaxModelConfig
from kdspec_jax.train_step import init_train_state


def test_pack_documents_by_hand() -> None:
    rows = pack_documents([[5, 6], [7], [8, 9, 10]], eos_id=1, seq_len=3)
    # stream 5 6 1 7 1 8 9 10 1 → rows of 4, tail "1" dropped
    np.testing.assert_array_equal(rows.tokens, [[5, 6, 1, 7], [1, 8, 9, 10]])
    batch = rows.batch(np.array([1]))
    np.testing.assert_array_equal(batch["input_ids"], [[1, 8, 9]])
    np.testing.assert_array_equal(batch["labels"], [[8, 9, 10]])
    with pytest.raises(ValueError, match="no training example"):
        pack_documents([[5]], eos_id=1, seq_len=8)


def test_pair_rows_by_hand_and_like_the_torch_backend() -> None:
    """``[bos] + prompt + response + [eos]`` cut to seq_len + 1 and right-padded; targets are
    the response and eos; a pair whose response is cut off entirely is dropped."""
    prompts, responses = [[5, 6], [7, 8, 9, 10], [4] * 6], [[11], [12, 13], [14]]
    rows = pair_rows(prompts, responses, bos_id=2, eos_id=3, pad_id=0, seq_len=5)
    np.testing.assert_array_equal(rows.tokens, [[2, 5, 6, 11, 3, 0], [2, 7, 8, 9, 10, 12]])
    np.testing.assert_array_equal(rows.lengths, [5, 6])
    batch = rows.batch(np.array([0, 1]))
    np.testing.assert_array_equal(batch["labels"], [[-100, -100, 11, 3, -100],
                                                    [-100, -100, -100, -100, 12]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    short = pair_rows([[5]], [[6]], bos_id=None, eos_id=3, pad_id=0, seq_len=5)
    np.testing.assert_array_equal(short.batch(np.array([0]))["attention_mask"], [[1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="no training example"):
        pair_rows([[4] * 9], [[5]], bos_id=2, eos_id=3, pad_id=0, seq_len=5)

    torch = pytest.importorskip("torch")
    batches = pytest.importorskip("kdspec_torch.batches")
    theirs = batches.pair_rows(prompts, responses, bos_id=2, eos_id=3, pad_id=0, seq_len=5)
    np.testing.assert_array_equal(rows.tokens, theirs.tokens.numpy())
    np.testing.assert_array_equal(rows.targets, theirs.targets.numpy())
    np.testing.assert_array_equal(rows.lengths, theirs.lengths.numpy())
    expected = theirs.batch(torch.tensor([0, 1]))
    np.testing.assert_array_equal(batch["labels"], expected.labels.numpy())


def test_sampler_visits_every_row_once_per_epoch() -> None:
    sampler = EpochSampler(5, seed=3)
    stream = sampler.indices(0, 15)
    for epoch in range(3):
        assert sorted(stream[5 * epoch: 5 * epoch + 5]) == [0, 1, 2, 3, 4]
    assert not np.array_equal(stream[:5], stream[5:10])  # a fresh order each epoch
    np.testing.assert_array_equal(EpochSampler(5, seed=3).indices(7, 4), stream[7:11])
    rows = pack_documents([list(range(2, 40))], eos_id=1, seq_len=3)  # 9 rows of 4
    batch = step_batch(rows, EpochSampler(len(rows), seed=0), step=2, batch_size=4,
                       grad_accum=2)
    assert batch["input_ids"].shape == (2, 2, 3)


def test_derive_seed_matches_the_torch_backend() -> None:
    assert derive_seed(0, "init", "small") == derive_seed(0, "init", "small")
    assert derive_seed(0, "init", "small") != derive_seed(0, "init", "big")
    runtime = pytest.importorskip("kdspec_torch.runtime")
    assert derive_seed(7, "order", "corpus") == runtime.derive_seed(7, "order", "corpus")


def test_builtin_tokenizer_round_trips_through_transformers(tmp_path: Path) -> None:
    tokenizer = load_tokenizer("builtin:words", spec_dir=tmp_path, work_dir=tmp_path / "tok")
    assert tokenizer.special["pad"] == "<pad>" and tokenizer.eos_id == 3
    ids = tokenizer.encode(["3 + 4 = 7 ."])[0]
    assert 1 not in ids  # no <unk>
    tokenizer.save(tmp_path / "saved")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert hf("3 + 4 = 7 .", add_special_tokens=False)["input_ids"] == ids
    assert (hf.pad_token_id, hf.eos_token_id) == (0, 3)
    folder = load_tokenizer("saved", spec_dir=tmp_path, work_dir=tmp_path / "unused")
    assert folder.encode(["3 + 4 = 7 ."])[0] == ids and folder.special == tokenizer.special


def _state(seed: int = 0) -> object:
    params = {"w": jax.random.normal(jax.random.key(seed), (3, 2)), "b": jnp.zeros(2)}
    return jax.device_get(init_train_state(params, optax.adamw(1e-3)))


def test_checkpoint_round_trip_and_pruning(tmp_path: Path) -> None:
    state = _state()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, state, Progress(step=step, samples=8 * step))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004",
                                                                "step-00000006"]
    restored, progress = load_checkpoint(latest_checkpoint(tmp_path), _state(seed=1))
    assert progress == Progress(step=6, samples=48)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    other = jax.device_get(init_train_state({"w": jnp.zeros((3, 2))}, optax.adamw(1e-3)))
    with pytest.raises(ValueError, match="leaves this state lacks"):
        load_checkpoint(latest_checkpoint(tmp_path), other)
    wrong = jax.device_get(init_train_state({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)},
                                            optax.adamw(1e-3)))
    with pytest.raises(ValueError, match=r"expected float32\[2, 2\]"):
        load_checkpoint(latest_checkpoint(tmp_path), wrong)
    assert json.loads((tmp_path / "step-00000006" / "progress.json").read_text())["step"] == 6


@pytest.mark.parametrize(
    "arch",
    [
        {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "d_ff": 64, "max_seq_len": 64},
        {"family": "qwen2", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
         "tie_embeddings": True},
        {"family": "gemma2", "d_model": 48, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1,
         "head_dim": 16, "d_ff": 96, "max_seq_len": 64, "sliding_window": 8,
         "attn_softcap": 50.0, "final_softcap": 30.0},
    ],
)
def test_arch_config_matches_the_torch_backend(arch: dict, tmp_path: Path) -> None:
    """An inline `arch:` gives the same architecture in both backends."""
    pytest.importorskip("torch")
    torch_models = pytest.importorskip("kdspec_torch.models")
    torch_tokenizer = pytest.importorskip("kdspec_torch.tokenizer")
    from kdspec_jax.models import arch_hf_config

    spec = ArchConfig.model_validate(arch)
    jax_tok = load_tokenizer("builtin:words", spec_dir=tmp_path, work_dir=tmp_path / "a")
    hf_tok = torch_tokenizer.load_tokenizer("builtin:words", spec_dir=tmp_path,
                                            work_dir=tmp_path / "b")
    ours = JaxModelConfig.from_hf(arch_hf_config(spec, jax_tok))
    theirs = JaxModelConfig.from_hf(torch_models.arch_config(spec, hf_tok).to_dict())
    assert ours == theirs
