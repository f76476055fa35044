"""The JAX backend's MiniLLM: each math function against a hand value and against the torch
backend's on random inputs, the sampling warps and teacher-mixed sampling, and a tiny
pretrain → minillm run that resumes at a round boundary."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdspec_jax import minillm as jm
from kdspec_jax.generate import sample_generate, sampling_probs, warp_logits
from kdspec_jax.model import JaxModelConfig, init_params

torch = pytest.importorskip("torch")
tm = pytest.importorskip("kdspec_torch.minillm.math")
torch_generate = pytest.importorskip("kdspec_torch.generate")

RNG = np.random.default_rng(0)
B, R, V = 3, 6, 11
S_LOGITS = RNG.normal(size=(B, R, V)).astype(np.float32) * 2
T_LOGITS = RNG.normal(size=(B, R, V)).astype(np.float32) * 2
TOKENS = RNG.integers(0, V, size=(B, R))
MASK = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5], bool)
REWARDS = RNG.normal(size=(B, R)).astype(np.float32)
LOGQ = -np.abs(RNG.normal(size=(B, R))).astype(np.float32)
LOGP = -np.abs(RNG.normal(size=(B, R))).astype(np.float32) * 3


def _t(x: np.ndarray) -> Any:
    return torch.as_tensor(x)


def _close(ours: Any, theirs: Any, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=tol, atol=tol)


def test_hand_values() -> None:
    # w = q / (α p + (1 − α) q): q = 0.5, p = 0.25, α = 0.2 → 0.5 / (0.05 + 0.4) = 10/9.
    w = jm.importance_weights(jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25])), 0.2)
    assert float(w[0]) == pytest.approx(10 / 9, rel=1e-6)
    # R = [1 + 0.5·(2 + 0.5·3), 2 + 0.5·3, 3] = [2.75, 3.5, 3]; N = [3, 2, 1].
    returns = jm.discounted_returns(jnp.array([[1.0, 2.0, 3.0]]), 0.5)
    np.testing.assert_allclose(returns, [[2.75, 3.5, 3.0]])
    mask = jnp.array([[True, True, True]])
    np.testing.assert_allclose(jm.normalised_returns(jnp.array([[1.0, 2.0, 3.0]]), mask,
                                                     gamma=0.5), [[2.75 / 3, 1.75, 3.0]])
    # r = clip((log p − log q) / 0.5, ±1): (−1 − −3)/0.5 = 4 → 1.
    r = jm.token_rewards(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([True]),
                         reward_scaling=0.5, cliprange_reward=1.0)
    assert float(r[0]) == 1.0
    # PPO: A = 1, ρ = 1.5, ε = 0.2 → max(−1.5, −1.2) = −1.2.
    loss = jm.ppo_policy_loss(jnp.array([1.5]), jnp.array([1.0]), jnp.array([True]), 0.2)
    assert float(loss) == pytest.approx(-1.2)
    # KL of [1/2, 1/2] against [1/4, 3/4] = ½ log 2 + ½ log(2/3).
    kl = jm.per_token_reverse_kl(jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.25, 0.75])))
    assert float(kl) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_weights_and_rewards_match_torch(alpha: float) -> None:
    _close(jm.importance_weights(LOGQ, LOGP, alpha), tm.importance_weights(_t(LOGQ), _t(LOGP),
                                                                           alpha))
    _close(jm.mixture_probs(np.exp(LOGQ), np.exp(LOGP), alpha),
           tm.mixture_probs(_t(np.exp(LOGQ)), _t(np.exp(LOGP)), alpha))
    _close(jm.token_rewards(LOGP, LOGQ, MASK, reward_scaling=0.5, cliprange_reward=2.0),
           tm.token_rewards(_t(LOGP), _t(LOGQ), _t(MASK), reward_scaling=0.5,
                            cliprange_reward=2.0))


@pytest.mark.parametrize("length_norm", [True, False])
def test_returns_and_advantages_match_torch(length_norm: bool) -> None:
    _close(jm.discounted_returns(REWARDS, 0.9), tm.discounted_returns(_t(REWARDS), 0.9))
    _close(jm.remaining_tokens(MASK), tm.remaining_tokens(_t(MASK)))
    _close(jm.masked_whiten(REWARDS, MASK), tm.masked_whiten(_t(REWARDS), _t(MASK)))
    _close(jm.advantages(REWARDS, MASK, gamma=0.95, length_norm=length_norm),
           tm.advantages(_t(REWARDS), _t(MASK), gamma=0.95, length_norm=length_norm))


def test_policy_and_single_step_terms_match_torch() -> None:
    keep = RNG.random((B, R, V)) < 0.7
    keep[..., 0] = True
    s, t = jm.tempered(S_LOGITS, 0.8, keep), jm.tempered(T_LOGITS, 0.8, keep)
    s_t = tm.tempered(_t(S_LOGITS), 0.8, _t(keep))
    t_t = tm.tempered(_t(T_LOGITS), 0.8, _t(keep))
    tokens = np.where(keep[np.arange(B)[:, None], np.arange(R), TOKENS], TOKENS, 0)
    _close(jm.token_logprobs(s, tokens), tm.token_logprobs(s_t, _t(tokens)))
    weights = np.exp(-np.abs(REWARDS))
    ratio = jm.policy_ratio(jm.token_logprobs(s, tokens), LOGQ, weights, MASK)
    ratio_t = tm.policy_ratio(tm.token_logprobs(s_t, _t(tokens)), _t(LOGQ), _t(weights),
                              _t(MASK))
    _close(ratio, ratio_t)
    adv = REWARDS
    _close(jm.ppo_policy_loss(ratio, adv, MASK, 0.2), tm.ppo_policy_loss(ratio_t, _t(adv),
                                                                       _t(MASK), 0.2))
    _close(jm.clip_fraction(ratio, MASK, 0.2), tm.clip_fraction(ratio_t, _t(MASK), 0.2))
    _close(jm.per_token_reverse_kl(s, t), tm.per_token_reverse_kl(s_t, t_t))
    _close(jm.single_step_loss(s, t, MASK), tm.single_step_loss(s_t, t_t, _t(MASK)))


def test_single_step_gradient_is_finite_with_excluded_tokens_and_matches_torch() -> None:
    keep = np.ones((B, R, V), bool)
    keep[..., :4] = False
    grad = jax.grad(lambda x: jm.single_step_loss(jm.tempered(x, 1.0, keep),
                                                  jm.tempered(T_LOGITS, 1.0, keep), MASK))
    ours = grad(jnp.asarray(S_LOGITS))
    assert bool(jnp.all(jnp.isfinite(ours))) and float(jnp.abs(ours[..., :4]).max()) == 0.0
    x = _t(S_LOGITS).requires_grad_()
    tm.single_step_loss(tm.tempered(x, 1.0, _t(keep)), tm.tempered(_t(T_LOGITS), 1.0,
                                                                   _t(keep)), _t(MASK)).backward()
    _close(ours, x.grad)


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5])
def test_pretrain_loss_matches_torch(kd_ratio: float) -> None:
    labels = np.where(MASK, TOKENS, -100)
    ours = jm.pretrain_loss(S_LOGITS, labels, teacher_logits=T_LOGITS, kd_ratio=kd_ratio)
    theirs = tm.pretrain_loss(_t(S_LOGITS), _t(labels), teacher_logits=_t(T_LOGITS),
                              kd_ratio=kd_ratio)
    _close(ours["total"], theirs.total)
    _close(ours["lm"], theirs.lm)
    assert ("distil" in ours) == (theirs.distil is not None)


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.5)])
def test_warps_match_torch(top_k: int, top_p: float) -> None:
    sampling = torch_generate.Sampling(max_new_tokens=1, temperature=0.7, top_k=top_k,
                                       top_p=top_p)
    ours = warp_logits(jnp.asarray(S_LOGITS), 0.7, top_k, top_p)
    theirs = torch_generate.warp_logits(_t(S_LOGITS), sampling)
    np.testing.assert_array_equal(np.isfinite(np.asarray(ours)), torch.isfinite(theirs).numpy())
    _close(sampling_probs(jnp.asarray(S_LOGITS), 0.7, top_k, top_p),
           torch_generate.sampling_probs(_t(S_LOGITS), sampling))


def _tiny(seed: int, vocab: int = 7) -> tuple[Any, JaxModelConfig]:
    config = JaxModelConfig.from_hf({"model_type": "llama", "vocab_size": vocab,
                                     "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "num_key_value_heads": 1, "max_position_embeddings": 32})
    return init_params(config, jax.random.key(seed)), config


def test_teacher_mixed_sampling_draws_from_the_mixture() -> None:
    """First tokens of many copies of one prompt: their frequencies match
    ``(1 − α)·q + α·p`` of the two models' first-step distributions (χ²-sized tolerance)."""
    from kdspec_jax.model import forward

    (sp, sc), (tp, tc) = _tiny(0), _tiny(1)
    ids = np.tile(np.array([[1, 2, 3]], np.int32), (512, 1))
    mask = np.ones_like(ids, bool)
    out = sample_generate(sp, sc, ids, mask, max_new_tokens=1, eos_id=99, pad_id=0,
                          key=jax.random.key(3), temperature=1.0, mix=(tp, tc), mix_alpha=0.5)
    counts = np.bincount(out.tokens[:, 0], minlength=7) / 512
    q = jax.nn.softmax(forward(sp, sc, ids[:1])[0, -1])
    p = jax.nn.softmax(forward(tp, tc, ids[:1])[0, -1])
    expected = np.asarray(0.5 * q + 0.5 * p)
    assert np.abs(counts - expected).max() < 4 * math.sqrt(0.25 / 512)
    assert (out.lengths == 1).all() and not out.finished.any()


