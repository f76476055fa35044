"""Which estimator prices which node, with the spec's numbers mapped onto its arguments.

Each function takes (node, spec, hardware, dims, dtype_bytes) and returns a NodeEstimate, or
None when a model's shape is unknown before its weights are loaded (a hub id without a local
config.json).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..estimate import workloads as wl
from ..estimate.arch import ArchDims
from ..estimate.hardware import Hardware
from ..estimate.memory import chunked_by_default
from ..estimate.storage import CACHE_PROB_BYTES
from .archinfo import origin_dims
from .checks import _origin

CHARS_PER_TOKEN = 4  # rough, for prompt text whose tokenizer the planner does not load


def _stage(node: Any) -> dict[str, Any]:
    return node.config["stage"]


def _micro_batch(stage: dict[str, Any], hardware: Hardware) -> int:
    return max(1, stage["batch_size"] // stage["grad_accum"] // hardware.dp)


def _train_tokens(stage: dict[str, Any]) -> int:
    steps = stage["steps"] or -(-stage["tokens"] // (stage["batch_size"] * stage["seq_len"]))
    return steps * stage["batch_size"] * stage["seq_len"]


def _chunked(stage: dict[str, Any], student: ArchDims, micro_batch: int,
             teacher: ArchDims | None = None) -> bool:
    """Whether the backend runs the chunked KD loss (`loss.chunked`): `on`, or `auto` with the
    backend's own rule (`chunked_by_default` on one micro-batch's tokens), never for a model
    whose LM head the chunked loss cannot apply (gemma2 soft-caps its final logits)."""
    setting = stage.get("loss", {}).get("chunked", "off")
    if setting != "auto":
        return setting == "on"
    capable = all(m.family != "gemma2" for m in (student, teacher) if m is not None)
    return capable and chunked_by_default(micro_batch * stage["seq_len"], student.vocab_size)


def _target_len(stage: dict[str, Any], student: ArchDims) -> int | None:
    return stage["seq_len"] if student.is_encoder_decoder else None


def _train(node, spec, hardware, dims, dtype_bytes, *, passes: int = 1):
    stage, student, teacher = _stage(node), dims["student"], dims.get("teacher")
    if student is None or (node.config.get("teacher") and teacher is None):
        return None
    micro = _micro_batch(stage, hardware)
    cache = stage.get("teacher_cache", {"mode": "online", "k": 0})
    uses_teacher_logits = stage["kind"] in ("pretrain_kd", "kd")
    return wl.estimate_train(
        student, tokens=_train_tokens(stage), seq_len=stage["seq_len"], micro_batch=micro,
        hardware=hardware, dtype_bytes=dtype_bytes,
        teacher=teacher if uses_teacher_logits else None,
        teacher_online=cache["mode"] == "online", passes_per_example=passes,
        recompute=stage["recompute"],
        chunked_loss=_chunked(stage, student, micro, teacher if uses_teacher_logits else None),
        teacher_cache_k=0 if cache["mode"] == "online" else cache["k"],
        target_len=_target_len(stage, student),
    )


def _step_by_step(node, spec, hardware, dims, dtype_bytes):
    # multitask: two passes per example, `predict:` -> label and `explain:` -> rationale;
    # single_task: one pass on rationale + label.
    passes = 1 if _stage(node).get("variant") == "single_task" else 2
    return _train(node, spec, hardware, dims, dtype_bytes, passes=passes)


def _n_examples(node: Any) -> int:
    data = node.config["data"] or {}
    stage = node.config.get("stage")
    if data.get("n"):
        return data["n"]
    if stage and stage.get("steps"):
        return stage["steps"] * stage["batch_size"]
    return 1000


def _prompt_tokens(rationales: dict[str, Any]) -> int:
    demos = rationales["demonstrations"]
    text = rationales["template"] * (1 + (len(demos) if isinstance(demos, list) else 4))
    if isinstance(demos, list):
        text += " ".join(d["input"] + d["rationale"] + d["label"] for d in demos)
    return max(1, len(text) // CHARS_PER_TOKEN) + 64  # + the question itself


def _rationales(node, spec, hardware, dims, dtype_bytes):
    config = node.config["rationales"]
    if config.get("source") == "data":  # the data's own rationales: nothing is generated
        return wl.estimate_generation_node(None, n_examples=0, prompt_tokens=0, new_tokens=0,
                                           batch=1, hardware=hardware, dtype_bytes=dtype_bytes)
    return wl.estimate_generation_node(
        dims.get("teacher") if config["http"] is None else None,
        n_examples=_n_examples(node), prompt_tokens=_prompt_tokens(config),
        new_tokens=config["generation"]["max_new_tokens"], batch=16, hardware=hardware,
        dtype_bytes=dtype_bytes)


def _seqkd(node, spec, hardware, dims, dtype_bytes):
    train = _train(node, spec, hardware, dims, dtype_bytes)
    if train is None or dims.get("teacher") is None:
        return None
    stage = _stage(node)
    new = stage["generation"]["max_new_tokens"]
    generation = wl.estimate_generation_node(
        dims["teacher"], n_examples=_n_examples(node), prompt_tokens=max(1, stage["seq_len"] - new),
        new_tokens=new, batch=_micro_batch(stage, hardware), hardware=hardware,
        dtype_bytes=dtype_bytes)
    return combine(train, generation)


# Packed rows per teacher forward in the backends' teacher_logits nodes (ROWS_PER_FORWARD).
TEACHER_LOGITS_ROWS_PER_FORWARD = 8


def _teacher_logits(node, spec, hardware, dims, dtype_bytes):
    """The teacher forward over the cached tokens, `TEACHER_LOGITS_ROWS_PER_FORWARD` rows at
    a time, and the cache on disk at the backends' float16 probabilities."""
    teacher = dims.get("teacher")
    if teacher is None:
        return None
    config = node.config
    return wl.estimate_teacher_logits(
        teacher, tokens=config["tokens"], seq_len=config["seq_len"], k=config["cache"]["k"],
        hardware=hardware, dtype_bytes=dtype_bytes, prob_bytes=CACHE_PROB_BYTES,
        micro_batch=TEACHER_LOGITS_ROWS_PER_FORWARD,
        target_len=config["seq_len"] if teacher.is_encoder_decoder else None)


