"""The hardware a spec is estimated for (and, with a backend, run on)."""

from __future__ import annotations

from pydantic import Field, model_validator

from .base import StrictModel


class Parallelism(StrictModel):
    """How the devices are used: data-parallel replicas, ZeRO/FSDP sharding, tensor parallel."""

    data: int | None = Field(
        None, gt=0, description="Data-parallel degree; default count / tensor."
    )
    zero_stage: int = Field(
        0, ge=0, le=3,
        description="ZeRO/FSDP stage over the data-parallel group: 1 shards optimizer states, "
        "2 also gradients, 3 also weights (FSDP full sharding).",
    )
    tensor: int = Field(1, gt=0, description="Tensor-parallel degree.")


class HardwareSpec(StrictModel):
    """Accelerators to estimate for; `kdspec plan` prices the run on these."""

    accelerator: str = Field(
        "cpu", description="An accelerator from the catalog (`kdspec accelerators`): e.g. "
        "h100, a100-80gb, tpu-v5e, v100-32gb, cpu."
    )
    count: int = Field(1, gt=0, description="Number of devices.")
    mfu: float = Field(
        0.4, gt=0, le=1, description="Assumed model-FLOPs utilisation for wall-time estimates."
    )
    price_per_device_hour: float | None = Field(
        None, ge=0, description="USD per device-hour; without it the cost is not estimated."
    )
    parallelism: Parallelism = Field(default_factory=Parallelism, description="Device layout.")

    @model_validator(mode="after")
    def _layout_fits(self) -> HardwareSpec:
        data = self.parallelism.data or self.count // self.parallelism.tensor
        if data * self.parallelism.tensor != self.count:
            raise ValueError(
                f"parallelism data × tensor ({data} × {self.parallelism.tensor}) must equal "
                f"count ({self.count})"
            )
        return self

    @property
    def data_parallel(self) -> int:
        return self.parallelism.data or self.count // self.parallelism.tensor
