"""Train steps on tiny models: the loss is the batch mean, accumulation changes nothing, KD
uses the frozen teacher, and a few steps learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdspec.spec.stages.common import OptimizerConfig, ScheduleConfig
from kdspec_jax import losses
from kdspec_jax.model import JaxModelConfig, forward, init_params
from kdspec_jax.optim import build_optimizer, lr_schedule
from kdspec_jax.train_step import (
    ce_objective,
    init_train_state,
    kd_objective,
    make_eval_step,
    make_train_step,
    split_micro_batches,
)

STUDENT = JaxModelConfig(
    model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=4,
)
TEACHER = JaxModelConfig.from_hf({
    "model_type": "gemma2", "vocab_size": 32, "hidden_size": 24, "intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
    "sliding_window": 4, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 20.0,
    "final_logit_softcapping": 10.0,
})
OPT = OptimizerConfig(lr=1e-2, weight_decay=0.1)
SCHED = ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
TOTAL = 10


def _batch(rows: int = 8, seq: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows with different numbers of counted labels, so a mean of micro-batch means would
    differ from the batch mean."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 32, (rows, seq + 1))
    labels = tokens[:, 1:].copy()
    for r in range(rows):
        labels[r, : 2 * r] = losses.IGNORE_INDEX  # row r predicts only its last seq − 2r tokens
    mask = np.ones((rows, seq), np.int32)
    mask[1, 9:] = 0  # a right-padded row: its padding is never a target
    labels[1, 9:] = losses.IGNORE_INDEX
    return {"input_ids": tokens[:, :-1], "labels": labels, "attention_mask": mask}


@pytest.fixture(scope="module")
def ce_setup():  # noqa: ANN201
    opt = build_optimizer(OPT, SCHED, TOTAL)
    step = jax.jit(make_train_step(ce_objective(STUDENT), opt,
                                   lr_fn=lr_schedule(OPT, SCHED, TOTAL)))
    params = init_params(STUDENT, jax.random.key(0))
    return opt, step, params


def test_loss_is_the_mean_over_counted_positions(ce_setup) -> None:  # noqa: ANN001
    opt, step, params = ce_setup
    batch = _batch()
    state, metrics = step(init_train_state(params, opt), split_micro_batches(batch, 1))
    logits = forward(params, STUDENT, jnp.asarray(batch["input_ids"]),
                     jnp.asarray(batch["attention_mask"]))
    expected = losses.cross_entropy(logits, jnp.asarray(batch["labels"]))
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert int(metrics["n_targets"]) == int((batch["labels"] != -100).sum())
    assert float(metrics["lr"]) == pytest.approx(OPT.lr / SCHED.warmup_steps)
    assert int(state.step) == 1


def test_grad_accumulation_equals_one_big_batch(ce_setup) -> None:  # noqa: ANN001
    opt, step, params = ce_setup
    batch = _batch()
    one, m1 = step(init_train_state(params, opt), split_micro_batches(batch, 1))
    two, m2 = step(init_train_state(params, opt), split_micro_batches(batch, 2))
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(
            two.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The test can tell: averaging the two micro-batch means would give another number.
    logits = forward(params, STUDENT, jnp.asarray(batch["input_ids"]),
                     jnp.asarray(batch["attention_mask"]))
    labels = jnp.asarray(batch["labels"])
    means = [float(losses.cross_entropy(logits[i:i + 4], labels[i:i + 4])) for i in (0, 4)]
    assert abs(np.mean(means) - float(m1["loss"])) > 1e-3


def test_a_few_steps_lower_the_loss(ce_setup) -> None:  # noqa: ANN001
    opt, step, params = ce_setup
    batch = split_micro_batches(_batch(), 2)
    state = init_train_state(params, opt)
    history = []
    for _ in range(TOTAL):
        state, metrics = step(state, batch)
        history.append(float(metrics["loss"]))
    assert history[-1] < 0.8 * history[0]
    assert int(state.step) == TOTAL


def test_eval_step_gives_the_perplexity(ce_setup) -> None:  # noqa: ANN001
    _, _, params = ce_setup
    batch = _batch(seed=3)
    sums = jax.jit(make_eval_step(ce_objective(STUDENT)))(params, split_micro_batches(batch, 2))
    logits = forward(params, STUDENT, jnp.asarray(batch["input_ids"]),
                     jnp.asarray(batch["attention_mask"]))
    ce = float(losses.cross_entropy(logits, jnp.asarray(batch["labels"])))
    assert float(sums["loss_sum"]) / int(sums["n_targets"]) == pytest.approx(ce, rel=1e-6)
    assert float(sums["ce_sum"]) == pytest.approx(float(sums["loss_sum"]), rel=1e-6)


def _teacher() -> dict:
    # Weights ×10: a peaked teacher the random student is far from.
    return jax.tree_util.tree_map(lambda w: 10 * w, init_params(TEACHER, jax.random.key(2)))


def test_kd_objective_is_the_torch_backends_kd_loss() -> None:
    """ℓ = (1 − w)·s·JSD_β,T + w·CE summed over counted positions, evaluated directly."""
    temperature, weight, beta = 2.0, 0.25, 0.3
    objective = kd_objective(STUDENT, TEACHER, divergence="jsd", beta=beta,
                             temperature=temperature, hard_label_weight=weight,
                             soft_scale=temperature**2)
    student, teacher = init_params(STUDENT, jax.random.key(1)), _teacher()
    batch = {k: jnp.asarray(v) for k, v in _batch(seed=4).items()}
    total, parts = objective(student, batch, teacher)
    s_logits = forward(student, STUDENT, batch["input_ids"], batch["attention_mask"])
    t_logits = forward(teacher, TEACHER, batch["input_ids"], batch["attention_mask"])
    counted = batch["labels"] != losses.IGNORE_INDEX
    n = int(counted.sum())
    soft = losses.generalized_jsd(s_logits, t_logits, beta=beta, temperature=temperature,
                                  mask=counted)
    hard = losses.cross_entropy(s_logits, batch["labels"])
    expected = (1 - weight) * temperature**2 * soft + weight * hard
    assert float(total) / n == pytest.approx(float(expected), rel=1e-5)
    assert float(parts["kd"]) / n == pytest.approx(float(soft), rel=1e-5)
    assert float(parts["ce"]) / n == pytest.approx(float(hard), rel=1e-5)


def test_kd_steps_move_the_student_towards_the_teacher() -> None:
    objective = kd_objective(STUDENT, TEACHER, divergence="reverse_kl", temperature=2.0,
                             hard_label_weight=0.1, soft_scale=4.0)
    opt = build_optimizer(OPT, ScheduleConfig(kind="constant"), TOTAL)
    step = jax.jit(make_train_step(objective, opt))
    student, teacher = init_params(STUDENT, jax.random.key(1)), _teacher()
    batch = _batch(seed=4)
    state = init_train_state(student, opt)
    history = []
    for _ in range(TOTAL):
        state, metrics = step(state, split_micro_batches(batch, 2), teacher)
        history.append(float(metrics["kd"]))
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    expected = losses.reverse_kl(forward(student, STUDENT, ids, mask),
                                 forward(teacher, TEACHER, ids, mask), temperature=2.0,
                                 mask=jnp.asarray(batch["labels"]) != losses.IGNORE_INDEX)
    assert history[0] == pytest.approx(float(expected), rel=1e-5)
    assert history[-1] < 0.7 * history[0]


def test_kd_objective_checks_its_options() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        kd_objective(STUDENT, TEACHER.with_(vocab_size=33))
    with pytest.raises(ValueError, match="unknown divergence"):
        kd_objective(STUDENT, TEACHER, divergence="kl")
    with pytest.raises(ValueError, match="hard_label_weight"):
        kd_objective(STUDENT, TEACHER, hard_label_weight=2.0)
    with pytest.raises(ValueError, match="does not split"):
        split_micro_batches(_batch(rows=6), 4)
