"""`teacher_logits` nodes and `pretrain_kd` from a cached teacher on the JAX backend: the cache
holds exactly the rows the train node visits, and a top-K cache with K = vocabulary gives the
online teacher's loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jax_helpers import TinyRun, stage

from kdspec.data.tokenizer import builtin_vocab_size
from kdspec_jax.teacher_cache import CacheReader
from kdspec_jax.train_node import build_job

VOCAB = builtin_vocab_size("builtin:words")
LOSS = {"temperature": 2.0, "hard_label_weight": 0.2}
STEPS = 2
STAGES = [
    stage("online", "pretrain_kd", student="small", teacher="big", loss=LOSS, steps=STEPS),
    stage("full_topk", "pretrain_kd", student="small", teacher="big", loss=LOSS, steps=STEPS,
          teacher_cache={"mode": "topk", "k": VOCAB}),
    stage("sampled", "pretrain_kd", student="small", teacher="big", loss=LOSS, steps=STEPS,
          teacher_cache={"mode": "sampled", "k": 4}),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    folder = tmp_path_factory.mktemp("cached")
    tiny = TinyRun(STAGES, folder / "spec", folder / "run")
    for node in ("online", "full_topk.teacher_logits", "full_topk",
                 "sampled.teacher_logits"):
        tiny.run(node)
    return tiny


def test_the_cache_holds_the_rows_the_train_node_visits(run: TinyRun) -> None:
    job = build_job(run.ctx("full_topk"))
    visited = np.unique(job.sampler.indices(0, STEPS * job.stage.batch_size))
    cache = job.cache
    assert cache is not None and sorted(cache.position) == visited.tolist()
    manifest = json.loads((run.run_dir / "full_topk.teacher_logits" / "cache" /
                           "manifest.json").read_text())
    assert (manifest["mode"], manifest["k"], manifest["vocab_size"]) == ("topk", VOCAB, VOCAB)
    assert manifest["node_fingerprint"] == run.plan.node("full_topk.teacher_logits").fingerprint
    assert [e.step for e in run.of_kind("progress", "full_topk.teacher_logits")] == [1]
    batch = job.batch(0)
    assert batch["teacher_ids"].shape == (1, 8, 32, VOCAB)
    np.testing.assert_allclose(batch["teacher_probs"].sum(-1), 1.0, rtol=1e-5)


def test_a_full_top_k_cache_gives_the_online_loss(run: TinyRun) -> None:
    """K = vocabulary: the cached slice is the teacher's whole distribution (to float16), so
    the first step's loss (same initial student, same batch) equals the online one."""
    online = run.of_kind("progress", "online")[0].values["loss"]
    cached = run.of_kind("progress", "full_topk")[0].values["loss"]
    assert cached == pytest.approx(online, rel=1e-3)
    for m in (e.values for e in run.of_kind("metrics", "full_topk")):
        assert m["loss"] == pytest.approx(0.8 * 2.0**2 * m["kd"] + 0.2 * m["ce"], rel=1e-5)
    flops = {node: json.loads((run.run_dir / node / "measured.json").read_text())
             ["flops_per_step"] for node in ("online", "full_topk")}
    assert flops["full_topk"] < flops["online"]  # no teacher forward in the cached step


def test_a_sampled_cache_holds_draw_frequencies(run: TinyRun) -> None:
    folder = run.run_dir / "sampled.teacher_logits" / "cache"
    reader = CacheReader.open(folder, expect=run.plan.node("sampled.teacher_logits"))
    assert reader.manifest["mode"] == "sampled" and reader.k == 4
    ids, probs = reader.get(np.asarray(sorted(reader.position)))
    np.testing.assert_array_equal(probs * 4, np.round(probs * 4))  # counts / K
    assert (np.diff(ids, axis=-1) >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
