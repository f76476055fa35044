"""Run a `teacher_logits` node: the teacher's top-K or sampled-K slices for every packed row the
matching `pretrain_kd` node will train on, written to the cache (``kdspec_jax.teacher_cache``,
the torch backend's format).

The rows are exactly those of the JAX train node's stream: the same records, tokenizer,
packing and seeded epoch sampler, whose first ``ceil(tokens / seq_len)`` samples are the train
node's ``total_steps · batch_size`` samples. The cache is keyed by dataset row, so it does not
depend on the batch size or micro-batching, and a row seen in several epochs is cached once.

Sampled slices draw from ``jax.random`` with one key per shard (``derive_seed(seed, "cache",
shard)``) folded with the chunk index, so a resumed node draws exactly what an uninterrupted
one did; the draws differ from the torch backend's, which uses torch's generator.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from kdspec.run.backend import NodeContext
from kdspec.run.events import Event

from .data import (
    EpochSampler,
    TokenRows,
    build_token_rows,
    derive_seed,
    load_tokenizer,
    order_seed,
    read_records,
)
from .model import JaxModelConfig, Params, forward
from .models import load_model
from .teacher_cache import CacheWriter, weights_fingerprint
from .teacher_slice import sampled_slice, topk_slice

__all__ = ["ROWS_PER_FORWARD", "cached_rows", "run_teacher_logits", "teacher_slices"]

ROWS_PER_FORWARD = 8
MODES = ("topk", "sampled")


def cached_rows(rows: TokenRows, config: dict) -> np.ndarray:
    """Ascending dataset rows among the first ``ceil(tokens / seq_len)`` samples of the
    stream."""
    sampler = EpochSampler(len(rows), order_seed(config["seed"], config["data"]))
    n_samples = -(-config["tokens"] // config["seq_len"])
    return np.unique(sampler.indices(0, n_samples))


@functools.partial(jax.jit, static_argnums=(1, 3, 4, 5))
def _slice(params: Params, config: JaxModelConfig, input_ids: jax.Array, mode: str, k: int,
           temperature: float, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = forward(params, config, input_ids)
    if mode == "topk":
        return topk_slice(logits, k, temperature=temperature)
    return sampled_slice(logits, k, key, temperature=temperature)


def teacher_slices(params: Params, config: JaxModelConfig, rows: TokenRows, index: np.ndarray,
                   *, mode: str, k: int, temperature: float, key: jax.Array
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, probs)`` ``[len(index), seq_len, K]`` for dataset rows ``index``,
    ROWS_PER_FORWARD rows a pass (a short last pass is filled with repeats of its first row,
    whose slices are dropped: one compilation)."""
    if mode not in MODES:
        raise ValueError(f"cache mode {mode!r}; expected one of {', '.join(MODES)}")
    ids, probs = [], []
    for chunk, start in enumerate(range(0, len(index), ROWS_PER_FORWARD)):
        part = index[start:start + ROWS_PER_FORWARD]
        filled = np.concatenate([part, np.full(ROWS_PER_FORWARD - len(part), part[0])])
        got = _slice(params, config, rows.batch(filled)["input_ids"], mode, k, temperature,
                     jax.random.fold_in(key, chunk))
        ids.append(np.asarray(got[0])[: len(part)])
        probs.append(np.asarray(got[1])[: len(part)])
    return np.concatenate(ids), np.concatenate(probs)


def run_teacher_logits(ctx: NodeContext) -> None:
    config, node = ctx.node.config, ctx.node.id
    mode, k = config["cache"]["mode"], config["cache"]["k"]
    if mode not in MODES:
        raise ValueError(f"teacher_logits node `{node}` has cache mode {mode!r}")
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=ctx.spec_dir,
                               work_dir=ctx.node_dir / "tokenizer")
    records = read_records(config["data"], seed=config["seed"], spec_dir=ctx.spec_dir)
    rows = build_token_rows("packed", records, tokenizer, config["seq_len"])
    teacher = load_model(config["teacher"], ctx=ctx, role="teacher", tokenizer=tokenizer,
                         trainable=False)
    fingerprint = weights_fingerprint(teacher.params, teacher.config)
    # A partial cache of another teacher (or other rows) is wiped rather than resumed.
    writer = CacheWriter(ctx.node_dir / "cache", cached_rows(rows, config),
                         seq_len=config["seq_len"], k=k, teacher_fingerprint=fingerprint)
    ctx.emit(Event("start", node, step=writer.n_shards - len(writer.pending()),
                   total=writer.n_shards, unit="shard"))
    for shard in writer.pending():
        key = jax.random.key(derive_seed(config["seed"], "cache", shard) % 2**32)
        ids, probs = teacher_slices(teacher.params, teacher.config, rows,
                                    writer.shard_rows(shard), mode=mode, k=k,
                                    temperature=config["temperature"], key=key)
        writer.write_shard(shard, ids, probs)
        ctx.emit(Event("progress", node, step=shard + 1, total=writer.n_shards, unit="shard"))
    writer.finish(mode=mode, temperature=config["temperature"],
                  vocab_size=teacher.config.vocab_size, node_fingerprint=ctx.node.fingerprint)
