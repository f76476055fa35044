"""`JaxBackend`: runs kdspec plan nodes with the JAX model, optax and a device mesh.

Node kinds map to runner functions (`NODE_RUNNERS`, "module:function", imported on first use,
as in the torch backend); `train` nodes dispatch further on their stage kind
(`kdspec_jax.train_node.OBJECTIVES`: pretrain, sft, pretrain_kd, kd).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kdspec.plan.graph import Node
from kdspec.run.backend import NodeContext

from .train_node import OBJECTIVES, unsupported_reason

__all__ = ["NODE_RUNNERS", "JaxBackend"]

NODE_RUNNERS: dict[str, str] = {
    "train": "kdspec_jax.train_node:run_train_node",
    "teacher_logits": "kdspec_jax.teacher_logits:run_teacher_logits",
    "eval": "kdspec_jax.eval_node:run_eval",
}


def _runner(kind: str) -> Callable[[NodeContext], None]:
    module, _, function = NODE_RUNNERS[kind].partition(":")
    return getattr(importlib.import_module(module), function)


def _why_not(node: Node) -> str | None:
    """Why this backend cannot run `node` (None: it can)."""
    if node.kind not in NODE_RUNNERS:
        return f"a `{node.kind}` node (node kinds: {', '.join(NODE_RUNNERS)})"
    if node.kind == "train":
        reason = unsupported_reason(node.config.get("stage") or {}, node.stage_kind)
        return None if reason is None else f"a train node of {reason}"
    return None


class JaxBackend:
    name = "jax"
    stage_kinds = tuple(OBJECTIVES)

    def supports(self, node: Node) -> bool:
        return _why_not(node) is None

    def run_node(self, ctx: NodeContext) -> None:
        reason = _why_not(ctx.node)
        if reason is not None:
            raise NotImplementedError(f"the jax backend cannot run `{ctx.node.id}`, {reason}")
        _runner(ctx.node.kind)(ctx)
