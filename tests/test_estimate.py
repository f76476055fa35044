"""Unit tests of kdspec.estimate against hand-computed values and published figures (no torch).

The counts against real models (torch FlopCounterMode, transformers parameter counts) are in
tests/torch/test_flops_vs_counter.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from kdspec.estimate import (
    ACCELERATORS,
    BF16_MIXED_ADAMW,
    FP32_ADAMW,
    PRESETS,
    ArchDims,
    Hardware,
    activation_bytes,
    arch_from_hf_config,
    checkpoint_bytes,
    decode_token_flops,
    estimate_eval,
    estimate_generation,
    estimate_generation_node,
    estimate_gkd,
    estimate_minillm,
    estimate_teacher_logits,
    estimate_train,
    forward_flops,
    forward_flops_breakdown,
    kv_cache_bytes,
    layer_activation_bytes,
    logit_buffer_bytes,
    model_state_bytes,
    param_counts,
    prefill_flops,
    six_n_d,
    teacher_cache_bytes,
    train_flops,
    training_precision,
)
from kdspec.estimate.flops import keys_per_query
from kdspec.estimate.memory import weight_read_bytes

# A model small enough to count by hand: V=10, d=4, 1 layer, 2 query heads, 1 KV head of size 2,
# gated MLP of 6, untied head.
TINY = ArchDims("llama", vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1,
                head_dim=2, d_ff=6, tie_embeddings=False)
TINY_T5 = ArchDims("t5", vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=2,
                   head_dim=2, d_ff=6, tie_embeddings=False, n_decoder_layers=1)
H100 = Hardware.from_name("h100")


# ---- architecture and parameters -------------------------------------------------------------


def test_the_estimator_imports_neither_torch_nor_jax() -> None:
    code = ("import sys, kdspec.estimate; "
            "assert not {'torch', 'jax', 'transformers'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_param_count_by_hand() -> None:
    # embedding 10·4 = 40; layer: q 4·4 + k 4·2 + v 4·2 + o 4·4 = 48, MLP 3·4·6 = 72,
    # 2 norms 8 → 128; final norm 4; untied head 40.
    counts = param_counts(TINY)
    assert (counts.embedding, counts.non_embedding, counts.total) == (40, 172, 212)
    assert counts.output_head == 40
    assert param_counts(replace(TINY, tie_embeddings=True)).total == 172


def test_tiny_t5_param_count_by_hand() -> None:
    # shared 40; attention block 4·(4+8) + 4·4 = 64; MLP 72; encoder block 64 + 72 + 2·4 = 144;
    # decoder block 2·64 + 72 + 3·4 = 212; per stack: 32 buckets · 2 heads + final norm 4 = 68;
    # head 40. Total 40 + 144 + 212 + 2·68 + 40 = 572.
    assert param_counts(TINY_T5).total == 572


@pytest.mark.parametrize(("name", "embedding", "non_embedding"), [
    ("gemma2-2b", 590_118_912, 2_024_517_888),
    ("gemma2-9b", 917_962_752, 8_324_201_984),
    ("gemma2-27b", 1_180_237_824, 26_047_480_320),
])
def test_gemma2_presets_match_the_report_exactly(name: str, embedding: int, non_embedding: int
                                                 ) -> None:
    counts = param_counts(PRESETS[name])
    assert (counts.embedding, counts.non_embedding) == (embedding, non_embedding)


@pytest.mark.parametrize(("name", "total"), [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200), ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320),
    # Hugging Face model cards / checkpoint sizes (not in compute.md; cross-checked against
    # transformers on the meta device in tests/torch):
    ("qwen2-0.5b", 494_032_768), ("qwen2-7b", 7_615_616_512), ("t5-v1_1-base", 247_577_856),
])
def test_presets_match_published_totals_exactly(name: str, total: int) -> None:
    assert param_counts(PRESETS[name]).total == total


def test_arch_rejects_inconsistent_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        replace(TINY, n_kv_heads=3)
    with pytest.raises(ValueError, match="gemma2 only"):
        replace(TINY, sliding_window=8)
    with pytest.raises(ValueError, match="unknown family"):
        replace(TINY, family="mamba")  # type: ignore[arg-type]


# ---- reading config.json ---------------------------------------------------------------------

GEMMA2_2B_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "vocab_size": 256000,
}
LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rope_scaling": None,
    "tie_word_embeddings": False, "vocab_size": 32000,
}
GPT2_CONFIG = {
    "activation_function": "gelu_new", "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
    "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257,
}
T5_V1_1_BASE_CONFIG = {
    "d_ff": 2048, "d_kv": 64, "d_model": 768, "decoder_start_token_id": 0,
    "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "model_type": "t5",
    "num_decoder_layers": 12, "num_heads": 12, "num_layers": 12,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128,
}
QWEN2_0_5B_CONFIG = {
    "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 131072,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "sliding_window": 131072, "tie_word_embeddings": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


@pytest.mark.parametrize(("config", "preset", "changes"), [
    # The released Gemma 2 checkpoints have 256,000 embedding rows; the report counts 256,128.
    (GEMMA2_2B_CONFIG, "gemma2-2b", {"vocab_size": 256000}),
    (LLAMA2_7B_CONFIG, "llama-2-7b", {}),
    (GPT2_CONFIG, "gpt2", {}),
    (T5_V1_1_BASE_CONFIG, "t5-v1_1-base", {}),
    (QWEN2_0_5B_CONFIG, "qwen2-0.5b", {"max_seq_len": 131072}),
])
def test_config_json_reads_into_the_preset(config: dict, preset: str, changes: dict) -> None:
    assert arch_from_hf_config(config) == replace(PRESETS[preset], **changes)


def test_config_json_defaults_and_rejections() -> None:
    original_t5 = {**T5_V1_1_BASE_CONFIG, "feed_forward_proj": "relu"}
    del original_t5["tie_word_embeddings"]
    t5 = arch_from_hf_config(original_t5)
    assert not t5.mlp_is_gated and t5.tie_embeddings  # original T5: ReLU MLP, tied head
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
        arch_from_hf_config({"model_type": "mistral"})
    with pytest.raises(ValueError, match="attention_bias"):
        arch_from_hf_config({**LLAMA2_7B_CONFIG, "attention_bias": True})
    with pytest.raises(ValueError, match="lacks hidden_size"):
        arch_from_hf_config({k: v for k, v in LLAMA2_7B_CONFIG.items() if k != "hidden_size"})
    layer_types = ["full_attention"] * 26
    with pytest.raises(ValueError, match="layer_types"):
        arch_from_hf_config({**GEMMA2_2B_CONFIG, "layer_types": layer_types})


# ---- FLOPs -----------------------------------------------------------------------------------


def test_tiny_forward_flops_by_hand() -> None:
    # Per token at S = 3, dense (K = 3): qkv 2·4·(2+2·1)·2 = 64, scores 2·3·(2·2) = 24,
    # softmax 3·3·2 = 18, values 24, out 2·4·4 = 32, MLP 2·3·4·6 = 144, logits 2·4·10 = 80.
    per_token = {"embedding": 0, "qkv": 64, "attn_scores": 24, "attn_softmax": 18,
                 "attn_values": 24, "attn_out": 32, "mlp": 144, "logits": 80}
    assert forward_flops_breakdown(TINY, 3) == {k: 3 * v for k, v in per_token.items()}
    assert forward_flops(TINY, 6, 3) == 2 * 3 * 386  # two sequences of 3 tokens
    assert train_flops(TINY, 6, 3) == 3 * 2 * 3 * 386
    assert train_flops(TINY, 6, 3, recompute=True) == 4 * 2 * 3 * 386


def test_causal_attention_counts_the_visible_keys_only() -> None:
    # Queries at positions 1, 2, 3 see 1, 2, 3 keys: 2 on average instead of 3.
    causal = forward_flops_breakdown(TINY, 3, attention="causal")
    assert causal["attn_scores"] == 3 * 2 * 2 * (2 * 2)
    assert causal["attn_softmax"] == 3 * 3 * 2 * 2


@pytest.mark.parametrize(("seq_len", "window"), [(1, None), (7, None), (7, 3), (8, 8), (5, 9)])
def test_keys_per_query_against_brute_force(seq_len: int, window: int | None) -> None:
    reach = seq_len if window is None else window
    visible = [min(i, reach) for i in range(1, seq_len + 1)]
    assert keys_per_query(seq_len, window, "causal") == pytest.approx(sum(visible) / seq_len)
    assert keys_per_query(seq_len, window, "dense") == min(seq_len, reach)
    assert keys_per_query(seq_len, window, "eager") == seq_len


def test_tiny_t5_forward_flops_by_hand() -> None:
    # Encoder over S_in = 3 tokens (q_dim = kv_dim = 4): qkv 2·4·12 = 96/token, scores and
    # values 2·3·4 = 24, softmax 3·3·2 = 18, out 2·4·4 = 32, MLP 144. Decoder over S_tgt = 2:
    # self-attention with K = 2 (scores 16, softmax 12); cross-attention q 2·4·4 = 32/token,
    # K/V 2·4·8 = 64 per encoder token, scores 24, softmax 18, out 32; MLP 144; logits 80.
    expected = {
        "embedding": 0,
        "qkv": 3 * 96 + 2 * 96 + 2 * 32 + 3 * 64,
        "attn_scores": 3 * 24 + 2 * 16 + 2 * 24,
        "attn_softmax": 3 * 18 + 2 * 12 + 2 * 18,
        "attn_values": 3 * 24 + 2 * 16 + 2 * 24,
        "attn_out": 3 * 32 + 2 * 32 + 2 * 32,
        "mlp": 3 * 144 + 2 * 144,
        "logits": 2 * 80,
    }
    assert forward_flops_breakdown(TINY_T5, 3, target_len=2) == expected
    with pytest.raises(ValueError, match="target_len"):
        forward_flops_breakdown(TINY_T5, 3)


def test_gemma2_2b_training_flops_agree_with_6nd_plus_attention() -> None:
    """2T tokens at 8192 context vs PaLM's 6·N·D + 12·L·H·Q·T·D, with N all parameters and
    T the keys per layer (8192 on the 13 global layers, the 4096 window on the 13 local).

    Gemma 2 ties its embedding, so 6·N counts the 256k × 2304 matrix once: as the logits
    matmul, which is what the estimate counts (the lookup itself is 0). What remains: the
    estimate adds the softmax (9·H·T per token and layer, +0.05%) and leaves out the norm
    weights, which are in N but do no matmul (−0.01%)."""
    gemma, tokens = PRESETS["gemma2-2b"], 2e12
    keys = 13 * 8192 + 13 * 4096
    palm = six_n_d(gemma, tokens) + 12 * gemma.n_heads * gemma.head_dim * keys * tokens
    ours = train_flops(gemma, tokens, 8192)
    assert ours / palm == pytest.approx(1, abs=1e-3)
    softmax = 3 * 3 * gemma.n_heads * keys * tokens
    norms = 6 * (26 * 4 + 1) * gemma.d_model * tokens
    assert ours == pytest.approx(palm + softmax - norms, rel=1e-12)
    # Kaplan's non-embedding N would miss the logits matmul, 6·V·d·D: 18% of the total.
    kaplan = 6 * param_counts(gemma).non_embedding * tokens
    assert six_n_d(gemma, tokens) - kaplan == pytest.approx(6 * 256_128 * 2304 * tokens)
    assert 0.15 < (six_n_d(gemma, tokens) - kaplan) / ours < 0.20


def test_untied_llama_6nd_overcounts_the_input_embedding() -> None:
    """LLaMA-2 7B has an untied input embedding: 6·N·D charges its lookup 6·V·d FLOPs a
    token, about 2% too much; subtracting it gives the estimate to within the softmax."""
    llama, tokens, seq = PRESETS["llama-2-7b"], 1e12, 4096
    attention = 12 * llama.n_layers * llama.n_heads * llama.head_dim * seq * tokens
    ours = train_flops(llama, tokens, seq)
    overcount = (six_n_d(llama, tokens) + attention) / ours - 1
    assert 0.01 < overcount < 0.03
    lookup = 6 * llama.vocab_size * llama.d_model * tokens
    assert ours / (six_n_d(llama, tokens) - lookup + attention) == pytest.approx(1, abs=1e-3)


def test_decode_and_prefill_flops_by_hand() -> None:
    # One new token at context 5: everything per token of the dense count with K = 5:
    # 64 + 2·(2·5·4) + 3·5·2 + 32 + 144 + 80 = 430.
    assert decode_token_flops(TINY, 5) == 430
    # Prefill of 3 tokens: the 3-token forward with logits for the last position only.
    assert prefill_flops(TINY, 3) == 3 * 386 - 2 * 80


# ---- memory ----------------------------------------------------------------------------------


def test_bytes_per_param_conventions() -> None:
    assert training_precision(4) is FP32_ADAMW and FP32_ADAMW.bytes_per_param == 16
    assert training_precision(2) is BF16_MIXED_ADAMW and BF16_MIXED_ADAMW.bytes_per_param == 16
    assert (BF16_MIXED_ADAMW.master_bytes, BF16_MIXED_ADAMW.optimizer_bytes) == (4, 8)
    with pytest.raises(ValueError):
        training_precision(1)


@pytest.mark.parametrize(("stage", "divided"), [
    (0, set()), (1, {"optimizer_states"}), (2, {"optimizer_states", "gradients"}),
    (3, {"optimizer_states", "gradients", "weights"}),
])
def test_zero_stages_shard_what_they_should(stage: int, divided: set[str]) -> None:
    n = 1_000_000
    full = {"weights": 2 * n, "gradients": 2 * n, "optimizer_states": 12 * n}
    sharded = model_state_bytes(n, BF16_MIXED_ADAMW, data_parallel=8, zero_stage=stage)
    assert sharded == {k: v // 8 if k in divided else v for k, v in full.items()}
    with_tp = model_state_bytes(n, BF16_MIXED_ADAMW, data_parallel=8, zero_stage=stage,
                                tensor_parallel=2)
    assert with_tp == {k: v // 2 for k, v in sharded.items()}


def test_activations_reproduce_korthikanti_for_a_gpt_layer() -> None:
    """s·b·h·(34 + 5·a·s/h) at 16 bits for a GPT layer (4h MLP, multi-head, dropout);
    34·s·b·h without the s² terms (flash or selective recomputation); 2·s·b·h per layer with
    full recomputation, plus one layer's activations while it is recomputed."""
    gpt = PRESETS["gpt2-medium"]
    s, b, h, a = 1024, 4, gpt.d_model, gpt.n_heads
    korthikanti = s * b * h * (34 + 5 * a * s / h)
    assert layer_activation_bytes(gpt, s, b, dropout=True) == korthikanti
    assert layer_activation_bytes(gpt, s, b, dropout=True, flash=True) == 34 * s * b * h
    selective = activation_bytes(gpt, s, b, recompute="selective", dropout=True)
    assert selective == gpt.n_layers * 34 * s * b * h
    full = activation_bytes(gpt, s, b, recompute="full", dropout=True)
    assert full == gpt.n_layers * 2 * s * b * h + korthikanti
    assert activation_bytes(gpt, s, b, dropout=True, tensor_parallel=4) == pytest.approx(
        gpt.n_layers * korthikanti / 4, abs=1)


