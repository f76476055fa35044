"""Training checkpoints: written whole or not at all, resumed from the newest complete one.

Layout under a node's `checkpoints/` folder::

    step-00000100/
      model.pt       model.state_dict() (fp32 master weights)
      optimizer.pt   {"optimizer": AdamW state_dict, "scheduler": LambdaLR state_dict}
      rng.pt         python, numpy, torch CPU and CUDA generator states
      state.json     {"step", "samples", "tokens", "wall_seconds"}: written last

A checkpoint is first written to `.tmp-step-…-<pid>/` (every file fsynced), then renamed to
`step-…/` (an atomic rename on POSIX) and the folder fsynced. A kill at any moment leaves either
the complete new checkpoint or only a temp folder, which is never read and is removed on the
next load. Only folders named `step-N` holding `state.json` count; the newest `KEEP` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

KEEP = 2
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, samples (data position) and tokens consumed, and
    the wall time of the training loop so far (summed over resumed segments)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(root: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState) -> Path:
    """Write the checkpoint of `state.step` atomically and prune all but the newest KEEP."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp / "optimizer.pt")
    torch.save(rng_states(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    for path in tmp.iterdir():
        _fsync_file(path)
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def remove_partial(root: Path) -> None:
    """Delete temp folders a killed run left behind."""
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states in place; return the TrainState."""
    device = next(model.parameters()).device
    model.load_state_dict(torch.load(path / "model.pt", map_location=device, weights_only=True))
    opt = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_states(torch.load(path / "rng.pt", weights_only=True))
    return TrainState(**json.loads((path / "state.json").read_text()))
