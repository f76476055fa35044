"""Named data sources."""

from __future__ import annotations

from pydantic import Field, field_validator

from .base import Quantity, StrictModel

SCHEMES = ("builtin", "jsonl", "text", "parquet", "hf")


class DataSource(StrictModel):
    """A named dataset: where the records come from and how its fields map to kdspec's names."""

    source: str = Field(
        description="`builtin:NAME` (hmm, arithmetic, instructions), `jsonl:PATH`, `text:PATH`, "
        "`parquet:PATH` or `hf:NAME[:CONFIG]`; paths are relative to the spec file."
    )
    split: str = Field("train", description="Split to read (builtin and hf sources).")
    n: Quantity | None = Field(
        None, description="Use at most this many records (a builtin source makes n; 1000 if unset)."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Rename fields to kdspec's names: `{prompt: question}` reads `question` as "
        "the prompt. Names used: text (pretraining), prompt/response (sft, kd, minillm), "
        "input/label/rationale (step_by_step).",
    )

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition(":")
        if not sep or scheme not in SCHEMES or not rest:
            raise ValueError(
                f"expected `SCHEME:WHAT` with SCHEME one of {', '.join(SCHEMES)}, got {value!r}"
            )
        from ..data.sources import parse_source  # pure Python; names unknown builtin datasets

        parse_source(value)
        return value