def test_activations_of_a_gated_gqa_layer_by_hand() -> None:
    # TINY at s = 3, b = 1, fp32, no dropout, no flash: norm + qkv inputs 2·3·4, Q 3·4,
    # K and V 2·3·2, out input 3·4, softmax output 2·3·3; MLP: norm + input 2·3·4 and four
    # 3·6 hidden tensors. (24 + 12 + 12 + 12 + 18) + (24 + 72) = 174 elements · 4 bytes.
    assert layer_activation_bytes(TINY, 3, 1, act_bytes=4) == 174 * 4


def test_logit_buffers_naive_and_chunked() -> None:
    tokens, vocab = 8192, 256_128
    naive = logit_buffer_bytes(tokens, vocab, teacher="online")
    assert naive == {"student_logits": 3 * tokens * vocab * 4,
                     "teacher_logits": 2 * tokens * vocab * 4}
    chunked = logit_buffer_bytes(tokens, vocab, teacher="online", chunk_tokens=1024)
    assert sum(chunked.values()) * 8 == sum(naive.values())
    cached = logit_buffer_bytes(tokens, vocab, teacher="cached", cache_k=128)
    assert cached["teacher_cache_slice"] == tokens * 128 * 12  # int64 id + fp32 prob in memory


def test_kv_cache_formula() -> None:
    # LLaMA-2 7B, bf16: 2 · 2 · 128 · 32 · 32 = 512 KiB per token; 4096 tokens → 2 GiB.
    assert kv_cache_bytes(PRESETS["llama-2-7b"], 1, 4096, 2) == 2 * 2 * 128 * 32 * 32 * 4096
    assert kv_cache_bytes(PRESETS["llama-2-7b"], 1, 4096, 2) == 2 * 2**30
    # Gemma 2 2B at 8192: the 13 global layers hold 8192 tokens, the 13 local ones 4096.
    gemma = PRESETS["gemma2-2b"]
    assert kv_cache_bytes(gemma, 2, 8192, 2) == 2 * 2 * 256 * 4 * 2 * (13 * 8192 + 13 * 4096)
    # T5: self-attention over the target plus cross-attention over the source, per layer.
    t5 = PRESETS["t5-v1_1-small"]
    assert kv_cache_bytes(t5, 1, 64, 4, source_len=512) == 2 * 4 * 64 * 6 * 8 * (64 + 512)


