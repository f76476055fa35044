"""Unit tests of the torch backend's parts: schedule, optimizer groups, data rows, sampler,
checkpoints, the teacher cache format, model configs and dispatch. No training here."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kdspec.spec.stages.common import OptimizerConfig, ScheduleConfig  # noqa: E402
from kdspec_torch import checkpoint as ckpt  # noqa: E402
from kdspec_torch import teacher_cache  # noqa: E402
from kdspec_torch.batches import (  # noqa: E402
    IGNORE_INDEX,
    EpochSampler,
    TokenData,
    pack_documents,
    pair_rows,
    step_batches,
)
from kdspec_torch.objectives.distill import CHUNK_AUTO_ELEMENTS, use_chunked  # noqa: E402
from kdspec_torch.optim import build_optimizer, build_scheduler, lr_factor  # noqa: E402
from kdspec_torch.runtime import derive_seed  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Schedule and optimizer


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        ("cosine", 0, 0.5),  # warmup: (0 + 1) / 2
        ("cosine", 1, 1.0),  # warmup ends at the peak
        ("cosine", 2, 1.0),  # first decay step: p = 0
        # p = 3/7: 0.1 + 0.9 · (1 + cos(3π/7)) / 2 = 0.1 + 0.45 · 1.2225209 = 0.6501344
        ("cosine", 5, 0.6501344),
        ("cosine", 9, 0.1),  # last step: p = 1, the floor
        ("linear", 5, 0.6142857),  # 0.1 + 0.9 · (1 − 3/7)
        ("linear", 9, 0.1),
        ("constant", 0, 0.5),
        ("constant", 9, 1.0),
    ],
)
def test_lr_factor_hand_values(kind: str, step: int, expected: float) -> None:
    config = ScheduleConfig(kind=kind, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(step, total=10, config=config) == pytest.approx(expected, abs=1e-7)


def test_scheduler_sets_each_steps_lr() -> None:
    model = torch.nn.Linear(2, 2)
    config = ScheduleConfig(kind="linear", warmup_steps=1, min_lr_ratio=0.0)
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.4))
    scheduler = build_scheduler(optimizer, config, total=3)
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.4, 0.4, 0.0])  # warmup 1/1, p = 0, p = 1


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 3))
    config = OptimizerConfig(lr=1e-3, weight_decay=0.1, betas=[0.8, 0.95], eps=1e-6)
    optimizer = build_optimizer(model, config)
    decayed, plain = optimizer.param_groups
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in plain["params"]} == {id(model[1].weight), id(model[1].bias),
                                                id(model[2].bias)}
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert decayed["betas"] == (0.8, 0.95) and decayed["eps"] == 1e-6


# ---------------------------------------------------------------------------------------------
# Data rows, sampler, batches


def test_pack_documents_appends_eos_and_drops_the_tail() -> None:
    data = pack_documents([[1, 2, 3], [4, 5], [6]], eos_id=9, seq_len=3)
    # stream 1 2 3 9 4 5 9 6 9 -> rows of 4, tail "6 9" dropped
    assert data.tokens.tolist() == [[1, 2, 3, 9], [4, 5, 9, 6]]
    batch = data.batch(torch.tensor([1]))
    assert batch.input_ids.tolist() == [[4, 5, 9]]
    assert batch.labels.tolist() == [[5, 9, 6]]
    assert batch.attention_mask is None and batch.n_targets == 3 and batch.n_tokens == 3


def test_pair_rows_mask_the_prompt_and_pad() -> None:
    data = pair_rows([[5, 6], [5, 6, 7, 8, 9]], [[7], [3]], bos_id=1, eos_id=2, pad_id=0,
                     seq_len=5)
    # The second pair's response lies past the 6-token cut: dropped.
    assert data.tokens.tolist() == [[1, 5, 6, 7, 2, 0]]
    batch = data.batch(torch.tensor([0]))
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 2]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 2, IGNORE_INDEX]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1]]
    short = pair_rows([[5]], [[7]], bos_id=None, eos_id=2, pad_id=0, seq_len=5)
    batch = short.batch(torch.tensor([0]))
    assert batch.input_ids.tolist() == [[5, 7, 2, 0, 0]]
    assert batch.labels.tolist() == [[7, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0]]
    assert (batch.n_targets, batch.n_tokens) == (2, 3)


def test_sampler_visits_every_row_once_per_epoch() -> None:
    sampler = EpochSampler(10, seed=3)
    stream = sampler.indices(0, 25)
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:20].tolist()) == list(range(10))
    assert stream[:10].tolist() != stream[10:20].tolist()  # a fresh permutation each epoch
    assert sampler.indices(7, 11).tolist() == stream[7:18].tolist()  # position is one integer
    assert EpochSampler(10, seed=3).indices(0, 25).tolist() == stream.tolist()
    assert EpochSampler(10, seed=4).indices(0, 10).tolist() != stream[:10].tolist()


def test_step_batches_do_not_depend_on_grad_accum() -> None:
    data = TokenData(torch.arange(60).view(12, 5), torch.ones(12, 5, dtype=torch.bool),
                     torch.full((12,), 5))
    sampler = EpochSampler(len(data), seed=0)
    whole = step_batches(data, sampler, 1, batch_size=4, grad_accum=1)
    parts = step_batches(data, sampler, 1, batch_size=4, grad_accum=2)
    assert [len(b.index) for b in parts] == [2, 2]
    assert torch.cat([b.index for b in parts]).tolist() == whole[0].index.tolist()
    assert whole[0].index.tolist() == sampler.indices(4, 4).tolist()


def test_derive_seed_is_stable_and_separates_purposes() -> None:
    assert derive_seed(0, "order", "corpus") == derive_seed(0, "order", "corpus")
    assert derive_seed(0, "order", "corpus") != derive_seed(0, "order", "pairs")
    assert derive_seed(0, "order") != derive_seed(1, "order")
    assert 0 <= derive_seed(5, "x") < 2**63


def test_chunked_auto_threshold() -> None:
    assert use_chunked("auto", CHUNK_AUTO_ELEMENTS // 1024, 1024)  # exactly at 2^27
    assert not use_chunked("auto", CHUNK_AUTO_ELEMENTS // 1024 - 1, 1024)
    assert use_chunked("on", 1, 1) and not use_chunked("off", 10**9, 10**6)
    assert not use_chunked("auto", 10**9, 10**6, capable=False)  # e.g. Gemma 2's soft cap
    assert use_chunked("on", 1, 1, capable=False)  # the loss then says why it cannot


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _train_parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.1))
    scheduler = build_scheduler(optimizer, ScheduleConfig(warmup_steps=2), total=10)
    return model, optimizer, scheduler


def _one_step(model, optimizer, scheduler) -> None:
    model(torch.randn(4, 3)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_checkpoint_round_trip_continues_identically(tmp_path: Path) -> None:
    model, optimizer, scheduler = _train_parts()
    _one_step(model, optimizer, scheduler)
    state = ckpt.TrainState(step=1, samples=8, tokens=256, wall_seconds=0.5)
    path = ckpt.save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                state=state)
    draws = (torch.rand(3), random.random(), np.random.rand())
    _one_step(model, optimizer, scheduler)  # the uninterrupted run's second step

    other = _train_parts(seed=1)  # different weights and RNG, all overwritten by the load
    assert ckpt.load_checkpoint(path, model=other[0], optimizer=other[1],
                                scheduler=other[2]) == state
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], draws[0]) and again[1:] == draws[1:]
    assert other[1].param_groups[0]["lr"] == pytest.approx(0.1 * 1.0)  # step 1: warmup 2/2
    _one_step(*other)  # the resumed run's second step: same batch, same Adam moments
    for key, value in model.state_dict().items():
        assert torch.equal(value, other[0].state_dict()[key])
    assert other[2].state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 2


def test_only_complete_checkpoints_count_and_two_are_kept(tmp_path: Path) -> None:
    model, optimizer, scheduler = _train_parts()
    for step in (4, 8, 12):
        ckpt.save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                             state=ckpt.TrainState(step=step))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000008",
                                                                      "step-00000012"]
    # What a kill leaves: a temp folder mid-write, and a step folder without state.json.
    partial = tmp_path / ".tmp-step-00000016-999"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"torn")
    (tmp_path / "step-00000020").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000012"
    ckpt.remove_partial(tmp_path)
    assert not partial.exists()
    assert ckpt.latest_checkpoint(tmp_path / "absent") is None


# ---------------------------------------------------------------------------------------------
# Teacher cache


def test_cache_round_trip_by_dataset_row(tmp_path: Path, monkeypatch) -> None:
    seq_len, k = 3, 2
    per_row = seq_len * k * teacher_cache.BYTES_PER_SLOT
    monkeypatch.setattr(teacher_cache, "SHARD_BYTES", 2 * per_row)  # 2 rows per shard
    rows = np.array([3, 7, 8])
    writer = teacher_cache.CacheWriter(tmp_path, rows, seq_len=seq_len, k=k)
    assert (writer.rows_per_shard, writer.n_shards, writer.pending()) == (2, 2, [0, 1])
    ids = torch.arange(3 * seq_len * k).view(3, seq_len, k)
    probs = torch.tensor([0.75, 0.25]).expand(3, seq_len, k)
    writer.write_shard(0, ids[:2], probs[:2])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        teacher_cache.CacheReader.open(tmp_path)
    # A rerun finds shard 0 done and writes only shard 1.
    writer = teacher_cache.CacheWriter(tmp_path, rows, seq_len=seq_len, k=k)
    assert writer.pending() == [1]
    writer.write_shard(1, ids[2:], probs[2:])
    manifest = writer.finish(mode="topk", temperature=1.0, vocab_size=99,
                             node_fingerprint="abc", teacher_fingerprint="def")
    assert manifest["bytes_per_token"] == k * 6 and manifest["rows"] == 3

    reader = teacher_cache.CacheReader.open(tmp_path)
    got_ids, got_probs = reader.get(torch.tensor([8, 3]))
    assert got_ids.dtype == torch.int64 and got_probs.dtype == torch.float32
    assert torch.equal(got_ids, ids[[2, 0]])
    assert torch.equal(got_probs, probs[[2, 0]])
    with pytest.raises(KeyError, match="row 5"):
        reader.get(torch.tensor([5]))
    assert np.load(tmp_path / "ids-00000.npy", mmap_mode="r").dtype == np.int32
    assert np.load(tmp_path / "probs-00001.npy", mmap_mode="r").dtype == np.float16


def test_cache_reader_renormalises_fp16_probs(tmp_path: Path) -> None:
    writer = teacher_cache.CacheWriter(tmp_path, np.array([0]), seq_len=1, k=3)
    probs = torch.tensor([[[0.7, 0.2, 0.1]]])
    writer.write_shard(0, torch.tensor([[[4, 5, 6]]]), probs)
    writer.finish(mode="topk", temperature=1.0, vocab_size=10, node_fingerprint="x")
    _, got = teacher_cache.CacheReader.open(tmp_path).get(torch.tensor([0]))
    assert got.sum().item() == pytest.approx(1.0, abs=1e-7)
    assert torch.allclose(got, probs, atol=1e-3)


def test_cache_reader_refuses_another_nodes_cache(tmp_path: Path) -> None:
    from kdspec.plan.graph import Node

    writer = teacher_cache.CacheWriter(tmp_path, np.array([0]), seq_len=1, k=1)
    writer.write_shard(0, torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1))
    writer.finish(mode="topk", temperature=1.0, vocab_size=10, node_fingerprint="old")
    node = Node("s.teacher_logits", "teacher_logits", "s", "pretrain_kd",
                {"cache": {"mode": "topk", "k": 1}, "seq_len": 1, "temperature": 1.0},
                fingerprint="new")
    with pytest.raises(ValueError, match="node_fingerprint: cache 'old' != plan 'new'"):
        teacher_cache.CacheReader.open(tmp_path, expect=node)
    node.fingerprint = "old"
    assert teacher_cache.CacheReader.open(tmp_path, expect=node).vocab_size == 10


def test_weights_fingerprint_sees_one_changed_weight() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(config)
    before = teacher_cache.weights_fingerprint(model)
    assert teacher_cache.weights_fingerprint(model) == before
    with torch.no_grad():
        model.lm_head.weight[3, 1] += 1e-3
    assert teacher_cache.weights_fingerprint(model) != before


# ---------------------------------------------------------------------------------------------
# Models and dispatch


@pytest.fixture(scope="module")
def words_tokenizer(tmp_path_factory):
    from kdspec_torch.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    return load_tokenizer("builtin:words", spec_dir=folder, work_dir=folder / "tokenizer")


ARCH = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 48, "max_seq_len": 64}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "t5"])
def test_arch_config_builds_each_family(family: str, words_tokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from kdspec.spec.models import ArchConfig
    from kdspec_torch.models import arch_config

    config = arch_config(ArchConfig(family=family, **ARCH), words_tokenizer)
    assert config.vocab_size == len(words_tokenizer)
    assert config.pad_token_id == words_tokenizer.pad_token_id
    assert config.eos_token_id == words_tokenizer.eos_token_id
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    model = auto.from_config(config)
    ids = torch.tensor([[words_tokenizer.bos_token_id or 0, 5, 6, 7]])
    extra = {"decoder_input_ids": ids} if family == "t5" else {}
    assert model(input_ids=ids, **extra).logits.shape == (1, 4, len(words_tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0
    if family == "gpt2":
        assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)
        assert config.n_inner == 48
    if family == "gemma2":
        assert config.final_logit_softcapping is None and config.query_pre_attn_scalar == 8
    # transformers 5 ties T5's head to its embedding whatever the flag, so t5 is left out here.
    if family in ("llama", "qwen2"):
        assert not config.tie_word_embeddings
    elif family in ("gemma2", "gpt2"):
        assert config.tie_word_embeddings


def test_arch_vocab_must_cover_the_tokenizer(words_tokenizer) -> None:
    from kdspec.spec.models import ArchConfig
    from kdspec_torch.models import arch_config

    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        arch_config(ArchConfig(family="llama", vocab_size=10, **ARCH), words_tokenizer)


def test_backend_dispatch_and_unsupported_kinds() -> None:
    from kdspec.plan.graph import Node
    from kdspec_torch.backend import NODE_RUNNERS, TorchBackend
    from kdspec_torch.objectives import OBJECTIVES

    backend = TorchBackend()
    assert backend.name == "torch"
    assert set(OBJECTIVES) >= {"pretrain", "sft", "pretrain_kd", "kd"}
    assert set(NODE_RUNNERS) >= {"train", "teacher_logits"}
    assert backend.supports(Node("a", "train", "a", "pretrain_kd", {}))
    assert backend.supports(Node("a.teacher_logits", "teacher_logits", "a", "pretrain_kd", {}))
    assert not backend.supports(Node("a", "train", "a", "not_a_kind", {}))
    assert backend.supports(Node("a.rationales", "rationales", "a", "step_by_step", {}))
    assert not backend.supports(Node("a", "distill_more", "a", "pretrain", {}))
    with pytest.raises(NotImplementedError, match="stage kind `not_a_kind`"):
        backend.run_node(_FakeCtx(Node("a", "train", "a", "not_a_kind", {})))
    with pytest.raises(NotImplementedError, match="a `distill_more` node"):
        backend.run_node(_FakeCtx(Node("a", "distill_more", "a", "pretrain", {})))


class _FakeCtx:
    def __init__(self, node):
        self.node = node


def test_preset_models_are_refused_with_a_reason(words_tokenizer, tmp_path: Path) -> None:
    from kdspec_torch.models import load_model

    class Ctx:
        node = type("N", (), {"config": {"seed": 0}})()
        spec_dir = tmp_path

    with pytest.raises(ValueError, match="presets describe well-known shapes"):
        load_model({"model": "big", "preset": "gemma2-2b", "dtype": "auto"}, ctx=Ctx(),
                   role="student", tokenizer=words_tokenizer, dev=torch.device("cpu"),
                   trainable=True)


def test_manifest_is_json_with_the_documented_keys(tmp_path: Path) -> None:
    writer = teacher_cache.CacheWriter(tmp_path, np.array([0]), seq_len=1, k=1)
    writer.write_shard(0, torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1))
    writer.finish(mode="sampled", temperature=2.0, vocab_size=10, node_fingerprint="x",
                  teacher_fingerprint="y")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest) >= {"format", "mode", "k", "seq_len", "temperature", "vocab_size",
                             "rows", "rows_per_shard", "shards", "ids_dtype", "probs_dtype",
                             "bytes_per_token", "node_fingerprint", "teacher_fingerprint"}
    assert math.isclose(manifest["temperature"], 2.0)


class _SeedCtx:
    def __init__(self, folder: Path):
        self.node = type("N", (), {"config": {"seed": 0, "tokenizer": "builtin:words"}})()
        self.spec_dir = folder


def test_sdpa_unless_the_model_has_none(words_tokenizer, tmp_path: Path) -> None:
    from kdspec_torch.models import load_model
    from kdspec_torch.objectives.base import head_problem, head_weight

    arch = {**ARCH, "family": "gemma2", "attn_softcap": 50.0, "final_softcap": 30.0}
    gemma = load_model({"model": "g", "arch": arch, "dtype": "auto"}, ctx=_SeedCtx(tmp_path),
                       role="student", tokenizer=words_tokenizer, dev=torch.device("cpu"),
                       trainable=True)
    assert gemma.config._attn_implementation == "eager"  # Gemma 2 has no SDPA path
    assert gemma.config.attn_logit_softcapping == 50.0
    assert "soft-caps its final logits" in head_problem(gemma)
    with pytest.raises(ValueError, match="use loss.chunked: off"):
        head_weight(gemma)
    llama = load_model({"model": "l", "arch": {**ARCH, "family": "llama"}, "dtype": "auto"},
                       ctx=_SeedCtx(tmp_path), role="student", tokenizer=words_tokenizer,
                       dev=torch.device("cpu"), trainable=False)
    assert llama.config._attn_implementation == "sdpa"
    assert head_problem(llama) is None
    assert not llama.training and not any(p.requires_grad for p in llama.parameters())


def test_fresh_weights_depend_on_the_model_name_only(words_tokenizer, tmp_path: Path) -> None:
    from kdspec_torch.models import load_model

    def build(name: str):
        ref = {"model": name, "arch": {**ARCH, "family": "llama"}, "dtype": "auto"}
        return load_model(ref, ctx=_SeedCtx(tmp_path), role="student", tokenizer=words_tokenizer,
                          dev=torch.device("cpu"), trainable=True)

    torch.manual_seed(1)
    a = build("student")
    torch.manual_seed(2)  # the global RNG does not matter ...
    b = build("student")
    c = build("other")  # ... the name does
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_a_model_with_its_own_tokenizer_is_refused(words_tokenizer, tmp_path: Path) -> None:
    from kdspec_torch.models import load_model

    ref = {"model": "m", "arch": {**ARCH, "family": "llama"}, "dtype": "auto",
           "tokenizer": "builtin:bytes"}
    with pytest.raises(NotImplementedError, match="its own tokenizer 'builtin:bytes'"):
        load_model(ref, ctx=_SeedCtx(tmp_path), role="student", tokenizer=words_tokenizer,
                   dev=torch.device("cpu"), trainable=True)
