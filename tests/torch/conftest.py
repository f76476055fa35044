"""Shared fixtures for torch-backend tests: tiny specs, and running plan nodes by hand.

`make_run(stages, ...)` builds a small Spec (tiny llama models, the builtin `hmm` corpus and a
prompt/response jsonl file in the test's folder), plans it, and returns a `TinyRun` whose
`run(node_id)` runs that node and its dependencies on the torch backend with hand-built
`NodeContext`s, recording every event.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kdspec.plan.graph import Plan
from kdspec.plan.planner import build_plan
from kdspec.run.backend import NodeContext
from kdspec.run.events import Event
from kdspec.spec import Spec

try:
    import torch
except ImportError:  # the torch tests skip themselves; this file must still import
    torch = None

# Models here are tiny (d_model 32-64): one intra-op thread is as fast as two on an idle machine
# and avoids OpenMP spin-waits that slow a shared 2-core machine tenfold (measured: 3 s vs 41 s
# for test_backend_stages under load 5). Subprocess workers get OMP_NUM_THREADS=1 to match.
if torch is not None:
    torch.set_num_threads(1)


TINY_ARCH: dict[str, Any] = {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4,
                             "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64}
TEACHER_ARCH: dict[str, Any] = {**TINY_ARCH, "d_model": 64, "d_ff": 128}
SEQ = 32


def stage(name: str, kind: str, data: str = "corpus", **fields: Any) -> dict[str, Any]:
    """A training stage with test-sized defaults: 8 steps of 8 × 32 tokens, lr 3e-3."""
    return {"name": name, "kind": kind, "data": data, "steps": 8, "batch_size": 8, "seq_len": SEQ,
            "log_every": 2, "checkpoint_every": 4, "optimizer": {"lr": 3e-3},
            "schedule": {"warmup_steps": 2}, **fields}


def write_pairs(path: Path, n: int = 96, seed: int = 0) -> None:
    """A learnable prompt/response task in `builtin:words` vocabulary: reverse 3–6 words."""
    from kdspec.data.hmm import vocabulary

    words = vocabulary()[:24]
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            prompt = [rng.choice(words) for _ in range(rng.randint(3, 6))]
            record = {"prompt": " ".join(prompt), "response": " ".join(reversed(prompt))}
            handle.write(json.dumps(record) + "\n")


@dataclass
class TinyRun:
    spec: Spec
    plan: Plan
    spec_dir: Path
    run_dir: Path
    events: list[Event] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)

    def ctx(self, node_id: str, emit: Callable[[Event], None] | None = None) -> NodeContext:
        node = self.plan.node(node_id)
        return NodeContext(node, self.plan, self.spec, self.spec_dir, self.run_dir,
                           self.run_dir / node_id, emit or self.events.append)

    def run(self, node_id: str) -> None:
        """Run `node_id` after the dependencies that have not run yet."""
        from kdspec_torch.backend import TorchBackend

        for dep in self.plan.node(node_id).depends_on:
            if dep not in self.finished:
                self.run(dep)
        TorchBackend().run_node(self.ctx(node_id))
        self.finished.add(node_id)

    def metrics(self, node_id: str) -> list[dict[str, Any]]:
        return [e.values for e in self.events if e.kind == "metrics" and e.node == node_id]

    def model_dir(self, node_id: str) -> Path:
        return self.run_dir / node_id / "model"


def build_spec(stages: list[dict[str, Any]], *, spec_dir: Path, models: dict | None = None,
               seed: int = 0, tokenizer: str = "builtin:words") -> Spec:
    write_pairs(spec_dir / "pairs.jsonl")
    return Spec.model_validate({
        "kdspec": 1, "name": "tiny", "seed": seed, "tokenizer": tokenizer,
        "models": models or {"big": {"arch": TEACHER_ARCH}, "small": {"arch": TINY_ARCH}},
        "data": {"corpus": {"source": "builtin:hmm", "n": 48},
                 "pairs": {"source": "jsonl:pairs.jsonl"}},
        "stages": stages,
    })


def planned_run(stages: list[dict[str, Any]], spec_dir: Path, run_dir: Path,
                **kwargs: Any) -> TinyRun:
    """A planned TinyRun with its spec files in `spec_dir`, running into `run_dir`."""
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = build_spec(stages, spec_dir=spec_dir, **kwargs)
    plan = build_plan(spec, base_dir=spec_dir, estimate=False)
    assert not plan.errors, plan.errors
    return TinyRun(spec, plan, spec_dir, run_dir)


def new_run(stages: list[dict[str, Any]], folder: Path, **kwargs: Any) -> TinyRun:
    """A planned TinyRun whose spec lives in `folder/spec` and run in a new `folder/runN`."""
    run_dir = folder / f"run{len(list(folder.glob('run*')))}"
    run_dir.mkdir(parents=True)
    return planned_run(stages, folder / "spec", run_dir, **kwargs)


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., TinyRun]:
    """`make_run(stages, models=..., seed=...)`: a TinyRun in this test's folder."""
    return lambda stages, **kwargs: new_run(stages, tmp_path, **kwargs)