# ---- generation ------------------------------------------------------------------------------


def test_single_sequence_decode_is_bandwidth_bound() -> None:
    """LLaMA-2 7B on one H100, batch 1: each step reads the weights (less the untied input
    embedding) and the KV cache; the 2·N FLOPs take ~30 µs at 40% MFU, the bytes ~4 ms."""
    llama, h100 = PRESETS["llama-2-7b"], ACCELERATORS["h100"]
    g = estimate_generation(llama, batch=1, prompt_tokens=128, new_tokens=129,
                            accelerator=h100, mfu=0.4, dtype_bytes=2)
    weights = (6_738_415_616 - 32_000 * 4096) * 2
    kv_per_token = 2 * 2 * 128 * 32 * 32
    expected = sum((weights + kv_per_token * length) / 3.35e12 for length in range(129, 257))
    assert g.decode_steps == 128 and g.decode_bound == "bandwidth"
    assert g.decode_seconds == pytest.approx(expected, rel=1e-12)
    assert weight_read_bytes(llama, 2) == weights


def test_large_batch_decode_becomes_compute_bound() -> None:
    gpt2, h100 = PRESETS["gpt2"], ACCELERATORS["h100"]
    g = estimate_generation(gpt2, batch=4096, prompt_tokens=16, new_tokens=17,
                            accelerator=h100, mfu=0.4, dtype_bytes=2)
    assert g.decode_bound == "compute"
    assert g.decode_seconds == pytest.approx(g.decode_flops / (989e12 * 0.4), rel=0.05)