def test_sampling_stops_a_row_at_its_eos_and_pads_after_it() -> None:
    params, config = _tiny(0)
    ids = np.tile(np.array([[1, 2]], np.int32), (64, 1))
    out = sample_generate(params, config, ids, np.ones_like(ids, bool), max_new_tokens=5,
                          eos_id=3, pad_id=0, key=jax.random.key(0), temperature=1.5)
    for row, n in zip(out.tokens, out.lengths, strict=True):
        eos = np.flatnonzero(row == 3)
        if eos.size:
            assert n == eos[0] + 1 and (row[n:] == 0).all()
        else:
            assert n == 5
    assert out.finished.sum() == sum((row[:n] == 3).any() for row, n in
                                     zip(out.tokens, out.lengths, strict=True))


# ---- a tiny run: pretrain → minillm, resumed at a round boundary ----------------------------

def _plan(tmp_path: Path) -> tuple[Any, Any]:
    from kdspec.plan.planner import build_plan
    from kdspec.spec import Spec

    arch = {"family": "llama", "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
            "d_ff": 48, "max_seq_len": 64}
    spec = Spec.model_validate({
        "kdspec": 1, "name": "mini", "seed": 0, "tokenizer": "builtin:words",
        "models": {"big": {"arch": arch}, "small": {"arch": arch}},
        "data": {"tasks": {"source": "builtin:instructions", "n": 32}},
        "stages": [
            {"name": "teacher", "kind": "sft", "student": "big", "data": "tasks", "steps": 2,
             "batch_size": 4, "seq_len": 24, "log_every": 1},
            {"name": "mini", "kind": "minillm", "student": "small", "teacher": "teacher",
             "data": "tasks", "pretrain_data": "tasks", "steps": 4, "batch_size": 4,
             "num_rollouts": 4, "ppo_epochs": 2, "max_prompt_length": 16, "max_length": 22,
             "seq_len": 24, "log_every": 1, "checkpoint_every": 2,
             "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant", "warmup_steps": 0},
             "top_k": 5},
        ]})
    plan = build_plan(spec, base_dir=tmp_path, estimate=False)
    assert not plan.errors, plan.errors
    return spec, plan


