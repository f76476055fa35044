"""Teacher-logit cache: bytes per token and the error a top-K / sampled-K cache introduces.

Trains a small llama teacher on `builtin:hmm` and, briefly, a smaller student (one `kdspec run`
with the torch backend), then, on real teacher outputs for ``--rows`` packed rows, for each K
and each cache mode, writes the teacher's slices through the real cache
(`kdspec_torch.teacher_cache`: int32 ids, float16 probabilities, checksums) and reads them back,
and compares the cached target ``p̂`` with the full teacher distribution ``p``:

* bytes per token: the shard files on disk over the positions cached;
* ``KL(p̂ ‖ p)`` per position, ``Σ_k p̂_k log(p̂_k / p_{id_k})``: ``−log(mass of the top K)`` for
  top-K;
* ``TV = ½ Σ_v |p̂_v − p_v|`` per position: the error of the gradient target (the KD gradient in
  the student's logits is ``q − target``), so it bounds the per-position gradient error;
* the KD objective against a student that is not the teacher: forward KL
  ``Σ p log(p / q)`` and soft cross-entropy ``−Σ p log q``, with ``p̂`` for ``p``
  (`sparse_forward_kl`, `sparse_soft_cross_entropy` vs `forward_kl`, `soft_cross_entropy`),
  as relative errors;
* for sampled-K, ``--draws`` independent caches (seeds): the bias of the mean soft CE over the
  draws, with its standard error. The soft CE is linear in ``p̂`` and ``E[p̂] = p``, so it is
  unbiased; the forward KL adds ``Σ p̂ log p̂``, which is not linear, so it is biased (by the
  entropy estimate's bias) even though its gradient is not. Top-K is deterministic: its error is
  all bias.

    OMP_NUM_THREADS=2 python benchmarks/cache_error.py [--run-dir /tmp/cache-error]
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = """\
kdspec: 1
name: cache-error
tokenizer: builtin:words
models:
  big: {arch: {family: llama, d_model: 256, n_layers: 4, n_heads: 4, d_ff: 704,
                   max_seq_len: 256}}
  small: {arch: {family: llama, d_model: 64, n_layers: 2, n_heads: 4, d_ff: 192,
                   max_seq_len: 256}}
data:
  corpus: {source: "builtin:hmm", n: 2000}
hardware: {accelerator: cpu}
stages:
  - {name: teacher, kind: pretrain, student: big, data: corpus, steps: %(teacher_steps)d,
     batch_size: 8, seq_len: 256, optimizer: {lr: 1.0e-3}}
  - {name: student, kind: pretrain, student: small, data: corpus, steps: %(student_steps)d,
     batch_size: 8, seq_len: 256, optimizer: {lr: 1.0e-3}}
"""
KS = (16, 64, 256)


@dataclass
class Outputs:
    """Full teacher and student logits ``[rows, seq, V]`` on the same packed rows."""

    teacher: torch.Tensor
    student: torch.Tensor
    ce: dict[str, float]  # each model's next-token cross-entropy on the rows (nats)


def train_models(run_dir: Path, teacher_steps: int, student_steps: int) -> float:
    """`kdspec run` of SPEC into `run_dir`; the wall seconds it took."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = run_dir / "cache_error.yaml"
    spec.write_text(SPEC % {"teacher_steps": teacher_steps, "student_steps": student_steps})
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdspec.cli", "run", str(spec), "--run-dir",
                    str(run_dir / "run")], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def model_outputs(run_dir: Path, n_rows: int) -> Outputs:
    """Teacher and student logits on the first `n_rows` packed rows of the training corpus."""
    from transformers import AutoModelForCausalLM

    from kdspec_torch.batches import build_token_data, read_records
    from kdspec_torch.losses import cross_entropy_loss
    from kdspec_torch.tokenizer import load_tokenizer

    run = run_dir / "run"
    tokenizer = load_tokenizer("builtin:words", spec_dir=run_dir, work_dir=run_dir / "tok")
    records = read_records({"source": "builtin:hmm", "n": 2000}, seed=0, spec_dir=run_dir)
    batch = build_token_data("packed", records, tokenizer, 256).batch(torch.arange(n_rows))
    logits, ce = {}, {}
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(run / name / "model").eval()
        with torch.no_grad():
            logits[name] = model(input_ids=batch.input_ids).logits.float()
        ce[name] = cross_entropy_loss(logits[name], batch.labels).item()
    return Outputs(logits["teacher"], logits["student"], ce)