def test_t5_generation_decodes_every_new_token_against_the_source() -> None:
    t5, h100 = PRESETS["t5-v1_1-small"], ACCELERATORS["h100"]
    g = estimate_generation(t5, batch=2, prompt_tokens=16, new_tokens=4, accelerator=h100,
                            mfu=0.5, dtype_bytes=2)
    decode = sum(decode_token_flops(t5, length, source_len=16) for length in range(1, 5))
    assert g.decode_steps == 4
    assert g.flops == pytest.approx(2 * (prefill_flops(t5, 16) + decode))
    assert g.peak_kv_cache_bytes == kv_cache_bytes(t5, 2, 4, 2, source_len=16)


def test_lockstep_models_add_their_costs() -> None:
    student, teacher = PRESETS["gpt2"], PRESETS["gpt2-xl"]
    h100 = ACCELERATORS["h100"]
    kwargs = {"batch": 8, "prompt_tokens": 32, "new_tokens": 16, "accelerator": h100,
              "mfu": 0.5, "dtype_bytes": 2}
    both = estimate_generation([student, teacher], **kwargs)
    alone = [estimate_generation(m, **kwargs) for m in (student, teacher)]
    assert both.flops == pytest.approx(sum(g.flops for g in alone))
    assert both.seconds == pytest.approx(sum(g.seconds for g in alone))


