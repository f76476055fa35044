"""Building blocks shared by every spec model: the strict base class and quantity types."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

__all__ = ["StrictModel", "Quantity", "parse_quantity", "Name", "PositiveFloat", "Fraction"]


class StrictModel(BaseModel):
    """Base of every spec object: unknown keys are errors, values are not coerced across types."""

    # YAML reads `.inf` and `.nan` as floats; no spec value means either, so they are refused.
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, validate_default=True, allow_inf_nan=False
    )


# SI suffixes count in powers of 1000, IEC suffixes (Ki, Mi, ...) in powers of 1024.
_SUFFIXES = {
    "": 1,
    "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}
_QUANTITY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([KMGBTP]i?)?\s*$")


def parse_quantity(value: object) -> int:
    """Parse a count such as ``2T``, ``4M``, ``512Ki``, ``1.5B`` or ``4096`` into an int.

    SI suffixes (K, M, B/G, T, P) are powers of 1000; IEC suffixes (Ki, Mi, Gi, Ti, Pi) powers of
    1024. The result must be a whole number: ``1.5K`` is 1500, ``1.5`` is an error.
    """
    if isinstance(value, bool):
        raise ValueError("expected a count such as 4096, 4M or 512Ki, got a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole count, got {value}")
        number = int(value)
    elif isinstance(value, str):
        match = _QUANTITY_RE.match(value)
        if match is None or (match.group(2) or "") not in _SUFFIXES:
            raise ValueError(
                f"expected a count such as 4096, 4M, 2T or 512Ki, got {value!r} "
                "(suffixes: K M B T P = powers of 1000, Ki Mi Gi Ti = powers of 1024)"
            )
        exact = float(match.group(1)) * _SUFFIXES[match.group(2) or ""]
        if not math.isfinite(exact) or not exact.is_integer():
            raise ValueError(f"{value!r} is not a whole count")
        number = int(exact)
    else:
        raise ValueError(f"expected a count such as 4096 or 4M, got {type(value).__name__}")
    if number < 0:
        raise ValueError(f"expected a non-negative count, got {number}")
    return number


_QUANTITY_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string",
         "pattern": r"^\s*[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?\s*([KMGBTP]i?)?\s*$"},
    ],
    "description": "A count; suffixes K M B T P (powers of 1000) or Ki Mi Gi Ti (powers of 1024).",
}

Quantity = Annotated[int, BeforeValidator(parse_quantity), WithJsonSchema(_QUANTITY_SCHEMA)]
"""A non-negative integer that may be written with a suffix: ``2T``, ``4M``, ``512Ki``."""

Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$", max_length=64)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
