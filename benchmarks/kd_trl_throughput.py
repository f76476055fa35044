"""Pre-training KD tokens/s: kdspec (online teacher, cached top-K teacher) vs TRL's GKDTrainer.

One `kdspec run` trains a 4-layer d256 llama teacher on `builtin:hmm` and distils a 2-layer d64
student from it twice (online teacher; top-64 cache), 40 steps of 8 × 256 tokens each. Then, in a
fresh process, TRL's off-policy distillation trainer distils a fresh student of the same
architecture from the same teacher on the same 320 packed rows in the same order (a sequential
sampler over kdspec's stream), with the same loss: `trl.experimental.gkd.GKDTrainer` with
``lmbda=0`` (never on-policy), ``seq_kd=False`` and ``beta=0`` (forward KL at T = 1; its
`generalized_jsd_loss`), AdamW at lr 1e-3, fp32, sdpa attention, no gradient checkpointing.
(TRL 1.16's `DistillationTrainer` generates from the student on every step, so it is not an
off-policy pre-training KD trainer; GKD with ``lmbda=0`` is.)

Tokens/s counts the tokens the student reads (8 × 256 per step) over the summed step times: for
kdspec the train loop's own (`<node>/measured.json`: forward, backward, clipping, optimizer),
for TRL a callback's `on_step_begin` → `on_step_end` (the same work). The first step is
included in both. The cache build is the `teacher_logits` node's wall time.

TRL is a benchmark-only dependency: ``pip install trl`` (measured with trl 1.16).

    OMP_NUM_THREADS=1 python benchmarks/kd_trl_throughput.py [--run-dir /tmp/kd-trl]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, SEQ = 40, 8, 256
SPEC = f"""\
kdspec: 1
name: kd-trl-throughput
tokenizer: builtin:words
models:
  big:   {{arch: {{family: llama, d_model: 256, n_layers: 4, n_heads: 4, d_ff: 704,
                 max_seq_len: {SEQ}}}}}
  small: {{arch: {{family: llama, d_model: 64, n_layers: 2, n_heads: 4, d_ff: 192,
                 max_seq_len: {SEQ}}}}}
data:
  corpus: {{source: "builtin:hmm", n: 2000}}
hardware: {{accelerator: cpu}}
stages:
  - {{name: teacher, kind: pretrain, student: big, data: corpus, steps: 20, batch_size: {BATCH},
     seq_len: {SEQ}, optimizer: {{lr: 1.0e-3}}}}
  - {{name: kd_online, kind: pretrain_kd, teacher: teacher, student: small, data: corpus,
     steps: {STEPS}, batch_size: {BATCH}, seq_len: {SEQ}, optimizer: {{lr: 1.0e-3}}}}
  - {{name: kd_topk, kind: pretrain_kd, teacher: teacher, student: small, data: corpus,
     steps: {STEPS}, batch_size: {BATCH}, seq_len: {SEQ}, optimizer: {{lr: 1.0e-3}},
     teacher_cache: {{mode: topk, k: 64}}}}
"""


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def run_kdspec(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(SPEC)
    subprocess.run([sys.executable, "-m", "kdspec.cli", "run", str(run_dir / "spec.yaml"),
                    "--run-dir", str(run_dir / "run")], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def kd_rows(run_dir: Path):
    """The `[STEPS·BATCH, SEQ + 1]` packed rows kd_online trains on, in its order."""
    import yaml

    from kdspec.plan.planner import build_plan
    from kdspec.spec import Spec
    from kdspec_torch.batches import EpochSampler, build_token_data, order_seed, read_records
    from kdspec_torch.tokenizer import load_tokenizer

    spec = Spec.model_validate(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    config = build_plan(spec, estimate=False).node("kd_online").config
    tokenizer = load_tokenizer(config["tokenizer"], spec_dir=run_dir, work_dir=run_dir / "tok")
    records = read_records(config["data"], seed=config["seed"], spec_dir=run_dir)
    data = build_token_data("packed", records, tokenizer, SEQ)
    order = EpochSampler(len(data), order_seed(config["seed"], config["data"]))
    return data.tokens[order.indices(0, STEPS * BATCH)], tokenizer


def run_trl(run_dir: Path) -> dict:
    """GKDTrainer (lmbda 0, beta 0) on kd_online's rows; its step-time tokens/s."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows, tokenizer = kd_rows(run_dir)
    run = run_dir / "run"
    teacher = AutoModelForCausalLM.from_pretrained(run / "teacher" / "model",
                                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(run / "kd_online" / "model"), attn_implementation="sdpa")

    class Sequential(GKDTrainer):
        """kdspec's stream order instead of a shuffle: the same batches as kd_online."""

        def _get_train_sampler(self, dataset=None):
            return SequentialSampler(dataset if dataset is not None else self.train_dataset)

    class StepTimer(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            StepTimer.seconds += time.perf_counter() - self.started

    def collate(examples: list[dict]) -> dict:
        ids = torch.tensor([e["input_ids"] for e in examples])
        # GKD predicts labels[:, 1:] from logits[:, :-1]: SEQ targets per row of SEQ + 1 tokens,
        # as kdspec; the model reads one token more than kdspec's (the last, never a target).
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    args = GKDConfig(
        output_dir=str(run_dir / "trl"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=False, max_length=None, report_to=[],
        save_strategy="no", logging_steps=STEPS, dataloader_num_workers=0, seed=0,
        disable_tqdm=True)
    trainer = Sequential(model=student, teacher_model=teacher, args=args,
                         train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}),
                         data_collator=collate, processing_class=tokenizer,
                         callbacks=[StepTimer()])
    metrics = trainer.train().metrics
    tokens = STEPS * BATCH * SEQ
    return {"tokens_per_s": tokens / StepTimer.seconds, "step_seconds": StepTimer.seconds,
            "train_runtime": metrics["train_runtime"], "train_loss": metrics["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/kd-trl"))
    parser.add_argument("--trl-only", action="store_true",
                        help="(internal) run the TRL side on an existing --run-dir and print JSON")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a finished kdspec run in --run-dir; rerun only TRL")
    args = parser.parse_args()
    if args.trl_only:
        print(json.dumps(run_trl(args.run_dir)))
        return
    if not (args.reuse and (args.run_dir / "run" / "kd_topk" / "measured.json").exists()):
        run_kdspec(args.run_dir)
    trl = json.loads(subprocess.run(
        [sys.executable, __file__, "--trl-only", "--run-dir", str(args.run_dir)], check=True,
        capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1])
    run = args.run_dir / "run"
    online = read(run / "kd_online" / "measured.json")["tokens_per_s"]
    print("| trainer | teacher | tokens/s | vs kdspec online | vs TRL | cache build (s) |")
    print("|---|---|---:|---:|---:|---:|")
    results = [("kdspec `kd_online`", "online", online, "-"),
               ("kdspec `kd_topk`", "top-64 cache",
                read(run / "kd_topk" / "measured.json")["tokens_per_s"],
                f"{read(run / 'kd_topk.teacher_logits' / 'done')['wall_seconds']:.1f}"),
               ("TRL `GKDTrainer` (lmbda 0, beta 0)", "online", trl["tokens_per_s"], "-")]
    for name, teacher, rate, build in results:
        print(f"| {name} | {teacher} | {rate:,.0f} | {rate / online:.2f}× | "
              f"{rate / trl['tokens_per_s']:.2f}× | {build} |")
    print(f"\nTRL: {trl['step_seconds']:.1f} s in steps, train_runtime "
          f"{trl['train_runtime']:.1f} s, train loss {trl['train_loss']:.3f}")


if __name__ == "__main__":
    main()