# ---- hardware --------------------------------------------------------------------------------


def test_hardware_layout_is_validated() -> None:
    hw = Hardware.from_name("h100", count=8, tensor_parallel=2)
    assert hw.data_parallel == 4
    with pytest.raises(ValueError, match="must equal count"):
        Hardware.from_name("h100", count=8, data_parallel=3)
    with pytest.raises(KeyError, match="did you mean 'h100'"):
        Hardware.from_name("h10")
    with pytest.raises(ValueError, match="mfu"):
        Hardware.from_name("h100", mfu=1.5)


def test_catalog_has_dense_figures() -> None:
    assert ACCELERATORS["h100"].peak_flops == 989e12  # dense bf16, not the 2:4-sparse 1979
    assert ACCELERATORS["tpu-v5e"].hbm_bandwidth == 819e9
    assert ACCELERATORS["v100-32gb"].dtype == "fp16"
    assert set(ACCELERATORS) >= {"a100-80gb", "h100", "h200", "b200", "tpu-v4", "tpu-v5e",
                                 "tpu-v5p", "tpu-v6e", "v100-32gb", "cpu"}


# ---- node estimates --------------------------------------------------------------------------


def test_train_node_sums_student_and_teacher() -> None:
    student, teacher = PRESETS["gpt2"], PRESETS["gpt2-medium"]
    hw = Hardware.from_name("a100-80gb", count=4, mfu=0.5, price_per_device_hour=2.0)
    e = estimate_train(student, tokens=1e9, seq_len=1024, micro_batch=8, hardware=hw,
                       dtype_bytes=2, teacher=teacher)
    assert e.flops == pytest.approx(train_flops(student, 1e9, 1024)
                                    + forward_flops(teacher, 1e9, 1024))
    assert e.teacher_flops == pytest.approx(forward_flops(teacher, 1e9, 1024))
    assert e.wall_seconds == pytest.approx(e.flops / (4 * 312e12 * 0.5))  # compute-bound
    assert e.device_hours == pytest.approx(e.wall_seconds * 4 / 3600)
    assert e.cost_usd == pytest.approx(e.device_hours * 2.0)
    assert e.memory_per_device_bytes == sum(e.memory_breakdown.values())
    assert {"teacher_weights", "teacher_logits", "student_logits"} <= set(e.memory_breakdown)
    assert e.storage_bytes == checkpoint_bytes(student, 2) == 124_439_808 * 14