def _run(spec: Any, plan: Any, tmp_path: Path, node_id: str, events: list[Any]) -> None:
    from kdspec.run.backend import NodeContext
    from kdspec_jax.backend import JaxBackend

    backend = JaxBackend()
    assert backend.supports(plan.node(node_id))
    backend.run_node(NodeContext(plan.node(node_id), plan, spec, tmp_path, tmp_path / "run",
                                 tmp_path / "run" / node_id, events.append))


@pytest.mark.slow
def test_minillm_trains_logs_and_resumes_at_a_round_boundary(tmp_path: Path) -> None:
    spec, plan = _plan(tmp_path)
    events: list[Any] = []
    _run(spec, plan, tmp_path, "teacher", events)
    _run(spec, plan, tmp_path, "mini", events)
    node = tmp_path / "run" / "mini"
    rounds = [e.values for e in events if e.kind == "metrics" and "round" in e.values]
    steps = [e.values for e in events if e.kind == "metrics" and e.node == "mini"
             and "pg_loss" in e.values]
    assert [r["round"] for r in rounds] == [0, 1]  # 2 steps per round (2 epochs × 1 batch)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    first = steps[0]
    # Epoch 0 of a round: the policy is the one that sampled, so ρ = w on average ≤ 1/(1 − α).
    assert 0 < first["ratio"] <= 1 / 0.8 + 1e-5
    assert first["loss"] == pytest.approx(first["rl_loss"] + first["pt_loss"], rel=1e-5)
    assert first["pt_loss"] == pytest.approx(0.5 * first["lm_loss"] + 0.5 * first["ds_loss"],
                                             rel=1e-5)
    assert first["rl_loss"] == pytest.approx(first["pg_loss"] + first["reg_loss"], rel=1e-5)
    assert all(np.isfinite(list(s.values())).all() for s in steps)
    assert json.loads((node / "measured.json").read_text())["steps"] == 4
    final = (node / "model" / "model.safetensors").read_bytes()
    # Resume from the round-boundary checkpoint at step 2: same rollouts, same final weights.
    checkpoints = sorted((node / "checkpoints").iterdir())
    assert len(checkpoints) == 2  # steps 2 and 4, the ends of rounds 0 and 1
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(node / "model")
    _run(spec, plan, tmp_path, "mini", events)
    assert (node / "model" / "model.safetensors").read_bytes() == final


