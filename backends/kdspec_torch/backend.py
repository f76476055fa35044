"""`TorchBackend`: runs kdspec plan nodes with PyTorch and transformers models.

Node kinds map to runner functions (`NODE_RUNNERS`, "module:function", imported on first use);
`train` nodes dispatch further on their stage kind (`kdspec_torch.objectives.OBJECTIVES`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kdspec.plan.graph import Node
from kdspec.run.backend import NodeContext

from .objectives import OBJECTIVES

NODE_RUNNERS: dict[str, str] = {
    "train": "kdspec_torch.train_node:run_train_node",
    "teacher_logits": "kdspec_torch.teacher_logits:run_teacher_logits",
    "rationales": "kdspec_torch.step_by_step.rationales_node:run_rationales_node",
    "eval": "kdspec_torch.eval_node:run_eval",
}


# Train stages whose loop is not the generic trainer's (rollouts, PPO epochs) have their own runner.
STAGE_RUNNERS: dict[str, str] = {
    "minillm": "kdspec_torch.minillm.stage:run_minillm_node",
}


def _runner(node: Node) -> Callable[[NodeContext], None]:
    if node.kind == "train" and node.stage_kind in STAGE_RUNNERS:
        target = STAGE_RUNNERS[node.stage_kind]
    else:
        target = NODE_RUNNERS[node.kind]
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


class TorchBackend:
    name = "torch"

    def supports(self, node: Node) -> bool:
        if node.kind not in NODE_RUNNERS:
            return False
        return node.kind != "train" or node.stage_kind in (*OBJECTIVES, *STAGE_RUNNERS)

    def run_node(self, ctx: NodeContext) -> None:
        node = ctx.node
        if not self.supports(node):
            what = f"train node of stage kind `{node.stage_kind}`" if node.kind == "train" \
                else f"`{node.kind}` node"
            raise NotImplementedError(
                f"the torch backend cannot run `{node.id}`, a {what} (node kinds: "
                f"{', '.join(NODE_RUNNERS)}; train stage kinds: "
                f"{', '.join((*OBJECTIVES, *STAGE_RUNNERS))})")
        from transformers.utils import logging

        logging.disable_progress_bar()  # the executor draws its own progress
        _runner(node)(ctx)
