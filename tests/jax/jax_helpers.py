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


# ---- tiny specs run node by node on the JAX backend ----------------------------------------

TINY_ARCH: dict[str, Any] = {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4,
                             "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64}
TEACHER_ARCH: dict[str, Any] = {"family": "gemma2", "d_model": 48, "n_layers": 2, "n_heads": 2,
                                "n_kv_heads": 1, "head_dim": 16, "d_ff": 96, "max_seq_len": 64,
                                "sliding_window": 8, "attn_softcap": 50.0,
                                "final_softcap": 30.0}
SEQ = 32


def stage(name: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A training stage with test-sized defaults: 8 steps of 8 × 32 tokens, lr 3e-3."""
    return {"name": name, "kind": kind, "data": "corpus", "steps": 8, "batch_size": 8,
            "seq_len": SEQ, "log_every": 2, "checkpoint_every": 4, "optimizer": {"lr": 3e-3},
            "schedule": {"warmup_steps": 2}, **fields}


class TinyRun:
    """A planned tiny spec whose nodes run one by one on the JAX backend, recording events."""

    def __init__(self, stages: list[dict[str, Any]], spec_dir: Any, run_dir: Any,
                 zero_stage: int = 0) -> None:
        from kdspec.plan.planner import build_plan
        from kdspec.spec import Spec

        spec_dir.mkdir(parents=True, exist_ok=True)
        self.spec = Spec.model_validate({
            "kdspec": 1, "name": "tiny", "seed": 0, "tokenizer": "builtin:words",
            "models": {"big": {"arch": TEACHER_ARCH}, "small": {"arch": TINY_ARCH}},
            "data": {"corpus": {"source": "builtin:hmm", "n": 48},
                     "tasks": {"source": "builtin:instructions", "n": 48},
                     "held_out": {"source": "builtin:hmm", "split": "eval", "n": 16}},
            "hardware": {"parallelism": {"zero_stage": zero_stage}},
            "stages": stages,
        })
        self.plan = build_plan(self.spec, base_dir=spec_dir, estimate=False)
        assert not self.plan.errors, self.plan.errors
        self.spec_dir, self.run_dir = spec_dir, run_dir
        self.events: list[Any] = []

    def ctx(self, node_id: str, emit: Any = None) -> Any:
        from kdspec.run.backend import NodeContext

        return NodeContext(self.plan.node(node_id), self.plan, self.spec, self.spec_dir,
                           self.run_dir, self.run_dir / node_id, emit or self.events.append)

    def run(self, node_id: str, emit: Any = None) -> None:
        from kdspec_jax.backend import JaxBackend

        JaxBackend().run_node(self.ctx(node_id, emit))

    def of_kind(self, kind: str, node_id: str) -> list[Any]:
        return [e for e in self.events if e.kind == kind and e.node == node_id]