def cached_slice(teacher: torch.Tensor, mode: str, k: int, seed: int,
                 folder: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The slice as the cache stores and returns it (fp16 probabilities, renormalised on read):
    `(ids, probs, bytes on disk per position)`."""
    from kdspec_torch.teacher_cache import CacheReader, CacheWriter
    from kdspec_torch.teacher_slice import sampled_slice, topk_slice

    if mode == "topk":
        ids, probs = topk_slice(teacher, k)
    else:
        generator = torch.Generator().manual_seed(seed)
        ids, probs = sampled_slice(teacher, k, generator=generator)
    shutil.rmtree(folder, ignore_errors=True)
    rows, seq = teacher.shape[:2]
    writer = CacheWriter(folder, np.arange(rows), seq_len=seq, k=k, shard_bytes=2**40)
    writer.write_shard(0, ids, probs)
    writer.finish(mode=mode, temperature=1.0, vocab_size=teacher.shape[-1])
    disk = sum((folder / f"{kind}-00000.npy").stat().st_size for kind in ("ids", "probs"))
    got_ids, got_probs = CacheReader.open(folder).get(torch.arange(rows))
    return got_ids, got_probs, disk / (rows * seq)


def slice_errors(teacher: torch.Tensor, student: torch.Tensor, ids: torch.Tensor,
                 probs: torch.Tensor) -> dict[str, float]:
    """Per-position means of KL(p̂‖p) and TV(p̂, p), and the cached objectives."""
    from kdspec_torch.losses import sparse_forward_kl, sparse_soft_cross_entropy
    from kdspec_torch.teacher_slice import densify_slice

    log_p = teacher.double().log_softmax(-1)
    dense = densify_slice(ids, probs.double(), teacher.shape[-1])
    support = dense > 0
    kl = torch.where(support, dense * (dense.clamp_min(1e-300).log() - log_p), 0.0).sum(-1)
    tv = 0.5 * (dense - log_p.exp()).abs().sum(-1)
    return {"kl": kl.mean().item(), "tv": tv.mean().item(),
            "fkl": sparse_forward_kl(student.double(), ids, probs.double()).item(),
            "ce": sparse_soft_cross_entropy(student.double(), ids, probs.double()).item()}


def full_objectives(teacher: torch.Tensor, student: torch.Tensor) -> dict[str, float]:
    from kdspec_torch.losses import forward_kl, soft_cross_entropy

    t, s = teacher.double(), student.double()
    p = t.softmax(-1)
    entropy = -(p * t.log_softmax(-1)).sum(-1).mean().item()
    return {"fkl": forward_kl(s, t).item(), "ce": soft_cross_entropy(s, t).item(),
            "entropy": entropy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/cache-error"))
    parser.add_argument("--teacher-steps", type=int, default=80)
    parser.add_argument("--student-steps", type=int, default=15)
    parser.add_argument("--rows", type=int, default=32, help="packed rows of 256 positions")
    parser.add_argument("--draws", type=int, default=16, help="sampled-K caches per K")
    parser.add_argument("--reuse", action="store_true", help="keep an existing --run-dir run")
    args = parser.parse_args()
    seconds = 0.0
    if not (args.reuse and (args.run_dir / "run" / "student" / "model").exists()):
        seconds = train_models(args.run_dir, args.teacher_steps, args.student_steps)
    out = model_outputs(args.run_dir, args.rows)
    full = full_objectives(out.teacher, out.student)
    vocab = out.teacher.shape[-1]
    print(f"teacher: {args.teacher_steps} steps, student: {args.student_steps} steps "
          f"({seconds:.0f} s for `kdspec run`); {args.rows} × 256 = {args.rows * 256} "
          f"positions, vocabulary {vocab}; next-token CE: teacher {out.ce['teacher']:.3f}, "
          f"student {out.ce['student']:.3f} nats; teacher entropy {full['entropy']:.3f} nats; "
          f"full objectives: forward KL {full['fkl']:.4f}, soft CE {full['ce']:.4f}")
    print(f"full fp32 distribution: {4 * vocab:,} bytes per token\n")
    print("| K | cache | bytes/token | KL(p̂‖p) | TV(p̂, p) | forward-KL rel. error | "
          "soft-CE rel. error | soft-CE bias over draws (± s.e.) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for k in KS:
            for mode in ("topk", "sampled"):
                draws = 1 if mode == "topk" else args.draws
                rows = []
                for seed in range(draws):
                    ids, probs, per_token = cached_slice(out.teacher, mode, k, seed,
                                                         Path(tmp) / "cache")
                    rows.append(slice_errors(out.teacher, out.student, ids, probs))
                print(_row(k, mode, per_token, rows, full))


def _row(k: int, mode: str, per_token: float, rows: list[dict[str, float]],
         full: dict[str, float]) -> str:
    """A table row: errors of the first draw; for sampled-K the soft-CE bias over all draws."""
    first = rows[0]
    fkl = (first["fkl"] - full["fkl"]) / full["fkl"]
    ce = (first["ce"] - full["ce"]) / full["ce"]
    if len(rows) > 1:
        values = np.array([r["ce"] for r in rows])
        mean_err = (values.mean() - full["ce"]) / full["ce"]
        stderr = values.std(ddof=1) / math.sqrt(len(values)) / full["ce"]
        bias = f"{mean_err:+.2e} ± {stderr:.1e} ({len(rows)} draws)"
    else:
        bias = f"{ce:+.2e} (deterministic)"
    name = {"topk": "top-K", "sampled": "sampled-K"}[mode]
    return (f"| {k} | {name} | {per_token:,.0f} | {first['kl']:.4f} | {first['tv']:.4f} | "
            f"{fkl:+.2%} | {ce:+.2%} | {bias} |")


if __name__ == "__main__":
    main()