def test_the_ppo_step_does_not_depend_on_the_micro_batch_split() -> None:
    """grad_accum 2 weights each half by its share of response tokens / pre-training targets:
    the same loss, terms and update as one pass over the whole step."""
    import optax

    from kdspec_jax.train_step import init_train_state

    (sp, sc), (tp, tc) = _tiny(0, vocab=13), _tiny(1, vocab=13)
    rng = np.random.default_rng(1)
    n, p, r = 4, 5, 6
    mask = np.arange(r)[None, :] < np.array([[6], [2], [4], [1]])
    prompt_mask = np.arange(p)[None, :] >= np.array([[0], [3], [1], [2]])
    response = np.where(mask, rng.integers(0, 13, (n, r)), 0)
    batch = {"response": response, "mask": mask,
             "old_logprobs": np.where(mask, -rng.random((n, r)) * 3, 0).astype(np.float32),
             "weights": np.where(mask, 0.5 + rng.random((n, r)), 0).astype(np.float32),
             "rewards": np.where(mask, rng.normal(size=(n, r)), 0).astype(np.float32),
             **jm.sequence_inputs(rng.integers(0, 13, (n, p)), prompt_mask, response, mask)}
    labels = np.where(rng.random((n, 8)) < 0.6, rng.integers(0, 13, (n, 8)), -100)
    labels[1] = -100
    labels[1, 0] = 3  # uneven target counts across the halves
    batch.update(pt_input_ids=rng.integers(0, 13, (n, 8)).astype(np.int32), pt_labels=labels,
                 pt_attention_mask=np.ones((n, 8), np.int32))
    optimizer = optax.sgd(0.1)
    results = []
    for accum in (1, 2):
        ppo = jm.PPOConfig(temperature=0.9, grad_accum=accum, kd_ratio=0.5)
        step = jax.jit(jm.make_ppo_step(sc, tc, ppo, optimizer, lambda s: 0.1))
        state, metrics = step(init_train_state(sp, optimizer), batch, tp)
        results.append((state.params, metrics))
    (params_1, m1), (params_2, m2) = results
    for key in ("loss", "pg_loss", "reg_loss", "pt_loss", "lm_loss", "ds_loss", "grad_norm"):
        assert float(m1[key]) == pytest.approx(float(m2[key]), rel=1e-5), key
    assert float(m1["loss"]) == pytest.approx(float(m1["rl_loss"] + m1["pt_loss"]), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(params_2),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_ppo_step_loss_matches_the_torch_math_on_transformers(tmp_path: Path) -> None:
    """The step's terms from transformers models with the same weights, the torch backend's
    collate / response_logits and its math functions (no pre-training batch)."""
    import optax
    from transformers import AutoModelForCausalLM

    from kdspec_jax.train_step import init_train_state
    from kdspec_jax.weights import save_hf
    from kdspec_torch.minillm import rollout as tr

    (sp, sc), (tp, tc) = _tiny(0, vocab=13), _tiny(1, vocab=13)
    models = []
    for name, params, config in (("s", sp, sc), ("t", tp, tc)):
        save_hf(params, config, tmp_path / name)
        models.append(AutoModelForCausalLM.from_pretrained(
            tmp_path / name, dtype=torch.float32, attn_implementation="eager").eval())
    rng = np.random.default_rng(2)
    lengths, prompt_lengths = [6, 2, 4], [5, 2, 3]
    prompts = [rng.integers(1, 13, n).tolist() for n in prompt_lengths]
    responses = [rng.integers(1, 13, n) for n in lengths]
    mask = np.arange(6)[None, :] < np.array(lengths)[:, None]
    response = np.zeros((3, 6), np.int64)
    for i, row in enumerate(responses):
        response[i, : len(row)] = row
    old = np.where(mask, -rng.random((3, 6)) * 3, 0).astype(np.float32)
    weights = np.where(mask, 0.5 + rng.random((3, 6)), 0).astype(np.float32)
    rewards = np.where(mask, rng.normal(size=(3, 6)), 0).astype(np.float32)
    from kdspec_jax.generate import left_pad as jax_left_pad

    prompt_ids, prompt_mask = jax_left_pad(prompts, 0)
    batch = {"response": response, "mask": mask, "old_logprobs": old, "weights": weights,
             "rewards": rewards, **jm.sequence_inputs(prompt_ids, prompt_mask, response, mask)}
    ppo = jm.PPOConfig(temperature=0.8, clip_range=0.2, gamma=0.9)
    step = jax.jit(jm.make_ppo_step(sc, tc, ppo, optax.sgd(0.0), lambda s: 0.0))
    _, ours = step(init_train_state(sp, optax.sgd(0.0)), batch, tp)

    torch_batch = tr.collate(prompts, [torch.as_tensor(r) for r in responses], 0)
    with torch.no_grad():
        s = tm.tempered(tr.response_logits(models[0], torch_batch), 0.8)
        t = tm.tempered(tr.response_logits(models[1], torch_batch), 0.8)
    tmask = torch.as_tensor(mask)
    adv = tm.advantages(torch.as_tensor(rewards), tmask, gamma=0.9)
    ratio = tm.policy_ratio(tm.token_logprobs(s, torch.as_tensor(response)), torch.as_tensor(old),
                            torch.as_tensor(weights), tmask)
    pg = tm.ppo_policy_loss(ratio, adv, tmask, 0.2)
    reg = tm.single_step_loss(s, t, tmask)
    assert float(ours["pg_loss"]) == pytest.approx(float(pg), rel=1e-4, abs=1e-6)
    assert float(ours["reg_loss"]) == pytest.approx(float(reg), rel=1e-4)
    assert float(ours["loss"]) == pytest.approx(float(pg + reg), rel=1e-4, abs=1e-6)
