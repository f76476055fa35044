"""Helpers shared by the JAX backend tests: tiny transformers models to compare against."""

from __future__ import annotations

from typing import Any

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def hf_config(model_type: str, **overrides: Any) -> Any:
    """A tiny transformers config of `model_type`. Gemma 2 gets a sliding window shorter than
    the test sequences, soft caps small enough to bite, and a query_pre_attn_scalar that differs
    from head_dim, so getting any of them wrong shows in the logits."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {**TINY}
    if model_type == "gemma2":
        kwargs.update(head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
                      attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_hf_model(config: Any, seed: int = 0) -> Any:
    """A transformers causal LM in fp32 eval mode with every parameter (norm scales and biases
    too, which initialise to constants) perturbed, so each one matters for the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # eager: the only attention with Gemma 2's soft-capping, and plain fp32 matmuls for all.
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model
