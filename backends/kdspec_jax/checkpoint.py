"""Training checkpoints of the JAX backend: written whole or not at all.

Layout under a node's ``checkpoints/`` folder (the torch backend's, with JAX contents)::

    step-00000100/
      state.safetensors   every leaf of the TrainState (params, optax state, step counter),
                          named by its pytree path, e.g. ``.params['layers']['q_proj']``
      progress.json       {"step", "samples", "tokens", "wall_seconds"}: written last

``samples`` is the data position (the sampler's stream is a pure function of it). No random
state is saved because training consumes none: initial weights come from a key derived from
the spec seed, the data order from the sample index, and nothing else draws.

A checkpoint is written to ``.tmp-step-…-<pid>/`` (files fsynced), then renamed to ``step-…/``
(atomic on POSIX) and the parent fsynced: a kill leaves the complete new checkpoint or a temp
folder, which is never read and is removed on the next start. Only ``step-N`` folders holding
``progress.json`` count; the newest ``KEEP`` are kept. Restoring reads the leaves into the
structure of a freshly built state, so a checkpoint of another model or optimizer fails loudly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy

__all__ = [
    "KEEP",
    "Progress",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "remove_partial",
    "save_checkpoint",
]

KEEP = 2
STATE_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    """Optimizer steps done, samples (data position) and tokens consumed, and the training
    loop's wall time so far (summed over resumed segments)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, state: Any, progress: Progress) -> Path:
    """Write the checkpoint of ``progress.step`` atomically; prune all but the newest KEEP."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    safetensors.numpy.save_file(_flatten(state), str(tmp / STATE_FILE))
    (tmp / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
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
        if match and (path / PROGRESS_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def remove_partial(root: Path) -> None:
    """Delete the temp folders a killed run left behind."""
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, template: Any) -> tuple[Any, Progress]:
    """The state saved in ``path``, in ``template``'s pytree structure (host numpy arrays;
    ``jax.device_put`` them where they belong), and its progress."""
    saved = safetensors.numpy.load_file(str(path / STATE_FILE))
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for key_path, leaf in paths:
        key = jax.tree_util.keystr(key_path)
        if key not in saved:
            raise ValueError(f"checkpoint {path} has no {key}: it belongs to another model "
                             "or optimizer")
        value = saved.pop(key)
        if value.shape != np.shape(leaf) or value.dtype != np.asarray(leaf).dtype:
            raise ValueError(f"checkpoint {path}: {key} is {value.dtype}{list(value.shape)}, "
                             f"expected {np.asarray(leaf).dtype}{list(np.shape(leaf))}")
        leaves.append(value)
    if saved:
        raise ValueError(f"checkpoint {path} has leaves this state lacks: {sorted(saved)[:5]}")
    progress = Progress(**json.loads((path / PROGRESS_FILE).read_text()))
    return jax.tree_util.tree_unflatten(treedef, leaves), progress
