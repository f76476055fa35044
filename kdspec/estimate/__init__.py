"""Analytic cost models: parameters, FLOPs, memory, storage, time and cost (no torch, no jax).

Formulas, sources and how exact each estimate is: docs/estimates.md.
"""

from .arch import FAMILIES, ArchDims, Family
from .flops import (
    ATTENTION_MODES,
    AttentionCount,
    decode_token_flops,
    forward_flops,
    forward_flops_breakdown,
    forward_flops_per_token,
    prefill_flops,
    six_n_d,
    train_flops,
)
from .generation import GenerationEstimate, estimate_generation
from .hardware import ACCELERATORS, Accelerator, Hardware, get_accelerator
from .hf_config import arch_from_hf_config
from .memory import (
    BF16_MIXED_ADAMW,
    FP32_ADAMW,
    MemoryEstimate,
    TrainingPrecision,
    activation_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    logit_buffer_bytes,
    model_state_bytes,
    training_memory,
    training_precision,
)
from .node import NodeEstimate
from .params import ParamCounts, param_counts
from .presets import PRESETS, get_preset
from .storage import checkpoint_bytes, generated_text_bytes, teacher_cache_bytes
from .workloads import (
    estimate_eval,
    estimate_generation_node,
    estimate_gkd,
    estimate_minillm,
    estimate_teacher_logits,
    estimate_train,
)

__all__ = [
    "ACCELERATORS", "ATTENTION_MODES", "Accelerator", "ArchDims", "AttentionCount",
    "BF16_MIXED_ADAMW", "FAMILIES", "FP32_ADAMW", "Family", "GenerationEstimate", "Hardware",
    "MemoryEstimate", "NodeEstimate", "PRESETS", "ParamCounts", "TrainingPrecision",
    "activation_bytes", "arch_from_hf_config", "checkpoint_bytes", "decode_token_flops",
    "estimate_eval", "estimate_generation", "estimate_generation_node", "estimate_gkd",
    "estimate_minillm", "estimate_teacher_logits", "estimate_train", "forward_flops",
    "forward_flops_breakdown", "forward_flops_per_token", "generated_text_bytes",
    "get_accelerator", "get_preset", "kv_cache_bytes", "layer_activation_bytes",
    "logit_buffer_bytes", "model_state_bytes", "param_counts", "prefill_flops", "six_n_d",
    "teacher_cache_bytes", "train_flops", "training_memory", "training_precision",
]
