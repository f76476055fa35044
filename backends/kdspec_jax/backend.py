"""`JaxBackend`: runs kdspec plan nodes with the JAX model, optax and a device mesh.

Node kinds map to runner functions (`NODE_RUNNERS`, "module:function", imported on first use,
as in the torch backend); `train` nodes dispatch further on their stage kind: the kinds of
`kdspec_jax.train_node.OBJECTIVES` (pretrain, sft, pretrain_kd, kd) run the shared train node,
the kinds of `STAGE_RUNNERS` (step_by_step, minillm) their own runner.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from kdspec.plan.graph import Node
from kdspec.run.backend import NodeContext

from .train_node import OBJECTIVES, unsupported_reason

__all__ = ["NODE_RUNNERS", "STAGE_RUNNERS", "JaxBackend"]

NODE_RUNNERS: dict[str, str] = {
    "train": "kdspec_jax.train_node:run_train_node",
    "teacher_logits": "kdspec_jax.teacher_logits:run_teacher_logits",
    "rationales": "kdspec_jax.rationales_node:run_rationales_node",
    "eval": "kdspec_jax.eval_node:run_eval",
}

STAGE_RUNNERS: dict[str, str] = {
    "step_by_step": "kdspec_jax.step_by_step:run_step_by_step_node",
    "minillm": "kdspec_jax.minillm:run_minillm_node",
}
"""Train-node stage kinds with a runner of their own (instead of `run_train_node`)."""

# Each stage runner's check of a node config: "module:function" -> reason or None.
_STAGE_CHECKS: dict[str, str] = {
    "step_by_step": "kdspec_jax.step_by_step:unsupported_reason",
}


def _load(target: str) -> Callable[..., Any]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _runner(node: Node) -> Callable[[NodeContext], None]:
    if node.kind == "train" and node.stage_kind in STAGE_RUNNERS:
        return _load(STAGE_RUNNERS[node.stage_kind])
    return _load(NODE_RUNNERS[node.kind])


def _why_not(node: Node) -> str | None:
    """Why this backend cannot run `node` (None: it can)."""
    if node.kind not in NODE_RUNNERS:
        return f"a `{node.kind}` node (node kinds: {', '.join(NODE_RUNNERS)})"
    if node.kind == "rationales":
        from .rationales_node import unsupported_reason as rationales_reason

        return rationales_reason(node.config)
    if node.kind == "train" and node.stage_kind in STAGE_RUNNERS:
        check = _STAGE_CHECKS.get(node.stage_kind)
        reason = None if check is None else _load(check)(node.config)
        return None if reason is None else f"a {node.stage_kind} train node with {reason}"
    if node.kind == "train":
        reason = unsupported_reason(node.config.get("stage") or {}, node.stage_kind)
        return None if reason is None else f"a train node of {reason}"
    return None


class JaxBackend:
    name = "jax"
    stage_kinds = (*OBJECTIVES, *STAGE_RUNNERS)

    def supports(self, node: Node) -> bool:
        return _why_not(node) is None

    def run_node(self, ctx: NodeContext) -> None:
        reason = _why_not(ctx.node)
        if reason is not None:
            raise NotImplementedError(f"the jax backend cannot run `{ctx.node.id}`, {reason}")
        _runner(ctx.node)(ctx)
