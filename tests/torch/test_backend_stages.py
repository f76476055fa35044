"""Each stage kind trains a tiny model end to end on the torch backend (one shared pipeline per
module): losses fall, events and checkpoints are as documented, the saved student reloads, the
KD objective equals its formula, the teacher caches hold the teacher's slices, and the measured
FLOPs equal a hand count."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import SEQ, TINY_ARCH, TinyRun, new_run, stage  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kdspec.spec.stages.common import KDLoss  # noqa: E402

STAGES = [
    stage("teacher", "pretrain", student="big", steps=12, optimizer={"lr": 1e-2}),
    stage("scratch", "pretrain", student="small"),
    stage("kd_online", "pretrain_kd", student="small", teacher="teacher",
          loss={"temperature": 2.0, "hard_label_weight": 0.25}),
    stage("kd_topk", "pretrain_kd", student="small", teacher="teacher",
          teacher_cache={"mode": "topk", "k": 8}),
    stage("kd_sampled", "pretrain_kd", student="small", teacher="teacher",
          teacher_cache={"mode": "sampled", "k": 16}),
    stage("sft", "sft", data="pairs", student="small"),
    stage("kd", "kd", data="pairs", student="small", teacher="teacher"),
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> TinyRun:
    run = new_run(STAGES, tmp_path_factory.mktemp("pipeline"))
    for node in run.plan.nodes:
        if node.kind != "report":
            run.run(node.id)
    return run


def _losses(run: TinyRun, node: str) -> list[float]:
    return [m["loss"] for m in run.metrics(node)]


@pytest.mark.parametrize("node", ["teacher", "scratch", "kd_online", "kd_topk", "kd_sampled",
                                  "sft", "kd"])
def test_every_stage_kind_trains(pipeline: TinyRun, node: str) -> None:
    losses = _losses(pipeline, node)
    assert len(losses) == (6 if node == "teacher" else 4)  # log_every 2, and the last step
    assert losses[-1] < losses[0], losses
    assert (pipeline.model_dir(node) / "model.safetensors").exists()


def test_pretrain_events_and_checkpoints(pipeline: TinyRun) -> None:
    events = [e for e in pipeline.events if e.node == "scratch"]
    assert (events[0].kind, events[0].total, events[0].step) == ("start", 8, 0)
    progress = [e for e in events if e.kind == "progress"]
    assert [e.step for e in progress] == list(range(1, 9))
    assert set(progress[0].values) == {"loss", "tokens_per_s", "lr"}
    metrics = pipeline.metrics("scratch")
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert [m["tokens"] for m in metrics] == [s * 8 * SEQ for s in (2, 4, 6, 8)]
    assert set(metrics[0]) == {"step", "tokens", "loss", "ce", "grad_norm", "lr", "tokens_per_s"}
    # lr of step s (1-based) is 3e-3 · factor(s − 1): warmup 2, cosine to 0.1 over 8 steps.
    assert metrics[0]["lr"] == pytest.approx(3e-3)  # factor(1) = 2/2
    assert metrics[-1]["lr"] == pytest.approx(3e-4)  # the last step sits at min_lr_ratio
    ckpts = sorted(p.name for p in (pipeline.run_dir / "scratch" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000008"]


def test_kd_terms_are_logged(pipeline: TinyRun) -> None:
    for node in ("kd_online", "kd_topk", "kd"):
        last = pipeline.metrics(node)[-1]
        w = {"kd_online": 0.25, "kd_topk": 0.0, "kd": 0.5}[node]
        s = 4.0 if node == "kd_online" else 1.0  # T² with T = 2
        assert last["loss"] == pytest.approx((1 - w) * s * last["kd"] + w * last["ce"], rel=1e-5)


def test_saved_student_reloads_with_the_same_logits(pipeline: TinyRun) -> None:
    folder = pipeline.model_dir("scratch")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token is not None and len(tokenizer) == reloaded.config.vocab_size
    final = pipeline.run_dir / "scratch" / "checkpoints" / "step-00000008" / "model.pt"
    trained = AutoModelForCausalLM.from_config(reloaded.config).eval()
    trained.load_state_dict(torch.load(final, weights_only=True))
    ids = torch.randint(0, reloaded.config.vocab_size, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    assert (folder / "generation_config.json").exists()


def _llama_forward_flops(arch: dict, vocab: int, batch: int, seq: int) -> int:
    """Matmul FLOPs of one forward pass of a llama (eager attention), as a hand count:
    per layer 2·T·d·(q + k + v + o dims) + 3 · 2·T·d·ff, attention 2 · 2·B·h·L²·hd (QKᵀ and
    AV over the full L×L), and the head 2·T·d·V (T = B·L tokens)."""
    d, h, kv, ff = arch["d_model"], arch["n_heads"], arch["n_kv_heads"], arch["d_ff"]
    hd, tokens = d // h, batch * seq
    per_layer = 2 * tokens * d * (2 * h * hd + 2 * kv * hd) + 3 * 2 * tokens * d * ff
    attention = 2 * 2 * batch * h * seq * seq * hd
    return arch["n_layers"] * (per_layer + attention) + 2 * tokens * d * vocab


def test_measured_flops_equal_a_hand_count(pipeline: TinyRun) -> None:
    measured = json.loads((pipeline.run_dir / "scratch" / "measured.json").read_text())
    vocab = AutoModelForCausalLM.from_pretrained(pipeline.model_dir("scratch")).config.vocab_size
    forward = _llama_forward_flops(TINY_ARCH, vocab, batch=8, seq=SEQ)
    assert measured["flops_per_step"] == 3 * forward  # backward = 2 × forward
    assert measured["steps"] == 8 and measured["tokens"] == 8 * 8 * SEQ
    assert measured["wall_seconds"] > 0 and measured["tokens_per_s"] > 0
    # The online KD step adds one teacher forward (the 64-wide teacher of conftest).
    kd = json.loads((pipeline.run_dir / "kd_online" / "measured.json").read_text())
    teacher_arch = {**TINY_ARCH, "d_model": 64, "d_ff": 128}
    teacher_forward = _llama_forward_flops(teacher_arch, vocab, batch=8, seq=SEQ)
    assert kd["flops_per_step"] == measured["flops_per_step"] + teacher_forward


def _student_and_batch(pipeline: TinyRun):
    from kdspec_torch.batches import build_token_data, read_records

    teacher = AutoModelForCausalLM.from_pretrained(pipeline.model_dir("teacher")).eval()
    student = AutoModelForCausalLM.from_pretrained(pipeline.model_dir("scratch"))
    tokenizer = AutoTokenizer.from_pretrained(pipeline.model_dir("scratch"))
    config = pipeline.plan.node("kd_online").config
    records = read_records(config["data"], seed=0, spec_dir=pipeline.spec_dir)
    data = build_token_data("packed", records, tokenizer, SEQ)
    return teacher, student, data


def test_kd_objective_equals_its_formula_plain_and_chunked(pipeline: TinyRun) -> None:
    from kdspec_torch.objectives.distill import Distill

    teacher, student, data = _student_and_batch(pipeline)
    batch = data.batch(torch.tensor([0, 3]))
    loss_cfg = KDLoss(temperature=2.0, hard_label_weight=0.25)
    plain, terms = Distill(loss_cfg, chunked=False, teacher=teacher).loss(student, batch)
    plain.backward()
    grad_plain = student.lm_head.weight.grad.clone()
    student.zero_grad()

    with torch.no_grad():  # by hand: (1 − w)·T²·KL(p‖q) + w·CE, mean over tokens
        s_logits = student(input_ids=batch.input_ids).logits
        p = torch.softmax(teacher(input_ids=batch.input_ids).logits / 2.0, dim=-1)
        log_q = torch.log_softmax(s_logits / 2.0, dim=-1)
        kl = (p * (p.log() - log_q)).sum(-1).mean()
        ce = -torch.log_softmax(s_logits, -1).gather(-1, batch.labels[..., None]).mean()
    assert terms["kd"] == pytest.approx(kl.item(), rel=1e-5)
    assert terms["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert plain.item() == pytest.approx(0.75 * 4 * kl.item() + 0.25 * ce.item(), rel=1e-5)

    chunked, _ = Distill(loss_cfg, chunked=True, teacher=teacher).loss(student, batch)
    chunked.backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(student.lm_head.weight.grad, grad_plain, rtol=1e-4, atol=1e-7)


def test_cached_teacher_objective_plain_equals_chunked(pipeline: TinyRun) -> None:
    from kdspec_torch.objectives.distill import Distill
    from kdspec_torch.teacher_cache import CacheReader

    cache = CacheReader.open(pipeline.run_dir / "kd_topk.teacher_logits" / "cache")
    _, student, data = _student_and_batch(pipeline)
    batch = data.batch(torch.tensor(sorted(cache.position)[:2]))
    cfg = KDLoss(hard_label_weight=0.5)
    plain, terms = Distill(cfg, chunked=False, cache=cache).loss(student, batch)
    chunked, _ = Distill(cfg, chunked=True, cache=cache).loss(student, batch)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert plain.item() == pytest.approx(0.5 * terms["kd"] + 0.5 * terms["ce"], rel=1e-6)


def test_cached_teacher_refuses_divergences_a_slice_cannot_define(pipeline: TinyRun) -> None:
    from kdspec_torch.objectives.distill import Distill
    from kdspec_torch.teacher_cache import CacheReader

    cache = CacheReader.open(pipeline.run_dir / "kd_topk.teacher_logits" / "cache")
    with pytest.raises(ValueError, match="forward_kl only"):
        Distill(KDLoss(divergence="reverse_kl"), chunked=False, cache=cache)


def test_topk_cache_holds_the_teachers_renormalised_top_k(pipeline: TinyRun) -> None:
    from kdspec_torch.batches import EpochSampler, order_seed
    from kdspec_torch.teacher_cache import CacheReader
    from kdspec_torch.teacher_slice import topk_slice

    node = pipeline.plan.node("kd_topk.teacher_logits")
    cache = CacheReader.open(pipeline.run_dir / node.id / "cache", expect=node)
    teacher, _, data = _student_and_batch(pipeline)
    # Exactly the rows the train node samples: 8 steps × 8 rows of its seeded stream.
    stream = EpochSampler(len(data), order_seed(0, node.config["data"])).indices(0, 64)
    assert sorted(cache.position) == sorted(set(stream.tolist()))
    rows = stream[:3]
    ids, probs = cache.get(rows)
    with torch.no_grad():
        want_ids, want_probs = topk_slice(teacher(input_ids=data.batch(rows).input_ids).logits, 8)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(probs, want_probs, atol=1e-3)
    manifest = cache.manifest
    assert (manifest["mode"], manifest["k"], manifest["seq_len"]) == ("topk", 8, SEQ)
    assert manifest["vocab_size"] == teacher.config.vocab_size


def test_sampled_cache_holds_draw_frequencies(pipeline: TinyRun) -> None:
    from kdspec_torch.teacher_cache import CacheReader

    folder = pipeline.run_dir / "kd_sampled.teacher_logits" / "cache"
    cache = CacheReader.open(folder)
    raw = np.load(folder / "probs-00000.npy", mmap_mode="r").astype(np.float64)
    assert np.allclose(raw.sum(-1), 1.0)
    assert np.array_equal(raw * 16, np.round(raw * 16))  # counts / K, exact in fp16
    assert cache.manifest["mode"] == "sampled"


def test_gemma2_and_gpt2_students_distill(make_run) -> None:
    """Gemma 2 (eager attention, soft caps: the plain loss) and GPT-2 (tied head: the chunked
    loss) students learn from an online llama teacher."""
    gemma = {**TINY_ARCH, "family": "gemma2", "n_kv_heads": 2, "attn_softcap": 50.0,
             "final_softcap": 30.0, "sliding_window": 16}
    gpt2 = {**TINY_ARCH, "family": "gpt2", "n_kv_heads": None}
    run = make_run(
        [stage("teacher", "pretrain", student="big", steps=4),
         stage("gemma", "pretrain_kd", student="gem", teacher="teacher"),
         stage("gpt_kd", "pretrain_kd", student="gpt", teacher="teacher",
               loss={"chunked": "on"})],
        models={"big": {"arch": {**TINY_ARCH, "d_model": 64}}, "gem": {"arch": gemma},
                "gpt": {"arch": gpt2}})
    run.run("gemma")
    run.run("gpt_kd")
    for node in ("gemma", "gpt_kd"):
        losses = [m["loss"] for m in run.metrics(node)]
        assert losses[-1] < losses[0], (node, losses)
    assert "kd" in run.metrics("gemma")[-1] and "kd" not in run.metrics("gpt_kd")[-1]
