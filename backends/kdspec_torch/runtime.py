"""Where and how the backend computes: device, mixed precision, seeds and determinism."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch


def device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype for a stage's `precision`: auto = bf16 on CUDA, none (fp32) on CPU.

    Weights and optimizer states stay fp32 either way (bf16 only in the matmuls), so small
    updates are not lost to bf16 rounding."""
    if precision == "fp32" or (precision == "auto" and dev.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(dtype: torch.dtype | None, dev: torch.device) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose (`parts`), independent of the seeds of other purposes:
    sha256 of the base seed and the parts, so adding a purpose never shifts another's stream."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """Ask torch for deterministic kernels. Cheap on the CPU; on CUDA cuBLAS needs a fixed
    workspace (set here unless the user set it), and ops without a deterministic kernel only
    warn rather than stop a run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without consuming any RNG stream the training loop uses."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
