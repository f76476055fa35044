"""The learning-rate schedule by hand, and AdamW + clipping against torch's."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdspec.spec.stages.common import OptimizerConfig, ScheduleConfig
from kdspec_jax.optim import build_optimizer, lr_factor, lr_schedule


def _factors(kind: str, *, total: int, warmup: int, ratio: float = 0.1) -> list[float]:
    config = ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=ratio)
    return [float(lr_factor(s, total=total, config=config)) for s in range(total)]


def test_cosine_with_warmup_by_hand() -> None:
    """total 7, warmup 2: steps 0,1 at 1/2, 2/2; decay over steps 2..6, p = (s − 2)/4."""
    got = _factors("cosine", total=7, warmup=2)
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1)]
    np.testing.assert_allclose(got, [0.5, 1.0, *cos], rtol=1e-6)
    assert got[4] == pytest.approx(0.55)  # halfway: the mean of peak and floor
    assert got[-1] == pytest.approx(0.1)


def test_linear_and_constant_by_hand() -> None:
    np.testing.assert_allclose(_factors("linear", total=5, warmup=0, ratio=0.2),
                               [1.0, 0.8, 0.6, 0.4, 0.2], rtol=1e-6)
    np.testing.assert_allclose(_factors("constant", total=5, warmup=4),
                               [0.25, 0.5, 0.75, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(_factors("cosine", total=1, warmup=0), [1.0])
    # Past the budget the factor stays at the floor.
    config = ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.2)
    assert float(lr_factor(50, total=5, config=config)) == pytest.approx(0.2)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_matches_torch_backend(kind: str) -> None:
    pytest.importorskip("torch")
    torch_optim = pytest.importorskip("kdspec_torch.optim")
    config = ScheduleConfig(kind=kind, warmup_steps=3, min_lr_ratio=0.05)
    for total in (3, 4, 11):
        expected = [torch_optim.lr_factor(s, total=total, config=config) for s in range(total)]
        got = [float(lr_factor(s, total=total, config=config)) for s in range(total)]
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_lr_schedule_scales_the_peak() -> None:
    fn = lr_schedule(OptimizerConfig(lr=0.5), ScheduleConfig(warmup_steps=4), 10)
    assert float(fn(jnp.int32(1))) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="total_steps"):
        lr_schedule(OptimizerConfig(), ScheduleConfig(), 0)


def test_adamw_with_clipping_and_decay_matches_torch() -> None:
    """Four steps on fixed gradients (the first clipped): weights equal torch's AdamW with
    decay on matrices only, clip_grad_norm_ and the same LambdaLR schedule."""
    torch = pytest.importorskip("torch")
    torch_optim = pytest.importorskip("kdspec_torch.optim")
    opt_cfg = OptimizerConfig(lr=0.05, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.3,
                              grad_clip=1.0)
    sched = ScheduleConfig(kind="cosine", warmup_steps=1, min_lr_ratio=0.1)
    rng = np.random.default_rng(0)
    start = {"embed_tokens": rng.normal(size=(3, 2)), "norm": rng.normal(size=(2,))}
    grads = [{k: rng.normal(size=v.shape) * (5.0 if i == 0 else 0.3) for k, v in start.items()}
             for i in range(4)]

    opt = build_optimizer(opt_cfg, sched, total_steps=4)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in start.items()}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()},
                                    state, params)
        params = optax.apply_updates(params, updates)

    module = torch.nn.Module()
    module.embed = torch.nn.Parameter(torch.tensor(start["embed_tokens"], dtype=torch.float32))
    module.norm = torch.nn.Parameter(torch.tensor(start["norm"], dtype=torch.float32))
    t_opt = torch_optim.build_optimizer(module, opt_cfg)
    t_sched = torch_optim.build_scheduler(t_opt, sched, total=4)
    for g in grads:
        module.embed.grad = torch.tensor(g["embed_tokens"], dtype=torch.float32)
        module.norm.grad = torch.tensor(g["norm"], dtype=torch.float32)
        torch.nn.utils.clip_grad_norm_(module.parameters(), opt_cfg.grad_clip)
        t_opt.step()
        t_sched.step()
    np.testing.assert_allclose(params["embed_tokens"], module.embed.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(params["norm"], module.norm.detach().numpy(), atol=1e-5)
    moved = np.abs(np.asarray(params["norm"]) - start["norm"]).max()
    assert moved > 1e-2  # the comparison is not between two unmoved copies


def _second_update(grad_clip: float | None) -> np.ndarray:
    opt = build_optimizer(OptimizerConfig(lr=1.0, grad_clip=grad_clip),
                          ScheduleConfig(kind="constant"), 2)
    params = {"w": jnp.zeros((2, 2))}
    state = opt.init(params)
    for g in (100.0, 1.0):
        updates, state = opt.update({"w": jnp.full((2, 2), g)}, state, params)
    return np.asarray(updates["w"])


def test_clipping_by_hand() -> None:
    """Gradients 100 then 1 (per element, 4 elements). Unclipped, step 2 is
    m̂/√v̂ = ((.9·.1·100 + .1·1)/(1 − .9²)) / sqrt((.999·.001·100² + .001·1)/(1 − .999²)).
    Clipped to norm 1, both gradients become 0.5 per element and the step is 1."""
    m_hat = (0.9 * 0.1 * 100 + 0.1 * 1) / (1 - 0.9**2)
    v_hat = (0.999 * 0.001 * 100**2 + 0.001 * 1) / (1 - 0.999**2)
    np.testing.assert_allclose(_second_update(None), -m_hat / math.sqrt(v_hat), rtol=1e-4)
    np.testing.assert_allclose(_second_update(1.0), -1.0, rtol=1e-4)
