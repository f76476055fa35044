"""Peak memory and time of the KD loss, naive (full logits) vs chunked, forward + backward.

Each (configuration, implementation) runs in a fresh subprocess: it allocates the inputs (student
hidden states and head, teacher hidden states and head, labels), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``; without it, the growth of ``ru_maxrss``), runs ``loss.backward()``
``--repeats`` times, and reports the peak resident memory ADDED above the post-input baseline, and
the fastest repeat's wall-clock and CPU (user + sys) time. ``--rounds`` runs every subprocess that
many times, interleaved, keeping the fastest times: on a shared machine the CPU-time ratio is the
steadier one. fp32 on the CPU with torch's default thread count. The teacher is given as hidden
states + head, so the naive side builds the teacher's ``[tokens, vocab]`` logits and the chunked
side builds them a chunk at a time.

    python benchmarks/kd_loss_memory.py                              # the default grid
    python benchmarks/kd_loss_memory.py --tokens 4096 --vocab 65536 131072
    python benchmarks/kd_loss_memory.py --tokens 1024 --vocab 32768 --sweep 128 256 512 1024

``--sweep`` runs the chunked side at each chunk size (and the naive side once) to pick the
default. Configurations run one at a time; the naive side at 4096 × 131072 peaks near 12 GiB and
is skipped when its estimate exceeds ``--max-gib`` or 80% of the available memory. Results:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Job:
    impl: str  # "naive" or "chunked"
    tokens: int
    vocab: int
    hidden: int
    chunk_size: int | None
    divergence: str
    temperature: float
    hard_label_weight: float
    repeats: int


# ------------------------------------------------------------------------------------------
# Worker: one measurement in this (fresh) process
# ------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(job: Job) -> dict:
    import torch

    from kdspec_torch.chunked_loss import chunked_kd_loss, default_chunk_size
    from kdspec_torch.losses import kd_loss

    torch.manual_seed(0)
    t, v, h = job.tokens, job.vocab, job.hidden
    # In-place scaling: no temporaries larger than the inputs before the baseline.
    student_hidden = torch.randn(t, h).requires_grad_()
    student_head = torch.randn(v, h).mul_(h**-0.5).requires_grad_()
    teacher_hidden = torch.randn(t, h)
    teacher_head = torch.randn(v, h).mul_(1.5 * h**-0.5)
    labels = torch.randint(0, v, (t,))
    kwargs = dict(
        teacher_hidden=teacher_hidden,
        teacher_head_weight=teacher_head,
        divergence=job.divergence,
        temperature=job.temperature,
        labels=labels,
        hard_label_weight=job.hard_label_weight,
    )
    if job.impl == "chunked":
        chunk = job.chunk_size or default_chunk_size(v)
        kwargs["chunk_size"] = chunk
        fn = chunked_kd_loss
    else:
        chunk = None
        fn = kd_loss

    gc.collect()
    baseline = _status_kib("VmRSS") * 1024
    reset_ok = _reset_peak()
    if not reset_ok:
        baseline = _peak_bytes(False)
    times, cpu_times = [], []
    for _ in range(job.repeats):
        student_hidden.grad = None
        student_head.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = fn(student_hidden, student_head, **kwargs)
        loss.backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        value = loss.item()
        del loss
    return {
        **asdict(job),
        "chunk_size": chunk,
        "peak_added_bytes": _peak_bytes(reset_ok) - baseline,
        "seconds": min(times),
        "cpu_seconds": min(cpu_times),
        "loss": value,
        "grad_norm": student_head.grad.norm().item(),
        "threads": torch.get_num_threads(),
        "peak_method": "VmHWM reset" if reset_ok else "ru_maxrss delta",
    }


# ------------------------------------------------------------------------------------------
# Driver: fresh subprocess per measurement, markdown table
# ------------------------------------------------------------------------------------------


def naive_estimate_bytes(tokens: int, vocab: int) -> int:
    """About five fp32 [tokens, vocab] buffers live at the naive side's peak; one more as margin."""
    return 6 * tokens * vocab * 4


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def measure(job: Job, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(asdict(job))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_rounds(jobs: list[Job], rounds: int, timeout: float) -> list[dict]:
    """Each job ``rounds`` times, interleaved (order reversed every other round) so that load
    from other processes hits every job alike; keeps the fastest time and the largest peak."""
    best: list[dict | None] = [None] * len(jobs)
    for r in range(rounds):
        order = range(len(jobs)) if r % 2 == 0 else reversed(range(len(jobs)))
        for i in order:
            result = measure(jobs[i], timeout)
            if best[i] is not None:
                result["seconds"] = min(result["seconds"], best[i]["seconds"])
                result["cpu_seconds"] = min(result["cpu_seconds"], best[i]["cpu_seconds"])
                peak = max(result["peak_added_bytes"], best[i]["peak_added_bytes"])
                result["peak_added_bytes"] = peak
            best[i] = result
    return best


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def table_row(naive: dict | None, chunked: dict) -> str:
    cells = [chunked["tokens"], chunked["vocab"], chunked["hidden"], chunked["chunk_size"]]
    if naive is None:
        cells += ["skipped", _mib(chunked["peak_added_bytes"]), "–", "skipped"]
        cells += [f"{chunked['seconds']:.2f}", "–", "–", "–"]
    else:
        mem_ratio = naive["peak_added_bytes"] / max(chunked["peak_added_bytes"], 1)
        wall = chunked["seconds"] / naive["seconds"]
        cpu = chunked["cpu_seconds"] / naive["cpu_seconds"]
        rel = abs(chunked["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-30)
        cells += [_mib(naive["peak_added_bytes"]), _mib(chunked["peak_added_bytes"])]
        cells += [f"**{mem_ratio:.1f}×**", f"{naive['seconds']:.2f}", f"{chunked['seconds']:.2f}"]
        cells += [f"**{wall:.2f}×**", f"{cpu:.2f}×", f"{rel:.1e}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


HEADER = (
    "| tokens | vocab | hidden | chunk | naive MiB | chunked MiB | memory naive/chunked "
    "| naive s | chunked s | time chunked/naive | CPU time chunked/naive | loss rel. diff |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def machine_note(threads: int | None) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    import torch

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({threads} threads), Python {platform.python_version()}, "
        f"{available_bytes() / GIB:.0f} GiB available at start"
    )


def configurations(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    if args.tokens or args.vocab or args.hidden:
        return [
            (t, v, h)
            for h in args.hidden or [1024]
            for t in args.tokens or [1024, 4096]
            for v in args.vocab or [32768, 65536, 131072]
        ]
    grid = [(t, v, 1024) for t in (1024, 4096) for v in (32768, 65536, 131072)]
    return grid + [(1024, 32768, 2048), (1024, 131072, 2048)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, nargs="*", default=[])
    parser.add_argument("--vocab", type=int, nargs="*", default=[])
    parser.add_argument("--hidden", type=int, nargs="*", default=[])
    parser.add_argument("--chunk-size", type=int, default=None, help="default: per vocab")
    parser.add_argument("--sweep", type=int, nargs="*", default=[], help="chunk sizes to try")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hard-label-weight", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per subprocess")
    parser.add_argument("--rounds", type=int, default=1, help="subprocesses per job")
    parser.add_argument("--max-gib", type=float, default=14.0, help="skip naive above this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(Job(**json.loads(args.worker)))))
        return 0

    print(HEADER, flush=True)
    results = []
    for tokens, vocab, hidden in configurations(args):

        def job(impl: str, chunk: int | None, tokens=tokens, vocab=vocab, hidden=hidden) -> Job:
            return Job(
                impl, tokens, vocab, hidden, chunk, args.divergence, args.temperature,
                args.hard_label_weight, args.repeats,
            )  # fmt: skip

        limit = min(args.max_gib * GIB, 0.8 * available_bytes())
        run_naive = naive_estimate_bytes(tokens, vocab) <= limit
        jobs = [job("naive", None)] if run_naive else []
        jobs += [job("chunked", chunk) for chunk in args.sweep or [args.chunk_size]]
        measured = measure_rounds(jobs, args.rounds, args.timeout)
        naive = measured.pop(0) if run_naive else None
        for chunked in measured:
            print(table_row(naive, chunked), flush=True)
        results += measured
    if results:
        threads, method = results[-1]["threads"], results[-1]["peak_method"]
        print(f"\nMachine: {machine_note(threads)}. Peak memory: {method}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
