"""Matmul FLOPs counted from the jaxpr: by hand, through scans, and against torch's counter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kdspec_jax.flops import matmul_flops
from kdspec_jax.model import JaxModelConfig, forward, init_params


def test_a_matmul_by_hand() -> None:
    a, b = jnp.ones((3, 5)), jnp.ones((5, 7))
    assert matmul_flops(jnp.matmul, a, b) == 2 * 3 * 5 * 7
    batched = jnp.ones((4, 3, 5))
    assert matmul_flops(lambda x: jnp.einsum("bij,jk->bik", x, b), batched) == 2 * 4 * 3 * 5 * 7
    assert matmul_flops(lambda x: jnp.tanh(x) + 1, a) == 0  # element-wise ops do not count


def test_scan_bodies_count_once_per_iteration() -> None:
    """XLA's cost analysis counts a loop body once; this counter multiplies by the length."""
    w = jnp.ones((6, 4, 4))

    def f(x: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]

    assert matmul_flops(f, jnp.ones((2, 4))) == 6 * 2 * 2 * 4 * 4
    assert matmul_flops(jax.grad(lambda x: f(x).sum()), jnp.ones((2, 4))) == 6 * 2 * 2 * 4 * 4 * 2
    with pytest.raises(ValueError, match="while loop"):
        matmul_flops(lambda x: jax.lax.while_loop(lambda c: c[1] < 3,
                                                  lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0],
                     jnp.ones((2, 2)))


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_forward_and_backward_match_torch_flop_counter(model_type: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    extra = {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4} \
        if model_type == "gemma2" else {}
    hf = transformers.AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, **extra)
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager")
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros((2, 16), dtype=torch.long)).logits.sum().backward()
    config = JaxModelConfig.from_hf(hf.to_dict())
    params = init_params(config, jax.random.key(0))
    ids = jnp.zeros((2, 16), jnp.int32)
    ours = matmul_flops(jax.grad(lambda p: forward(p, config, ids).sum()), params)
    assert ours == counter.get_total_flops()
