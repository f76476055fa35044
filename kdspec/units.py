"""Human-readable numbers for the CLI: FLOPs, bytes, durations."""

from __future__ import annotations


def flops(value: float | None) -> str:
    """Scientific notation: FLOP counts span 1e9 (a CPU toy) to 1e24 (a pre-training run)."""
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.3g}".replace("e+", "e")


def nbytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}B"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 86400:
        return f"{seconds / 86400:.3g} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


def hours(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
