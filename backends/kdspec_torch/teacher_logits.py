"""Run a `teacher_logits` node: the teacher's top-K or sampled-K slices for every packed row the
matching `pretrain_kd` node will train on, written to the cache (see `teacher_cache`).

The rows are exactly those of the train node's stream: the same records, tokenizer, packing
and seeded epoch sampler, whose first `tokens / seq_len` samples are the train node's
`total_steps · batch_size` samples. The cache is keyed by dataset row, so it does not depend on
the batch size or micro-batching, and a row seen in several epochs is cached once.
"""

from __future__ import annotations

import torch

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event

from .batches import EpochSampler, TokenData, build_token_data, order_seed, read_records
from .models import load_model
from .objectives.base import logits
from .runtime import autocast, autocast_dtype, derive_seed, device, make_deterministic
from .teacher_cache import CacheWriter, weights_fingerprint
from .teacher_slice import sampled_slice, topk_slice
from .tokenizer import load_tokenizer

ROWS_PER_FORWARD = 8


def cached_rows(data: TokenData, config: dict) -> torch.Tensor:
    """Ascending dataset rows among the first `tokens / seq_len` samples of the stream."""
    sampler = EpochSampler(len(data), order_seed(config["seed"], config["data"]))
    n_samples = -(-config["tokens"] // config["seq_len"])
    return sampler.indices(0, n_samples).unique()


def teacher_slices(teacher: torch.nn.Module, data: TokenData, rows: torch.Tensor, *,
                   mode: str, k: int, temperature: float, generator: torch.Generator,
                   amp: torch.dtype | None, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """`(ids, probs)` `[len(rows), seq_len, K]` for `rows`, ROWS_PER_FORWARD rows at a time."""
    ids, probs = [], []
    for part in rows.split(ROWS_PER_FORWARD):
        batch = data.batch(part).to(dev)
        with torch.no_grad(), autocast(amp, dev):
            teacher_logits = logits(teacher, batch).float()
        if mode == "topk":
            slice_ = topk_slice(teacher_logits, k, temperature=temperature)
        else:
            slice_ = sampled_slice(teacher_logits, k, temperature=temperature,
                                   generator=generator)
        ids.append(slice_[0].cpu())
        probs.append(slice_[1].cpu())
    return torch.cat(ids), torch.cat(probs)


def run_teacher_logits(ctx: NodeContext) -> None:
    config, node = ctx.node.config, ctx.node.id
    mode, k = config["cache"]["mode"], config["cache"]["k"]
    if mode not in ("topk", "sampled"):
        raise ValueError(f"teacher_logits node `{node}` has cache mode {mode!r}")
    make_deterministic()
    dev = device()
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=ctx.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    records = read_records(config["data"], seed=config["seed"], spec_dir=ctx.spec_dir)
    data = build_token_data("packed", records, tokenizer, config["seq_len"])
    teacher = load_model(config["teacher"], ctx=ctx, role="teacher", tokenizer=tokenizer,
                         dev=dev, trainable=False)
    teacher_print = weights_fingerprint(teacher)
    writer = CacheWriter(ctx.node_dir / "cache", cached_rows(data, config).numpy(),
                         seq_len=config["seq_len"], k=k, teacher_fingerprint=teacher_print)
    amp = autocast_dtype("auto", dev)
    ctx.emit(Event("start", node, step=writer.n_shards - len(writer.pending()),
                   total=writer.n_shards, unit="shard"))
    for shard in writer.pending():
        # One generator per shard: a resumed node draws exactly what an uninterrupted one did.
        generator = torch.Generator(device=dev).manual_seed(
            derive_seed(config["seed"], "cache", shard))
        ids, probs = teacher_slices(teacher, data, torch.from_numpy(writer.shard_rows(shard)),
                                    mode=mode, k=k, temperature=config["temperature"],
                                    generator=generator, amp=amp, dev=dev)
        writer.write_shard(shard, ids, probs)
        ctx.emit(Event("progress", node, step=shard + 1, total=writer.n_shards, unit="shard"))
    writer.finish(mode=mode, temperature=config["temperature"],
                  vocab_size=teacher.get_output_embeddings().weight.shape[0],
                  node_fingerprint=ctx.node.fingerprint,
                  teacher_fingerprint=teacher_print)
