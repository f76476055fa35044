"""Fields shared by stage kinds: optimisation, schedules, KD loss settings, generation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import Fraction, Name, PositiveFloat, Quantity, StrictModel

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


class OptimizerConfig(StrictModel):
    """AdamW settings."""

    name: Literal["adamw"] = Field("adamw", description="Optimizer (AdamW, decoupled decay).")
    lr: PositiveFloat = Field(3e-4, description="Peak learning rate.")
    betas: list[float] = Field(
        default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2,
        description="Adam beta1, beta2.",
    )
    eps: PositiveFloat = Field(1e-8, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    grad_clip: PositiveFloat | None = Field(
        1.0, description="Clip the global gradient norm to this; null disables clipping."
    )


class ScheduleConfig(StrictModel):
    """Learning-rate schedule: linear warmup, then cosine/linear decay or constant."""

    kind: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay shape.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 over this many steps.")
    min_lr_ratio: Fraction = Field(0.1, description="Final lr as a fraction of the peak.")


class KDLoss(StrictModel):
    """The distillation loss: `(1 - hard_label_weight) * s * D(teacher, student) +
    hard_label_weight * CE(labels)`, with `s = T²` when `scale_by_t2`, else 1."""

    divergence: Divergence = Field(
        "forward_kl",
        description="forward_kl = KL(teacher‖student) (Gemma 2's soft-target CE up to a "
        "constant); reverse_kl = KL(student‖teacher); jsd = generalised JSD(β) with mixture "
        "β·teacher + (1-β)·student (TRL's convention).",
    )
    beta: Fraction = Field(0.5, description="JSD mixture weight β (jsd only).")
    temperature: PositiveFloat = Field(
        1.0, description="Loss temperature: both distributions are softmax(logits / T)."
    )
    scale_by_t2: bool = Field(True, description="Multiply the soft term by T² (Hinton et al.).")
    hard_label_weight: Fraction = Field(
        0.0, description="Weight of the next-token CE on the data's labels mixed into the loss."
    )
    chunked: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Chunked fused-linear loss that never builds full [tokens, vocab] logits; "
        "auto turns it on when tokens × vocab is large.",
    )


class TeacherCache(StrictModel):
    """Where the teacher's distribution comes from in an off-policy KD stage."""

    mode: Literal["online", "topk", "sampled"] = Field(
        "online",
        description="online = run the teacher every step; topk = cache the top-K teacher "
        "probabilities (renormalised); sampled = cache K draws from the teacher (Gemma 3, "
        "unbiased).",
    )
    k: int = Field(64, gt=0, description="Tokens kept per position in the cache.")


class GenerationConfig(StrictModel):
    """Sampling settings for generation (not the loss temperature)."""

    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per prompt at most.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 = greedy.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables.")
    top_p: Fraction = Field(1.0, description="Nucleus sampling; 1 disables.")


class StageBase(StrictModel):
    """Fields every stage has."""

    name: Name = Field(description="Unique stage name; also the name of its output model.")
    description: str = Field("", description="Free text.")
    after: list[Name] = Field(
        default_factory=list, description="Stages that must finish first (besides those whose "
        "outputs this stage uses, which are implied)."
    )


class TrainStage(StageBase):
    """Fields every training stage has."""

    student: str | None = Field(
        None,
        description="The model trained: a name from `models` or an earlier stage's name (its "
        "output). Defaults to the previous training stage's output.",
    )
    data: str = Field(description="Name of a data source from `data`.")
    tokens: Quantity | None = Field(
        None, description="Training budget in tokens (student tokens); or give `steps`."
    )
    steps: int | None = Field(None, gt=0, description="Training budget in optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per optimizer step (global).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seq_len: int = Field(256, gt=0, description="Tokens per sequence (packed or truncated).")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = fp32 on CPU, bf16 autocast on GPU/TPU."
    )
    recompute: bool = Field(False, description="Activation checkpointing (recompute in backward).")
    log_every: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    checkpoint_every: int = Field(100, gt=0, description="Checkpoint every N optimizer steps.")

    @model_validator(mode="after")
    def _one_budget(self) -> TrainStage:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("give exactly one training budget: `tokens` or `steps`")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum})"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, -(-self.tokens // self.tokens_per_step))


class TeacherStage(TrainStage):
    """A training stage with a frozen teacher."""

    teacher: str = Field(
        description="The frozen teacher: a name from `models` or an earlier stage's name."
    )