def test_train_node_options_change_what_they_should() -> None:
    gemma, teacher = PRESETS["gemma2-2b"], PRESETS["gemma2-9b"]
    kwargs = {"tokens": 1e9, "seq_len": 8192, "micro_batch": 1, "dtype_bytes": 2,
              "teacher": teacher}
    base = estimate_train(gemma, hardware=Hardware.from_name("tpu-v5p", count=8), **kwargs)
    recompute = estimate_train(gemma, hardware=Hardware.from_name("tpu-v5p", count=8),
                               recompute=True, **kwargs)
    student_train = base.details["parts"]["student_train"]["flops"]
    assert recompute.flops - base.flops == pytest.approx(student_train / 3)
    assert (recompute.memory_breakdown["activations"]
            < base.memory_breakdown["activations"] / 10)
    chunked = estimate_train(gemma, hardware=Hardware.from_name("tpu-v5p", count=8),
                             chunked_loss=True, **kwargs)
    assert chunked.memory_breakdown["student_logits"] == 3 * 256 * 256_128 * 4  # 256-row chunks
    zero3 = estimate_train(gemma, hardware=Hardware.from_name("tpu-v5p", count=8, zero_stage=3),
                           **kwargs)
    assert zero3.memory_breakdown["weights"] == pytest.approx(
        base.memory_breakdown["weights"] / 8, abs=1)
    cached = estimate_train(gemma, hardware=Hardware.from_name("tpu-v5p", count=8),
                            teacher_online=False, teacher_cache_k=128, **kwargs)
    assert cached.teacher_flops == 0 and "teacher_weights" not in cached.memory_breakdown


