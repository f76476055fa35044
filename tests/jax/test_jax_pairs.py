"""`sft` and `kd` stages on the JAX backend: prompt/response rows, the loss on response tokens
only (checked against a hand computation on the first batch), the KD mix, `train_fraction`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax_helpers import TinyRun, stage

from kdspec_jax import losses
from kdspec_jax.data import IGNORE_INDEX
from kdspec_jax.model import forward
from kdspec_jax.train_node import build_job

SEQ = 48
STAGES = [
    stage("sft", "sft", student="small", data="tasks", seq_len=SEQ, steps=2, batch_size=4),
    stage("kd", "kd", student="small", teacher="big", data="tasks", seq_len=SEQ, steps=2,
          batch_size=4),
    stage("half", "sft", student="small", data="tasks", seq_len=SEQ, steps=1, batch_size=4,
          train_fraction=0.5),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    folder = tmp_path_factory.mktemp("pairs")
    tiny = TinyRun(STAGES, folder / "spec", folder / "run")
    tiny.run("sft")
    tiny.run("kd")
    return tiny


def test_sft_rows_and_first_step_loss(run: TinyRun) -> None:
    """Row layout `[bos] + prompt + response + [eos]`, right-padded; the first step's loss is
    the mean CE over response tokens and eos of the initial student on that batch."""
    job = build_job(run.ctx("sft"))
    tok = job.tokenizer
    batch = {k: v[0] for k, v in job.batch(0).items()}  # grad_accum 1
    mask = batch["attention_mask"].astype(bool)
    targets = batch["labels"] != IGNORE_INDEX
    assert not (targets & ~mask).any() and (~targets & mask).any()  # prompt tokens not counted
    for row, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        counted = labels[labels != IGNORE_INDEX]
        assert counted[-1] == tok.eos_id and row[0] == tok.bos_id
    logits = forward(job.student.params, job.student.config, jnp.asarray(batch["input_ids"]),
                     jnp.asarray(batch["attention_mask"]))
    expected = float(losses.cross_entropy(logits, jnp.asarray(batch["labels"])))
    (progress, *_) = run.of_kind("progress", "sft")
    assert progress.values["loss"] == pytest.approx(expected, rel=1e-5)


def test_kd_on_pairs_mixes_half_and_half(run: TinyRun) -> None:
    """The kd stage's default loss: 0.5·KL(teacher ‖ student) + 0.5·CE, T = 1; the logged
    tokens exclude padding."""
    (metrics,) = [e.values for e in run.of_kind("metrics", "kd")]
    assert set(metrics) >= {"kd", "ce", "loss"}
    assert metrics["loss"] == pytest.approx(0.5 * metrics["kd"] + 0.5 * metrics["ce"],
                                            rel=1e-5)
    job = build_job(run.ctx("kd"))
    read = sum(int(job.batch(s)["attention_mask"].sum()) for s in range(2))
    assert metrics["tokens"] == read < 2 * 4 * SEQ


def test_train_fraction_keeps_a_seeded_half(run: TinyRun) -> None:
    full, half = build_job(run.ctx("sft")), build_job(run.ctx("half"))
    assert len(half.rows) == 24 and len(full.rows) == 48
    as_set = {tuple(row) for row in full.rows.tokens.tolist()}
    assert {tuple(row) for row in half.rows.tokens.tolist()} <= as_set
    again = build_job(run.ctx("half"))
    np.testing.assert_array_equal(again.rows.tokens, half.rows.tokens)
