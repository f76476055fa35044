"""Run a `train` node: build tokenizer, student, data and objective; train; save the student."""

from __future__ import annotations

import random
from typing import Any

from kdspec.run.backend import NodeContext
from kdspec.spec.stages.common import TrainStage

from .batches import EpochSampler, TokenData, build_token_data, order_seed, read_records
from .models import load_model, save_model
from .objectives import objective_module
from .objectives.base import Setup
from .runtime import autocast_dtype, derive_seed, device, make_deterministic, seed_everything
from .tokenizer import load_tokenizer
from .trainer import TrainJob, train, write_measured


def stage_of(ctx: NodeContext) -> Any:
    """The node's stage as the typed spec object."""
    for stage in ctx.spec.stages:
        if stage.name == ctx.node.stage:
            return stage
    raise KeyError(f"node `{ctx.node.id}` names stage `{ctx.node.stage}`, which the spec lacks")


def load_data(ctx: NodeContext, stage: TrainStage, layout: str, tokenizer: Any) -> TokenData:
    config = ctx.node.config
    records = read_records(config["data"], seed=config["seed"], spec_dir=ctx.spec_dir)
    fraction = getattr(stage, "train_fraction", None)
    if fraction is not None:
        keep = max(1, round(fraction * len(records)))
        records = random.Random(derive_seed(config["seed"], "fraction")).sample(records, keep)
    return build_token_data(layout, records, tokenizer, stage.seq_len)


def run_train_node(ctx: NodeContext) -> None:
    stage = stage_of(ctx)
    module = objective_module(stage.kind)
    config = ctx.node.config
    make_deterministic()
    dev = device()
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=ctx.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    student = load_model(config["student"], ctx=ctx, role="student", tokenizer=tokenizer,
                         dev=dev, trainable=True)
    if stage.recompute:
        student.gradient_checkpointing_enable()
    setup = Setup(ctx, stage, tokenizer, student, dev)
    custom = getattr(module, "load_data", None)
    data = custom(setup) if custom else load_data(ctx, stage, module.LAYOUT, tokenizer)
    prepare = getattr(module, "prepare_data", None)  # e.g. seqkd: the teacher's answers
    if prepare:
        data = prepare(setup, data)
    objective = module.build(setup)
    seed_everything(derive_seed(config["seed"], "train", stage.name))
    job = TrainJob(ctx, stage, student, objective, data,
                   EpochSampler(len(data), order_seed(config["seed"], config["data"])), dev,
                   autocast_dtype(stage.precision, dev))
    state = train(job)
    save_model(student, tokenizer, ctx.node_dir / "model")
    write_measured(ctx, state)