def _minillm(node, spec, hardware, dims, dtype_bytes):
    stage, student, teacher = _stage(node), dims["student"], dims.get("teacher")
    if student is None or teacher is None:
        return None
    prompt_len = stage["max_prompt_length"]
    return wl.estimate_minillm(
        student, teacher, iterations=stage["steps"] or 1,
        rollouts_per_iteration=stage["num_rollouts"], batch_size=stage["batch_size"],
        prompt_len=prompt_len, gen_len=max(1, stage["max_length"] - prompt_len),
        ppo_epochs=stage["ppo_epochs"], micro_batch=_micro_batch(stage, hardware),
        pretrain_tokens_per_step=(stage["batch_size"] * stage["seq_len"]
                                  if stage["pretrain_data"] else 0),
        kd_ratio=stage["kd_ratio"], teacher_mix_alpha=stage["teacher_mix_alpha"],
        pretrain_seq_len=stage["seq_len"], hardware=hardware, dtype_bytes=dtype_bytes,
        recompute=stage["recompute"])


def _gkd(node, spec, hardware, dims, dtype_bytes):
    stage, student, teacher = _stage(node), dims["student"], dims.get("teacher")
    if student is None or teacher is None:
        return None
    new = stage["max_new_tokens"]
    return wl.estimate_gkd(
        student, teacher, steps=stage["steps"] or -(-_train_tokens(stage) // (
            stage["batch_size"] * stage["seq_len"])), batch_size=stage["batch_size"],
        prompt_len=max(1, stage["seq_len"] - new), completion_len=new, lmbda=stage["lmbda"],
        micro_batch=_micro_batch(stage, hardware), hardware=hardware, dtype_bytes=dtype_bytes,
        seq_kd=stage["seq_kd"], recompute=stage["recompute"])


def _eval(node, spec, hardware, dims, dtype_bytes):
    base_dir = dims["base_dir"]
    models = [origin_dims(spec, _origin(entry), base_dir) for entry in
              node.config["models"].values() if entry]
    if not models or any(m is None for m in models):
        return None
    stage = _stage(node)
    examples = stage["max_examples"] or 200
    generates = any(m in ("rouge_l", "accuracy") for m in stage["metrics"])
    per_dataset = len(node.config["data"])
    return wl.estimate_eval(
        models, hardware=hardware, dtype_bytes=dtype_bytes,
        tokens=examples * stage["seq_len"] * per_dataset, seq_len=stage["seq_len"],
        n_examples=examples * per_dataset if generates else 0, prompt_tokens=64,
        gen_tokens=stage["max_new_tokens"] if generates else 0, batch=stage["batch_size"])


def combine(a: wl.NodeEstimate, b: wl.NodeEstimate) -> wl.NodeEstimate:
    """Two phases of one node run one after the other: costs add, memory is the larger."""
    bigger = a if a.memory_per_device_bytes >= b.memory_per_device_bytes else b
    return replace(
        a, flops=a.flops + b.flops, teacher_flops=a.teacher_flops + b.teacher_flops,
        memory_per_device_bytes=bigger.memory_per_device_bytes,
        memory_breakdown=bigger.memory_breakdown, storage_bytes=a.storage_bytes + b.storage_bytes,
        wall_seconds=a.wall_seconds + b.wall_seconds, device_hours=a.device_hours + b.device_hours,
        cost_usd=None if a.cost_usd is None else a.cost_usd + (b.cost_usd or 0),
        details={"train": a.details, "generation": b.details},
    )


ESTIMATORS = {
    "pretrain": _train, "pretrain_kd": _train, "sft": _train, "kd": _train,
    "step_by_step": _step_by_step, "seqkd": _seqkd, "minillm": _minillm, "gkd": _gkd,
    "teacher_logits": _teacher_logits, "rationales": _rationales, "eval": _eval,
}