def test_step_by_step_counts_two_passes_of_a_t5_student() -> None:
    t5 = PRESETS["t5-v1_1-base"]
    hw = Hardware.from_name("a100-80gb")
    one = estimate_train(t5, tokens=64 * 1024, seq_len=1024, target_len=256, micro_batch=8,
                         hardware=hw, dtype_bytes=2)
    two = estimate_train(t5, tokens=64 * 1024, seq_len=1024, target_len=256, micro_batch=8,
                         hardware=hw, dtype_bytes=2, passes_per_example=2)
    assert two.flops == pytest.approx(2 * one.flops)
    assert one.flops == pytest.approx(train_flops(t5, 64 * 1024, 1024, target_len=256))


def test_teacher_logit_cache_storage() -> None:
    e = estimate_teacher_logits(PRESETS["gemma2-9b"], tokens=1e6, seq_len=8192, k=128,
                                hardware=H100, dtype_bytes=2, prob_bytes=2)
    assert e.storage_bytes == 1e6 * 128 * (4 + 2) + 4096
    assert e.flops == e.teacher_flops == pytest.approx(forward_flops(PRESETS["gemma2-9b"], 1e6,
                                                                     8192))
    assert teacher_cache_bytes(10, 4) == 10 * 4 * 8 + 4096


def test_remote_teacher_generation_costs_nothing_here() -> None:
    e = estimate_generation_node(None, n_examples=1000, prompt_tokens=300, new_tokens=200,
                                 batch=8, hardware=H100, dtype_bytes=2)
    assert (e.flops, e.wall_seconds, e.memory_per_device_bytes) == (0, 0, 0)
    assert e.details["calls"] == 1000 and e.details["completion_tokens"] == 200_000
    local = estimate_generation_node(PRESETS["llama-2-7b"], n_examples=1000, prompt_tokens=300,
                                     new_tokens=200, batch=8, hardware=H100, dtype_bytes=2)
    assert local.flops == local.teacher_flops > 0
    assert local.memory_breakdown["kv_cache"] == kv_cache_bytes(PRESETS["llama-2-7b"], 8, 500, 2)


def _minillm(**overrides: object):
    """The official GPT-2 base ← xl setup: 16 V100s, 5000 steps of 64 rollouts, 256 rollouts a
    round, 4 PPO epochs, prompt 256 + 256 generated, a 64 × 512 pre-training batch."""
    kwargs = {
        "iterations": 5000, "rollouts_per_iteration": 256, "batch_size": 64, "prompt_len": 256,
        "gen_len": 256, "ppo_epochs": 4, "micro_batch": 4, "pretrain_tokens_per_step": 64 * 512,
        "kd_ratio": 0.5, "teacher_mix_alpha": 0.2, "gen_batch": 16, "dtype_bytes": 2,
        "hardware": Hardware.from_name("v100-32gb", count=16, mfu=0.3),
    }
    return estimate_minillm(PRESETS["gpt2"], PRESETS["gpt2-xl"], **{**kwargs, **overrides})


