"""Rollout throughput: kdspec's batched KV-cache generation against `model.generate`.

Generated tokens per second (batch × new tokens / wall time; every row runs the full
`--new-tokens`, no eos stops it) on fresh-weight llama models of the given sizes (MLP 2·d),
fp32, torch's default thread count, the median of `--repeats` runs after one warm-up, the
cases taking turns:

* `kdspec generate`: `kdspec_torch.generate.generate`, student only, sampled at temperature 1;
* `hf generate`: `model.generate(do_sample=True, top_k=0, ...)` on the same model and batch;
* `kdspec mixed`: MiniLLM's teacher-mixed sampling (student and teacher decoded side by side,
  each with its KV cache), α = 0.2;
* `kdspec rollout`: `minillm.rollout.sample_rollouts`, the mixed sampling plus the batched
  scoring pass (one full forward of each model) that yields old log-probs, weights, rewards;
* `no-cache mixed`: the same mixed sampling recomputing both models over the whole prefix at
  every step (what a loop without a KV cache pays).

    python benchmarks/rollout_throughput.py           # specs/minillm.yaml's sizes and shapes
    python benchmarks/rollout_throughput.py --student 256 4 --teacher 512 6 --batch 32 \\
        --prompt 64 --new-tokens 64 --vocab 8192
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from kdspec_torch.generate import Sampling, generate
from kdspec_torch.minillm.rollout import RolloutConfig, sample_rollouts

PAD, BOS = 0, 1


def model(vocab: int, d_model: int, layers: int, heads: int, seed: int) -> PreTrainedModel:
    config = AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None)
    torch.manual_seed(seed)
    out = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    out.generation_config.eos_token_id = None
    return out


def timed(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per case after one warm-up each. The cases take turns (round-robin), so
    a burst of other work on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def no_cache_mixed(student: PreTrainedModel, teacher: PreTrainedModel, ids: torch.Tensor,
                   new_tokens: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Teacher-mixed sampling that re-reads the whole prefix every step (no KV cache; only the
    last position goes through the LM head, as in the cached loop)."""
    for _ in range(new_tokens):
        q = student(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].softmax(-1)
        p = teacher(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].softmax(-1)
        token = torch.multinomial((1 - alpha) * q + alpha * p, 1, generator=generator)
        ids = torch.cat([ids, token], dim=1)
    return ids


def run(args: argparse.Namespace) -> list[dict]:
    student = model(args.vocab, *args.student, args.heads, seed=0)
    teacher = model(args.vocab, *args.teacher, args.heads, seed=1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, args.vocab, (args.batch, args.prompt), generator=gen)
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=1.0)
    rollout = RolloutConfig(max_prompt_length=args.prompt,
                            max_length=args.prompt + args.new_tokens, teacher_mix_alpha=0.2)
    prompts = ids.tolist()
    # an eos id that is never sampled keeps every row going for the full length
    never = args.vocab + 7
    cases: dict[str, Callable[[], object]] = {
        "kdspec generate": lambda: generate(student, ids, mask, sampling, eos_token_id=None,
                                            pad_token_id=PAD, generator=gen),
        "hf generate": lambda: student.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            pad_token_id=PAD),
        "kdspec mixed": lambda: generate(student, ids, mask, sampling, eos_token_id=None,
                                         pad_token_id=PAD, generator=gen, mix_model=teacher,
                                         mix_alpha=0.2),
        "kdspec rollout": lambda: sample_rollouts(student, teacher, prompts, rollout,
                                                  pad_id=PAD, eos_id=never, generator=gen,
                                                  chunk_size=args.batch),
        "no-cache mixed": lambda: no_cache_mixed(student, teacher, ids, args.new_tokens, 0.2,
                                                 gen),
    }
    chosen = {name: cases[name] for name in (args.cases or cases)}
    tokens = args.batch * args.new_tokens
    rows = [{"case": name, "seconds": round(seconds, 4),
             "tokens_per_s": round(tokens / seconds, 1)}
            for name, seconds in timed(chosen, args.repeats).items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown(args: argparse.Namespace, rows: list[dict]) -> str:
    head = (f"student d{args.student[0]}×{args.student[1]}L, teacher d{args.teacher[0]}×"
            f"{args.teacher[1]}L, {args.heads} heads, vocab {args.vocab}, batch {args.batch}, "
            f"prompt {args.prompt}, {args.new_tokens} new tokens, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    lines = [head, "", "| case | s | tokens/s |", "|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['seconds']} | {r['tokens_per_s']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=int, nargs=2, default=[64, 2], metavar=("D", "L"))
    parser.add_argument("--teacher", type=int, nargs=2, default=[128, 4], metavar=("D", "L"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=530)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="*", help="Run only these cases.")
    args = parser.parse_args()
    rows = run(args)
    print(markdown(args, rows))


if __name__ == "__main__":
    main()
