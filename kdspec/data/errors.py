"""The one error type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A data source or tokenizer that cannot be used, with a message that says how to fix it."""