def test_minillm_loop_shape_and_parts() -> None:
    e = _minillm()
    # 4 · 256 / 64 = 16 steps a round; ceil(5000 / 16) = 313 rounds of 256 rollouts.
    assert (e.details["steps_per_round"], e.details["rounds"]) == (16, 313)
    assert e.details["rollouts"] == 313 * 256
    parts = e.details["parts"]
    assert e.flops == pytest.approx(sum(p["flops"] for p in parts.values()))
    student, teacher = PRESETS["gpt2"], PRESETS["gpt2-xl"]
    ppo_tokens = 5000 * 64 * 512
    assert parts["ppo_student_train"]["flops"] == pytest.approx(
        train_flops(student, ppo_tokens, 512))
    assert parts["ppo_teacher_forward"]["flops"] == pytest.approx(
        forward_flops(teacher, ppo_tokens, 512))
    scoring = 3 * forward_flops(teacher, 313 * 256 * 512, 512) + 3 * forward_flops(
        student, 313 * 256 * 512, 512)
    assert parts["rollout_scoring"]["flops"] == pytest.approx(scoring)
    assert parts["rollout_generation"]["teacher_flops"] > 0  # teacher-mixed sampling


def test_minillm_switches() -> None:
    base = _minillm()
    no_mix = _minillm(teacher_mix_alpha=0.0)
    assert no_mix.details["parts"]["rollout_generation"]["teacher_flops"] == 0
    assert "stats_generation" not in no_mix.details["parts"]
    no_kd = _minillm(kd_ratio=0.0)
    assert "pretrain_teacher_forward" not in no_kd.details["parts"]
    assert base.flops > no_kd.flops > 0
    lean = _minillm(official_sampler=False)
    assert lean.details["rollout_forwards"] == {"teacher": 1, "student": 1}


def test_gkd_expected_costs() -> None:
    student, teacher = PRESETS["qwen2-0.5b"], PRESETS["qwen2-7b"]
    kwargs = {"steps": 100, "batch_size": 16, "prompt_len": 128, "completion_len": 64,
              "micro_batch": 4, "hardware": Hardware.from_name("h100", count=8),
              "dtype_bytes": 2}
    off = estimate_gkd(student, teacher, lmbda=0.0, **kwargs)
    assert set(off.details["parts"]) == {"teacher_forward", "student_train"}
    assert off.flops == pytest.approx(train_flops(student, 1600 * 192, 192)
                                      + forward_flops(teacher, 1600 * 192, 192))
    half = estimate_gkd(student, teacher, lmbda=0.5, seq_kd=True, **kwargs)
    full = estimate_gkd(student, teacher, lmbda=1.0, **kwargs)
    gen = full.details["parts"]["student_generation"]["flops"]
    assert half.details["parts"]["student_generation"]["flops"] == pytest.approx(gen / 2)
    assert half.details["parts"]["teacher_generation"]["teacher_flops"] > 0


def test_eval_sums_models_and_keeps_the_largest_memory() -> None:
    small, large = PRESETS["gpt2"], PRESETS["gpt2-large"]
    hw = Hardware.from_name("cpu")
    both = estimate_eval([small, large], hardware=hw, dtype_bytes=4, tokens=4096, seq_len=512,
                         batch=2)
    only_large = estimate_eval([large], hardware=hw, dtype_bytes=4, tokens=4096, seq_len=512,
                               batch=2)
    assert both.flops == pytest.approx(forward_flops(small, 4096, 512)
                                       + forward_flops(large, 4096, 512))
    assert both.memory_per_device_bytes == only_large.memory_per_device_bytes
