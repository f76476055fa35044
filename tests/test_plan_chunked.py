"""`kdspec plan` prices the chunked KD loss with the backend's own rule and chunk size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdspec.cli import app
from kdspec.estimate.memory import (
    CHUNKED_AUTO_ELEMENTS,
    MIN_CHUNK_ROWS,
    chunked_by_default,
    default_chunk_rows,
    logit_buffer_bytes,
)

runner = CliRunner()
VOCAB, SEQ = 128_256, 8192  # Llama 3's vocabulary, one 8k sequence per micro-batch
# A small student (0.13 B parameters, mostly embeddings) whose logits dominate its memory.
LLAMA = {"family": "llama", "vocab_size": VOCAB, "d_model": 512, "n_layers": 2, "n_heads": 4,
         "d_ff": 1024, "max_seq_len": SEQ}


def _plan_memory(tmp_path: Path, chunked: str, family: str = "llama") -> int:
    """Memory per device of the pretrain_kd node in `kdspec plan --json` of a spec with
    `loss.chunked: <chunked>` (fp32 on one CPU device)."""
    arch = {**LLAMA, "family": family}
    spec = {
        "kdspec": 1, "name": "big-vocab",
        "models": {"big": {"arch": {**arch, "n_layers": 4}}, "small": {"arch": arch}},
        "data": {"corpus": {"source": "builtin:hmm"}},
        "hardware": {"accelerator": "cpu"},
        "stages": [{"name": "kd", "kind": "pretrain_kd", "student": "small", "teacher": "big",
                    "data": "corpus", "steps": 10, "batch_size": 1, "seq_len": SEQ,
                    "loss": {"chunked": chunked}}],
    }
    path = tmp_path / f"{chunked}-{family}.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    nodes = {n["id"]: n for n in json.loads(result.stdout)["nodes"]}
    return nodes["kd"]["estimate"]["memory_per_device_bytes"]


def test_plan_shows_the_chunked_loss_saving_at_a_large_vocabulary(tmp_path: Path) -> None:
    off, on = _plan_memory(tmp_path, "off"), _plan_memory(tmp_path, "on")
    # 5 fp32 [tokens, vocab] copies (student 3, online teacher 2) over 8192 rows vs 256 rows.
    rows = default_chunk_rows(VOCAB)
    assert rows == MIN_CHUNK_ROWS == 256
    assert off - on == 5 * (SEQ - rows) * VOCAB * 4  # 19.6 GB
    assert on < off / 3  # 7.8 GiB instead of 26.7 GiB
    # 8192 × 128256 ≥ 2^27: auto chunks, as the torch backend's `use_chunked` does.
    assert _plan_memory(tmp_path, "auto") == on


def test_auto_never_chunks_a_soft_capped_head(tmp_path: Path) -> None:
    # gemma2 soft-caps its final logits, which the chunked loss cannot apply: the backend's
    # auto falls back to the plain loss, and so does the plan.
    assert _plan_memory(tmp_path, "auto", "gemma2") == _plan_memory(tmp_path, "off", "gemma2")


def test_default_chunk_rows_by_hand() -> None:
    # Largest power of two r with 4·r·V ≤ 32 MiB, clamped to [256, 8192].
    assert default_chunk_rows(8192) == 1024  # 4 · 1024 · 8192 = 32 MiB exactly
    assert default_chunk_rows(8193) == 512
    assert default_chunk_rows(300) == 8192  # 27962 rows fit: capped
    assert default_chunk_rows(32768) == 256
    assert default_chunk_rows(262_144) == 256  # 32 rows fit: the floor
    with pytest.raises(ValueError, match="vocab"):
        default_chunk_rows(0)


def test_auto_rule_threshold() -> None:
    assert CHUNKED_AUTO_ELEMENTS == 2**27
    assert chunked_by_default(2**17, 2**10)
    assert not chunked_by_default(2**17 - 1, 2**10)


def test_logit_buffers_use_the_backend_chunk_by_default() -> None:
    # chunk_tokens=0 (the estimator's default) means default_chunk_rows(vocab).
    auto = logit_buffer_bytes(4096, VOCAB, teacher="online", chunk_tokens=0)
    assert auto == logit_buffer_bytes(4096, VOCAB, teacher="online", chunk_tokens=256)
    assert auto["student_logits"] == 3 * 256 * VOCAB * 4
    # A cached slice is read for the whole micro-batch: int64 id + fp32 probability.
    cached = logit_buffer_bytes(4096, VOCAB, teacher="cached", cache_k=64, chunk_tokens=0)
    assert cached["teacher_cache_slice"] == 4096 * 64 * 12


def test_torch_backend_uses_the_same_rule() -> None:
    distill = pytest.importorskip("kdspec_torch.objectives.distill")
    chunked_loss = pytest.importorskip("kdspec_torch.chunked_loss")
    for vocab in (300, 8192, 8193, 50_257, VOCAB, 256_000):
        assert chunked_loss.default_chunk_size(vocab) == default_chunk_rows(vocab)
    for tokens in (2**16, 2**17 - 1, 2**17):
        assert distill.use_chunked("auto", tokens, 1024) == chunked_by_default(tokens, 1024)
