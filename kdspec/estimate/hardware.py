"""Accelerator catalog and the device layout a node is estimated on."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

GB = 10**9
GiB = 2**30
TFLOPS = 10**12


@dataclass(frozen=True)
class Accelerator:
    """One device: dense peak FLOP/s in ``dtype``, memory, HBM bandwidth (bytes/s).

    ``peak_flops`` is the dense figure (vendor sheets often quote 2:4-sparse, twice as high).
    ``memory_bytes`` is the capacity as the source states it, in its units (decimal GB for most
    sheets, GiB where the source says GiB); the runtime and allocator take 1–3 GB of it.
    """

    name: str
    peak_flops: float
    memory_bytes: int
    hbm_bandwidth: float
    dtype: str
    source: str


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("a100-80gb", 312 * TFLOPS, 80 * GB, 2.04e12, "bf16",
                    "A100 80GB SXM; JAX scaling book (GPUs chapter), torchtitan"),
        Accelerator("h100", 989 * TFLOPS, 80 * GB, 3.35e12, "bf16",
                    "H100 SXM; JAX scaling book (GPUs chapter), torchtitan"),
        Accelerator("h200", 989 * TFLOPS, 141 * GB, 4.8e12, "bf16",
                    "H200 SXM; JAX scaling book (GPUs chapter)"),
        Accelerator("b200", 2250 * TFLOPS, 180 * GB, 8.0e12, "bf16",
                    "B200; JAX scaling book (GPUs chapter); 192 GB nominal, ~180 GB usable"),
        Accelerator("tpu-v4", 275 * TFLOPS, 32 * GiB, 1.2e12, "bf16", "Cloud TPU docs (v4)"),
        Accelerator("tpu-v5e", 197 * TFLOPS, 16 * GB, 0.819e12, "bf16",
                    "Cloud TPU docs (v5e): 16 GB, 819 GB/s"),
        Accelerator("tpu-v5p", 459 * TFLOPS, 95 * GB, 2.765e12, "bf16", "Cloud TPU docs (v5p)"),
        Accelerator("tpu-v6e", 918 * TFLOPS, 32 * GB, 1.64e12, "bf16", "Cloud TPU docs (v6e)"),
        Accelerator("v100-32gb", 125 * TFLOPS, 32 * GB, 0.9e12, "fp16",
                    "V100 SXM2 32GB datasheet: 125 TFLOP/s fp16 tensor cores (no bf16), "
                    "900 GB/s; MiniLLM's official setup"),
        Accelerator("cpu", 200e9, 24 * GiB, 50e9, "fp32",
                    "rough: a 2-core AVX-512 host (this project's dev machine): a 2048² fp32 "
                    "matmul in torch ran at ~200 GFLOP/s and a copy at ~50 GB/s; training "
                    "reaches ~100 GFLOP/s (mfu ~0.5). Scale by cores for other hosts"),
    )
}


def get_accelerator(name: str) -> Accelerator:
    """The catalog entry ``name``; the error names the closest valid one."""
    try:
        return ACCELERATORS[name]
    except KeyError:
        close = difflib.get_close_matches(name, ACCELERATORS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(
            f"unknown accelerator {name!r}{hint}; known: {', '.join(ACCELERATORS)}"
        ) from None


@dataclass(frozen=True)
class Hardware:
    """Devices a node runs on and how they are used.

    ``data_parallel`` defaults to ``count // tensor_parallel``; ``data_parallel ·
    tensor_parallel`` must equal ``count``. ``zero_stage`` (ZeRO/FSDP over the data-parallel
    group): 1 shards optimizer states (with the fp32 master weights), 2 also gradients, 3 also
    weights. ``mfu``: the fraction of peak reached on the FLOPs the node executes.
    """

    accelerator: Accelerator
    count: int = 1
    mfu: float = 0.4
    price_per_device_hour: float | None = None
    data_parallel: int | None = None
    zero_stage: int = 0
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or self.tensor_parallel < 1:
            raise ValueError("count and tensor_parallel must be at least 1")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.price_per_device_hour is not None and self.price_per_device_hour < 0:
            raise ValueError("price_per_device_hour must be non-negative")
        data = self.data_parallel or self.count // self.tensor_parallel
        if data * self.tensor_parallel != self.count:
            raise ValueError(
                f"data_parallel × tensor_parallel ({data} × {self.tensor_parallel}) must equal "
                f"count ({self.count})"
            )
        object.__setattr__(self, "data_parallel", data)

    @classmethod
    def from_name(cls, accelerator: str, **kwargs: object) -> Hardware:
        """``Hardware`` for a catalog accelerator name, e.g. ``Hardware.from_name("h100")``."""
        return cls(get_accelerator(accelerator), **kwargs)  # type: ignore[arg-type]

    @property
    def dp(self) -> int:
        """Data-parallel degree (resolved ``data_parallel``)."""
        assert self.data_parallel is not None
        return self.data_parallel

    @property
    def achieved_flops(self) -> float:
        """FLOP/s the whole group executes at ``mfu``."""
        return self.count * self.accelerator.peak_flops * self.mfu

    def cost_usd(self, device_hours: float) -> float | None:
        """``device_hours × price_per_device_hour``, or None without a price."""
        if self.price_per_device_hour is None:
            return None
        return device_hours * self.price_per_device_hour
